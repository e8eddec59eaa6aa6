"""W9: dynamic calls and remote objects against an ask on the same pool (issue 13's targets).

    python benches/bench_remote.py [--quick]

One pool of two workers serving ``bench_handlers:echo``; in interleaved rounds:

* p50 latency of ``pool.ask(msg)`` (the anchor), ``pool.call("bench_handlers:echo", msg)``
  (target: <= 1.2x) and a Ref method call ``ref.echo(msg)`` (target: <= 1.3x);
* p50 of a 10-step pipeline of calls (target: <= 2x);
* throughput of ``asyncio.gather`` over 20,000 calls against 20,000 asks (target: >= 0.8x).

One JSON object per line, as the other benches (``_report``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kameo  # noqa: E402
from _report import emit, emit_env  # noqa: E402

MSG = {"id": 1, "payload": "x" * 64}
clock = time.perf_counter_ns


async def latencies(fn, n):
    out = [0] * n
    for i in range(n):
        t0 = clock()
        await fn(MSG)
        out[i] = clock() - t0
    return out


async def run(n, rounds, total, repeats):
    async with kameo.Pool("bench_handlers:echo", size=2) as pool:
        ref = await pool.new("bench_handlers:Echo")

        def pipeline10(m):
            p = pool.pipeline()
            for _ in range(10):
                p.call("bench_handlers:echo", m)
            return p.run()

        kinds = {
            "ask": pool.ask,
            "call": lambda m: pool.call("bench_handlers:echo", m),
            "ref_method": ref.echo,
            "pipeline10": pipeline10,
        }
        for fn in kinds.values():
            await latencies(fn, 200)
        samples = {k: [] for k in kinds}
        for _ in range(rounds):
            for k, fn in kinds.items():
                samples[k] += await latencies(fn, n // rounds)
        p50 = {k: statistics.median(v) / 1000 for k, v in samples.items()}
        for k, v in p50.items():
            emit("W9", k, "p50", round(v, 2), "us", n=len(samples[k]))
        tput = {"ask": [], "call": []}
        for _ in range(repeats):
            for k in tput:
                gc.collect()
                t0 = clock()
                if k == "ask":
                    await asyncio.gather(*(pool.ask(MSG) for _ in range(total)))
                else:
                    await asyncio.gather(
                        *(pool.call("bench_handlers:echo", MSG) for _ in range(total))
                    )
                tput[k].append(total / ((clock() - t0) / 1e9))
        rate = {k: statistics.median(v) for k, v in tput.items()}
        for k, v in rate.items():
            emit("W9", f"gather_{k}", "rate", round(v), "msg/s", n=total)
    for name, value, target, ok in (
        ("call_p50/ask_p50", p50["call"] / p50["ask"], "<= 1.2", lambda x: x <= 1.2),
        ("ref_method_p50/ask_p50", p50["ref_method"] / p50["ask"], "<= 1.3", lambda x: x <= 1.3),
        ("pipeline10_p50/ask_p50", p50["pipeline10"] / p50["ask"], "<= 2", lambda x: x <= 2),
        ("gather_call/gather_ask", rate["call"] / rate["ask"], ">= 0.8", lambda x: x >= 0.8),
    ):
        emit("W9", "summary", name, round(value, 3), "ratio", target=target, passed=ok(value))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    args = ap.parse_args()
    emit_env(kameo, quick=args.quick)
    if args.quick:
        asyncio.run(run(2000, 4, 5000, 2))
    else:
        asyncio.run(run(10000, 10, 20000, 5))


if __name__ == "__main__":
    main()
