#!/usr/bin/env python3
"""W2 with and without an event listener, in interleaved rounds of one process.

Usage::

    python benches/bench_events.py [--rounds 10] [--total 5000]

The W2 shape of ``bench_pool.py`` (two ``bench_handlers:echo`` workers, ``asyncio.gather`` of
``total`` asks of a ~100-byte dict), run alternately with no listener and with a global
listener that counts the events (``kameo.add_listener``), on the same pool: on a shared machine
the two then see the same load. Prints one JSON line per case (median msgs/s over the rounds,
best, worst) and the difference per request in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kameo

MSG = {"symbol": "AAPL", "qty": 100, "side": "buy", "price": 187.25, "tags": ["a", "b", "c"]}


async def run(rounds: int, total: int) -> dict[str, list[float]]:
    events = [0]

    def count(event: object) -> None:
        events[0] += 1

    rates: dict[str, list[float]] = {"no_listener": [], "listener": []}
    async with kameo.Pool("bench_handlers:echo", size=2) as pool:
        await asyncio.gather(*(pool.ask(MSG) for _ in range(1000)))  # warm-up
        for i in range(rounds * 2):
            case = "listener" if i % 2 else "no_listener"
            if case == "listener":
                kameo.add_listener(count)
            gc.collect()
            t0 = time.perf_counter()
            replies = await asyncio.gather(*(pool.ask(MSG) for _ in range(total)))
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0)  # the last done callbacks
            if case == "listener":
                kameo.remove_listener(count)
            assert len(replies) == total and replies[-1] == MSG
            del replies
            rates[case].append(total / elapsed)
    assert events[0] >= rounds * total, events
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--total", type=int, default=5000)
    args = ap.parse_args()
    rates = asyncio.run(run(args.rounds, args.total))
    medians = {}
    for case, values in rates.items():
        values.sort()
        medians[case] = statistics.median(values)
        print(
            json.dumps(
                {
                    "workload": "W2",
                    "impl": f"kameo_{case}",
                    "metric": "throughput",
                    "value": round(medians[case], 1),
                    "unit": "msgs/s",
                    "best": round(values[-1], 1),
                    "worst": round(values[0], 1),
                    "rounds": len(values),
                    "n": args.total,
                }
            )
        )
    cost = 1e6 / medians["listener"] - 1e6 / medians["no_listener"]
    print(json.dumps({"workload": "W2", "listener_cost_us_per_request": round(cost, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
