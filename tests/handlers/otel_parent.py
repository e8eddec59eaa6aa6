"""The parent program of tests/test_otel.py: sets OpenTelemetry up (in-memory spans and
metrics), runs calls of each kind in pools whose workers trace too, and prints what it saw as
one JSON object. ``python -m handlers.otel_parent <dir>`` (the workers write their spans in
``<dir>``, see handlers.otel.setup_worker)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import kameo
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from handlers.otel import describe, work

BOUND = 60


async def main(out_dir: str) -> dict[str, Any]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    tracer = trace.get_tracer("test")
    seen: dict[str, Any] = {}

    callbacks = kameo.Callbacks()

    def quote(symbol: str) -> Any:
        with tracer.start_as_current_span("inside-callback"):
            seen["callback_traceparent"] = kameo.current_traceparent()
            yield {"symbol": symbol, "price": 1.5}

    callbacks.register("trading.Quote", quote)
    common = {"init": "handlers.otel:setup_worker", "env": {"KAMEO_TEST_SPANS": out_dir}}
    sync_pool = kameo.Pool("handlers.otel:work", size=2, callbacks=callbacks, **common)
    async_pool = kameo.Pool("handlers.otel:agen", size=1, max_concurrency=4, name="agens", **common)
    async with sync_pool, async_pool:
        with tracer.start_as_current_span("root-ask"):
            seen["ask"] = await asyncio.wait_for(sync_pool.ask(3), BOUND)
        with tracer.start_as_current_span("root-error"):
            try:
                await asyncio.wait_for(sync_pool.ask(-1), BOUND)
            except ValueError as exc:
                seen["error"] = type(exc).__name__
        with tracer.start_as_current_span("root-call"):
            seen["call"] = await asyncio.wait_for(sync_pool.call("handlers.otel:work", 5), BOUND)
        with tracer.start_as_current_span("root-call-stream"):
            stream = sync_pool.call_stream("handlers.otel:count", 3)
            seen["call_stream"] = [x async for x in stream]
        with tracer.start_as_current_span("root-stream"):
            seen["stream"] = [x async for x in async_pool.stream(2)]
        with tracer.start_as_current_span("root-callback"):
            items, worker_trace = await asyncio.wait_for(
                sync_pool.call("handlers.otel:with_callback", "ACME"), BOUND
            )
            seen["callback_items"] = items
            seen["worker_traceparent"] = worker_trace
        with tracer.start_as_current_span("root-session"):
            async with sync_pool.session() as session:
                seen["session"] = await asyncio.wait_for(
                    session.call("handlers.otel:work", 6), BOUND
                )
        marker = os.path.join(out_dir, "died")
        fn = sync_pool.function("handlers.otel:die_once", idempotent=True)
        seen["retried"] = await asyncio.wait_for(fn(marker), BOUND)
        seen["stats"] = {"crashes": sync_pool.stats().crashes, "retries": sync_pool.stats().retries}
        with (
            tracer.start_as_current_span("root-executor"),
            kameo.Executor(
                1, initializer="handlers.otel:setup_worker", env=common["env"], name="executor"
            ) as executor,
        ):
            seen["executor"] = await asyncio.to_thread(
                lambda: executor.submit(work, 4).result(timeout=BOUND)
            )
        seen["metrics"] = collect(reader)
    return {"seen": seen, "spans": [describe(s) for s in exporter.get_finished_spans()]}


def collect(reader: InMemoryMetricReader) -> dict[str, list[dict[str, Any]]]:
    """name -> data points: attributes and value (sum, or a histogram's count)."""
    out: dict[str, list[dict[str, Any]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = out.setdefault(metric.name, [])
                for p in metric.data.data_points:
                    value = getattr(p, "value", None)
                    if value is None:
                        value = p.count
                    points.append({"attributes": dict(p.attributes), "value": value})
    return out


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1]))
    print(json.dumps(result))
