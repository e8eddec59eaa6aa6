"""OpenTelemetry across processes: a parent program with the SDK's in-memory exporter and meter
reader (tests/handlers/otel_parent.py, run as a subprocess so its global providers stay its
own), workers whose init hook sets up an exporter writing their spans to files
(tests/handlers/otel.py). Checks the parent/child links from the caller's span to the client
span, to the worker's server span, to a parent callback's span and the handler's own spans, the
attributes, error status on both sides, and the metrics (calls, errors, durations, crashes,
retries). Also: kameo never imports opentelemetry itself."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import TESTS_DIR

pytest.importorskip("opentelemetry.sdk.trace", reason="the dev venv installs opentelemetry-sdk")

RUN_BOUND = 120.0


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """This interpreter, as a bounded subprocess in tests/ with this sys.path."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=TESTS_DIR,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, *sys.path])},
        capture_output=True,
        text=True,
        timeout=RUN_BOUND,
    )


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("spans")
    proc = run_python("-m", "handlers.otel_parent", str(out))
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    worker_spans = []
    for path in glob.glob(str(out / "*.jsonl")):
        with open(path) as f:
            worker_spans += [json.loads(line) for line in f]
    result["worker_spans"] = worker_spans
    result["parent_pid"] = next(s["pid"] for s in result["spans"])
    return result


def one(spans: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [s["name"] for s in spans])
    return found[0]


def children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent"] == parent["span_id"]]


def client_of(traced: dict[str, Any], root_name: str) -> dict[str, Any]:
    """The client span made by the call under the caller's span ``root_name``."""
    spans = traced["spans"]
    root = one(spans, name=root_name)
    (client,) = children(spans, root)
    assert client["kind"] == "CLIENT"
    assert client["trace_id"] == root["trace_id"]
    return client


def server_of(traced: dict[str, Any], client: dict[str, Any]) -> dict[str, Any]:
    """The worker's server span of ``client``'s request: its child, in another process."""
    (server,) = [s for s in traced["worker_spans"] if s["parent"] == client["span_id"]]
    assert server["kind"] == "SERVER"
    assert server["trace_id"] == client["trace_id"]
    assert server["name"] == client["name"]
    assert server["pid"] != traced["parent_pid"]
    assert server["attributes"]["process.pid"] == server["pid"]
    assert server["attributes"]["kameo.worker_id"] == client["attributes"]["kameo.worker_id"]
    return server


@pytest.mark.parametrize(
    ("root", "name", "kind", "method", "pool"),
    [
        ("root-ask", "kameo.ask handlers.otel:work", "ask", "handlers.otel:work", None),
        ("root-call", "kameo.call handlers.otel:work", "call", "handlers.otel:work", None),
        (
            "root-call-stream",
            "kameo.call_stream handlers.otel:count",
            "call_stream",
            "handlers.otel:count",
            None,
        ),
        ("root-stream", "kameo.stream handlers.otel:agen", "stream", "handlers.otel:agen", "agens"),
    ],
)
def test_each_call_is_a_client_span_with_the_worker_server_span_as_its_child(
    traced: dict[str, Any], root: str, name: str, kind: str, method: str, pool: str | None
) -> None:
    client = client_of(traced, root)
    assert client["name"] == name
    attrs = client["attributes"]
    assert attrs["rpc.system"] == "kameo"
    assert attrs["rpc.method"] == method
    assert attrs["kameo.kind"] == kind
    assert attrs["kameo.pool"] == (pool or "handlers.otel:work")
    assert client["status"] == "UNSET"
    server = server_of(traced, client)
    # The worker pid on the client span is the process that made the server span.
    assert attrs["process.pid"] == server["pid"]
    assert server["attributes"]["rpc.method"] == method
    assert server["attributes"]["kameo.pool"] == attrs["kameo.pool"]
    assert server["status"] == "UNSET"


def test_an_executor_call_is_a_child_of_the_submitting_threads_span(
    traced: dict[str, Any],
) -> None:
    assert traced["seen"]["executor"] == 8
    client = client_of(traced, "root-executor")
    assert client["name"] == "kameo.call handlers.otel:work"
    assert client["attributes"]["kameo.pool"] == "executor"
    server_of(traced, client)


def test_a_session_call_is_traced_and_housekeeping_is_not(traced: dict[str, Any]) -> None:
    assert traced["seen"]["session"] == 12
    client = client_of(traced, "root-session")  # closing the session made no span
    assert client["name"] == "kameo.call handlers.otel:work"
    server_of(traced, client)
    # Every server span in the workers is the child of a client span of the parent.
    clients = {s["span_id"] for s in traced["spans"] if s["kind"] == "CLIENT"}
    servers = [s for s in traced["worker_spans"] if s["kind"] == "SERVER"]
    assert servers
    assert all(s["parent"] in clients for s in servers), servers


def test_the_handlers_own_spans_are_children_of_the_server_span(traced: dict[str, Any]) -> None:
    server = server_of(traced, client_of(traced, "root-ask"))
    (inner,) = children(traced["worker_spans"], server)
    assert inner["name"] == "inside-work"
    assert inner["pid"] == server["pid"]


def test_an_error_sets_error_status_on_both_sides(traced: dict[str, Any]) -> None:
    assert traced["seen"]["error"] == "RemoteValueError"
    client = client_of(traced, "root-error")
    assert client["status"] == "ERROR"
    assert client["attributes"]["error.type"] == "ValueError"
    assert "negative: -1" in client["description"]
    assert "exception" in client["events"]
    server = server_of(traced, client)
    assert server["status"] == "ERROR"
    assert server["attributes"]["error.type"] == "ValueError"
    assert "negative: -1" in server["description"]
    assert "exception" in server["events"]


def test_a_worker_callback_is_a_span_in_the_parent_under_the_worker_server_span(
    traced: dict[str, Any],
) -> None:
    seen = traced["seen"]
    assert seen["callback_items"] == [{"symbol": "ACME", "price": 1.5}]
    server = server_of(traced, client_of(traced, "root-callback"))
    (callback,) = [s for s in traced["spans"] if s["parent"] == server["span_id"]]
    assert callback["name"] == "kameo.callback trading.Quote"
    assert callback["kind"] == "SERVER"
    assert callback["pid"] == traced["parent_pid"]
    assert callback["trace_id"] == server["trace_id"]
    attrs = callback["attributes"]
    assert attrs["rpc.method"] == "trading.Quote"
    assert attrs["kameo.worker_id"] == server["attributes"]["kameo.worker_id"]
    assert attrs["process.pid"] == server["pid"]
    # The handler's span is the callback span's child: the callback span was current.
    (inner,) = children(traced["spans"], callback)
    assert inner["name"] == "inside-callback"
    # kameo.current_traceparent() names the innermost kameo span on each side.
    assert seen["worker_traceparent"].split("-")[2] == server["span_id"]
    assert seen["callback_traceparent"].split("-")[2] == callback["span_id"]


def points(traced: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = traced["seen"]["metrics"].get(metric, [])
    return found


def value(traced: dict[str, Any], metric: str, **attrs: Any) -> Any:
    got = [p["value"] for p in points(traced, metric) if p["attributes"] == attrs]
    assert len(got) == 1, (metric, attrs, points(traced, metric))
    return got[0]


def test_metrics_count_calls_errors_durations_crashes_and_retries(traced: dict[str, Any]) -> None:
    work = {"kameo.pool": "handlers.otel:work"}
    ask = {**work, "kameo.kind": "ask", "rpc.method": "handlers.otel:work"}
    assert value(traced, "kameo.calls", **ask) == 2
    assert value(traced, "kameo.call.duration", **ask) == 2  # the histogram's count
    assert value(traced, "kameo.errors", **ask, **{"error.type": "ValueError"}) == 1
    assert len(points(traced, "kameo.errors")) == 1
    stream = {"kameo.pool": "agens", "kameo.kind": "stream", "rpc.method": "handlers.otel:agen"}
    assert value(traced, "kameo.calls", **stream) == 1
    die = {**work, "kameo.kind": "call", "rpc.method": "handlers.otel:die_once"}
    assert value(traced, "kameo.calls", **die) == 1  # run twice, one call
    assert traced["seen"]["retried"] == "survived"
    assert value(traced, "kameo.crashes", **work) == 1
    assert value(traced, "kameo.retries", **work) == 1
    assert value(traced, "kameo.crashes", **{"kameo.pool": "agens"}) == 0


def test_kameo_never_imports_opentelemetry() -> None:
    code = (
        "import asyncio, sys, kameo\n"
        "async def main():\n"
        "    async with kameo.Pool('handlers.basic:echo') as pool:\n"
        "        assert await pool.ask(1) == 1\n"
        "        assert await pool.call('handlers.basic:echo', 2) == 2\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
