"""Where requests go: adaptive prefetch on a fresh pool, and memory recycling per request."""

from __future__ import annotations

import asyncio
import time

import kameo

BASIC = "handlers.basic"
MEMORY = "handlers.memory"
MiB = 1 << 20


async def test_fresh_pool_sends_nothing_behind_a_long_first_request():
    # Default (adaptive) prefetch: until a worker's answers are measured, nothing is sent
    # ahead to it, so no short request waits behind the long one.
    async with kameo.Pool(f"{BASIC}:cmd", size=2) as pool:
        t0 = time.monotonic()
        done: dict[str, float] = {}

        async def ask(name: str, seconds: float) -> None:
            await pool.ask({"op": "sleep", "seconds": seconds}, timeout=30)
            done[name] = time.monotonic() - t0

        tasks = [asyncio.ensure_future(ask("long", 2.0))]
        tasks += [asyncio.ensure_future(ask(f"short{i}", 0.01)) for i in range(20)]
        await asyncio.gather(*tasks)
        long = done.pop("long")
        assert long >= 2.0
        late = {k: round(v, 3) for k, v in done.items() if v > long - 1.0}
        assert not late, f"short requests waited behind the long one ({long:.2f}s): {late}"


async def test_max_memory_per_worker_retires_after_the_request_that_crossed_it():
    # Each call keeps 50 MiB more; without a check per answer the worker grows far past the
    # limit between two supervision ticks.
    limit = 200 * MiB
    async with kameo.Pool(f"{MEMORY}:grow", size=1, max_memory_per_worker=limit) as pool:
        first = pool.workers[0].pid
        replies = [await pool.ask({"mib": 50}, timeout=30) for _ in range(12)]
        pids = [r["pid"] for r in replies]
        assert any(p != first for p in pids), f"never replaced: {pids}"
        worst = max(r["rss"] for r in replies)
        assert worst <= limit + 2 * 50 * MiB, (
            f"a worker reached {worst // MiB} MiB (limit {limit // MiB} MiB): "
            f"{[(r['pid'], r['rss'] // MiB) for r in replies]}"
        )
