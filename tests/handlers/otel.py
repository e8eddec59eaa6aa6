"""Handlers for tests/test_otel.py: an init hook that sets OpenTelemetry up in the worker (spans
to a JSON-lines file of its own), and the functions the parent's script calls."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import kameo


def setup_worker() -> None:
    """Init hook: a tracer provider whose spans go to ``$KAMEO_TEST_SPANS/<pid>.jsonl``."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    path = os.path.join(os.environ["KAMEO_TEST_SPANS"], f"{os.getpid()}.jsonl")

    class FileExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            with open(path, "a") as f:
                for span in spans:
                    f.write(json.dumps(describe(span)) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)


def describe(span: Any) -> dict[str, Any]:
    """A finished SDK span as plain data (both sides use it)."""
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent": None if span.parent is None else f"{span.parent.span_id:016x}",
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "description": span.status.description,
        "events": [e.name for e in span.events],
        "pid": os.getpid(),
    }


def work(x: int) -> int:
    """Doubles ``x``; raises ValueError for a negative one. Makes a span of its own."""
    from opentelemetry import trace

    with trace.get_tracer("handlers").start_as_current_span("inside-work"):
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x * 2


def count(n: int) -> Any:
    yield from range(n)


async def agen(n: int) -> Any:
    for i in range(n):
        yield i


def with_callback(symbol: str) -> list[Any]:
    """Calls the parent's ``trading.Quote`` and returns what it streamed, and the traceparent
    the worker saw."""
    items = list(kameo.trading.Quote(symbol))
    return [items, kameo.current_traceparent()]


def die_once(marker: str) -> str:
    """SIGKILLs its own worker the first time (``marker`` does not exist yet)."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"
