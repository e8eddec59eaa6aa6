"""kameo tour: start a pool, ask, fan out, handle a remote error. Run with `make demo`."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers inherit sys.path

import kameo


async def main() -> None:
    t0 = time.perf_counter()
    async with kameo.Pool("pricing:quote", size=2) as pool:
        print(f"pool of {pool.size} workers ready in {(time.perf_counter() - t0) * 1000:.0f} ms")
        for w in pool.workers:
            print(f"  worker {w.id}: pid {w.pid}, {w.state}")

        order = {"symbol": "AAPL", "spot": 187.25, "strike": 190.0, "years": 0.5, "vol": 0.3}
        print("one ask:", await pool.ask(order, timeout=5.0))

        t = time.perf_counter()
        orders = [{**order, "strike": 150.0 + i % 80} for i in range(10_000)]
        replies = await asyncio.gather(*(pool.ask(o) for o in orders))
        dt = time.perf_counter() - t
        pids = {r["worker_pid"] for r in replies}
        rate = len(orders) / dt
        print(f"10,000 asks in {dt * 1000:.0f} ms ({rate:,.0f}/s) across {len(pids)} workers")
        print("completed per worker:", {w.id: w.completed for w in pool.workers})

    async with kameo.Pool("pricing:enrich", size=1, max_concurrency=20) as pool:
        t = time.perf_counter()
        out = await asyncio.gather(*(pool.ask({"id": i}) for i in range(20)))
        print(
            f"20 async asks of 50 ms each on one worker: {(time.perf_counter() - t) * 1000:.0f} ms,"
            f" all enriched: {all(o['enriched'] for o in out)}"
        )

    async with kameo.Pool("pricing:reject", size=1) as pool:
        try:
            await pool.ask({"symbol": "TSLA", "qty": 10**9})
        except ValueError as exc:  # a remote ValueError is still a ValueError
            assert isinstance(exc, kameo.RemoteError)
            print(f"remote error caught: {exc.remote_type}: {exc.remote_message}")
            print("  from worker", exc.worker_id, "pid", exc.pid)
    # Workers call back into the parent: a streaming market-data handler and a one-shot one.
    callbacks = kameo.Callbacks()
    stopped = []

    @callbacks.handler("trading.DataFetch")
    async def data_fetch(req: dict[str, str]) -> Any:
        try:
            for i in range(10):
                yield {"symbol": req["symbol"], "price": 150.0 + i}
                await asyncio.sleep(0.001)
        finally:
            stopped.append(req["symbol"])

    @callbacks.handler("weather.CurrentConditions")
    async def conditions(req: dict[str, str]) -> dict[str, Any]:
        return {"city": req["city"], "temp": 21}

    async with kameo.Pool("strategy:execute_trade", size=2, callbacks=callbacks) as pool:
        fill = await pool.ask({"symbol": "AAPL", "limit": 154.0})
        print("trade:", fill)
        print("market-data handlers closed in the parent:", stopped)
    async with kameo.Pool("strategy:execute_trade_sync", size=1, callbacks=callbacks) as pool:
        print("sync worker saw a best price of", await pool.ask({"symbol": "MSFT"}))
    print("all pools closed; no worker left running")


if __name__ == "__main__":
    asyncio.run(main())
