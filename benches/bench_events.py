#!/usr/bin/env python3
"""W2 with and without an event listener, in interleaved rounds of one process.

Usage::

    python benches/bench_events.py [--rounds 10] [--total 5000] [--otel]

The W2 shape of ``bench_pool.py`` (two ``bench_handlers:echo`` workers, ``asyncio.gather`` of
``total`` asks of a ~100-byte dict), run alternately with no listener and with a global
listener that counts the events (``kameo.add_listener``), on the same pool: on a shared machine
the two then see the same load. Prints one JSON line per case (median msgs/s over the rounds,
best, worst) and the difference per request in µs.

With ``--otel`` (needs ``opentelemetry-sdk``), a third case in the same rounds: a second pool
started after an SDK tracer provider (a BatchSpanProcessor with an exporter that drops the
spans) and meter provider (an in-memory reader) were set, so every ask makes a client span and
records the metrics (the workers do not trace: no init hook sets a provider up there).
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


def set_up_otel() -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


async def run(rounds: int, total: int, otel: bool) -> dict[str, list[float]]:
    events = [0]

    def count(event: object) -> None:
        events[0] += 1

    cases = ["no_listener", "listener"] + (["otel"] if otel else [])
    rates: dict[str, list[float]] = {case: [] for case in cases}
    async with kameo.Pool("bench_handlers:echo", size=2) as plain:
        await asyncio.gather(*(plain.ask(MSG) for _ in range(1000)))  # warm-up
        traced = None
        if otel:
            set_up_otel()
            traced = kameo.Pool("bench_handlers:echo", size=2, name="traced")
            await traced.start()
            await asyncio.gather(*(traced.ask(MSG) for _ in range(1000)))
        for i in range(rounds * len(cases)):
            case = cases[i % len(cases)]
            pool = traced if case == "otel" else plain
            assert pool is not None
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
        if traced is not None:
            await traced.close()
    assert events[0] >= rounds * total, events
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--total", type=int, default=5000)
    ap.add_argument("--otel", action="store_true", help="also with OpenTelemetry on")
    args = ap.parse_args()
    rates = asyncio.run(run(args.rounds, args.total, args.otel))
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
    if "otel" in medians:
        cost = 1e6 / medians["otel"] - 1e6 / medians["no_listener"]
        print(json.dumps({"workload": "W2", "otel_cost_us_per_request": round(cost, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
