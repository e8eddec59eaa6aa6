"""Worker handlers that call parent callbacks (run inside kameo workers).

Most take ``{"path": "module.Type", "data": ..., "via": "module" | "handle"}``: ``"module"`` calls
``kameo.<module>.<Type>(data)``, ``"handle"`` calls ``await kameo.callback_handle(path, data)``.
No side effects at import time.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import kameo

RELEASE_WAIT = 20.0


def _stub(path: str) -> Any:
    module, _, name = path.partition(".")
    return getattr(getattr(kameo, module), name)


async def _open(msg: dict) -> Any:
    if msg.get("via") == "handle":
        return await kameo.callback_handle(msg["path"], msg.get("data"))
    return _stub(msg["path"])(msg.get("data"))


def _describe(items: list[Any]) -> dict[str, Any]:
    """The items, and their types as the worker sees them (decoded values, not wrappers)."""
    types = []
    for x in items:
        if isinstance(x, dict):
            types.append({k: type(v).__name__ for k, v in x.items()})
        else:
            types.append(type(x).__name__)
    return {"items": items, "types": types, "pid": os.getpid()}


def _error_report(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "is_value_error": isinstance(exc, ValueError),
        "is_remote_error": isinstance(exc, kameo.RemoteError),
        "is_callback_not_found": isinstance(exc, kameo.CallbackNotFound),
        "remote_type": getattr(exc, "remote_type", None),
        "message": str(exc),
        "traceback": getattr(exc, "remote_traceback", ""),
    }


# ----------------------------------------------------------------------------- collecting


async def execute_trade(order: dict) -> dict[str, Any]:
    """The example from the issue: iterate ``kameo.trading.DataFetch`` with ``async for``."""
    prices = []
    async for tick in kameo.trading.DataFetch({"symbol": order["symbol"]}):
        prices.append(tick["price"])
    it = await kameo.callback_handle("trading.DataFetch", {"symbol": order["symbol"]})
    again = [t["price"] async for t in it]
    return {"prices": prices, "again": again, "types": [type(p).__name__ for p in prices]}


def sync_trade(order: dict) -> dict[str, Any]:
    """A plain-def worker handler iterating with a normal ``for`` loop."""
    prices = []
    for tick in kameo.trading.DataFetch({"symbol": order["symbol"]}):
        prices.append(tick["price"])
    return {"prices": prices, "types": [type(p).__name__ for p in prices]}


async def collect(msg: dict) -> dict[str, Any]:
    it = await _open(msg)
    items = [x async for x in it]
    return _describe(items)


def collect_sync(msg: dict) -> dict[str, Any]:
    items = list(_stub(msg["path"])(msg.get("data")))
    return _describe(items)


def shared_data_sync(msg: dict) -> dict[str, Any]:
    """Call with data that shares a list (and that this frame holds too), then with data that
    cannot be encoded; report what came back and the error."""
    shared = [1, 2]
    data = {"a": shared, "b": shared}
    items = list(_stub(msg["path"])(data))
    try:
        list(_stub(msg["path"])({"bad": object()}))
    except kameo.SerializationError as exc:
        return {"items": items, "error": str(exc)}
    return {"items": items, "error": None}


async def fan_out(msg: dict) -> list[Any]:
    """``msg["count"]`` concurrent callbacks in one request, each with its own argument."""

    async def one(k: int) -> list[Any]:
        if k % 2:
            it = await kameo.callback_handle(msg["path"], {"k": k, "n": msg["n"]})
        else:
            it = _stub(msg["path"])({"k": k, "n": msg["n"]})
        return [x async for x in it]

    return list(await asyncio.gather(*(one(k) for k in range(msg["count"]))))


# ----------------------------------------------------------------------------- errors


async def catch_error(msg: dict) -> dict[str, Any]:
    items: list[Any] = []
    try:
        async for x in await _open(msg):
            items.append(x)
    except Exception as exc:
        return {"items": items, **_error_report(exc)}
    return {"items": items, "type": None}


def catch_error_sync(msg: dict) -> dict[str, Any]:
    items: list[Any] = []
    try:
        for x in _stub(msg["path"])(msg.get("data")):
            items.append(x)
    except Exception as exc:
        return {"items": items, **_error_report(exc)}
    return {"items": items, "type": None}


async def uncaught(msg: dict) -> list[Any]:
    return [x async for x in await _open(msg)]


def uncaught_sync(msg: dict) -> list[Any]:
    return list(_stub(msg["path"])(msg.get("data")))


async def probe_unknown(msg: dict) -> dict[str, Any]:
    """What each kind of unknown callback path raises, as the handler sees it."""
    report: dict[str, Any] = {}
    try:
        it = await kameo.callback_handle("nope.Missing", {"x": 1})
        report["handle"] = {"type": None, "items": [x async for x in it]}
    except Exception as exc:
        report["handle"] = _error_report(exc)
    try:
        kameo.nope  # noqa: B018
        report["module"] = {"type": None}
    except AttributeError as exc:
        report["module"] = _error_report(exc)
    try:
        kameo.trading.Missing  # noqa: B018
        report["type"] = {"type": None}
    except AttributeError as exc:
        report["type"] = _error_report(exc)
    try:
        report["known_ok"] = [x async for x in kameo.trading.DataFetch({"symbol": "X"})][:1]
    except Exception as exc:
        report["known_ok"] = _error_report(exc)
    return report


def probe_unknown_sync(msg: dict) -> dict[str, Any]:
    """``probe_unknown`` from a sync handler (the blocking serving loop)."""
    report: dict[str, Any] = {}
    for key, probe in (
        ("handle", lambda: list(kameo.callback_handle("nope.Missing", {"x": 1}))),
        ("module", lambda: kameo.nope.Missing),
        ("type", lambda: kameo.trading.Missing),
    ):
        try:
            probe()
            report[key] = {"type": None}
        except Exception as exc:
            report[key] = _error_report(exc)
    return report


def probe_attributes(msg: dict) -> dict[str, Any]:
    """How ordinary attribute probing of ``kameo`` behaves inside a worker."""
    report: dict[str, Any] = {
        "hasattr_module": hasattr(kameo, "nothere"),
        "hasattr_type": hasattr(kameo.trading, "Nope"),
        "getattr_default": getattr(kameo, "nothere", "default"),
        "hasattr_known": hasattr(kameo.trading, "DataFetch"),
    }
    for key, probe in (
        ("dunder", lambda: kameo.__wrapped__),
        ("private", lambda: kameo._nothere),
        ("type_dunder", lambda: kameo.trading.__wrapped__),
        ("type_private", lambda: kameo.trading._nothere),
    ):
        try:
            probe()
            report[key] = {"type": None}
        except AttributeError as exc:
            report[key] = _error_report(exc)
    try:
        exec("from kameo import nothere", {})
        report["from_import"] = None
    except ImportError as exc:
        report["from_import"] = type(exc).__name__
    return report


def handle_for_sync(msg: dict) -> dict[str, Any]:
    """``for`` over ``kameo.callback_handle(...)`` in a sync handler."""
    items = [x for x in kameo.callback_handle(msg["path"], msg.get("data"))]
    return _describe(items)


async def handle_async(msg: dict) -> dict[str, Any]:
    """``kameo.callback_handle(...)`` awaited, and iterated without ``await``."""
    awaited = [x async for x in await kameo.callback_handle(msg["path"], msg.get("data"))]
    direct = [x async for x in kameo.callback_handle(msg["path"], msg.get("data"))]
    return {"awaited": awaited, "direct": direct}


# ----------------------------------------------------------------------------- early exit


async def _await_release(path: str | None) -> None:
    if path:
        deadline = time.monotonic() + RELEASE_WAIT
        while not os.path.exists(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def _wait_release(path: str | None) -> None:
    if path:
        deadline = time.monotonic() + RELEASE_WAIT
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)


async def break_after(msg: dict) -> list[Any]:
    """Take ``k`` items, break, then (optionally) keep working until ``release`` exists."""
    items = []
    async for x in await _open(msg):
        items.append(x)
        if len(items) >= msg["k"]:
            break
    await _await_release(msg.get("release"))
    return items


def break_after_sync(msg: dict) -> list[Any]:
    items = []
    for x in _stub(msg["path"])(msg.get("data")):
        items.append(x)
        if len(items) >= msg["k"]:
            break
    _wait_release(msg.get("release"))
    return items


def next_then_drop_sync(msg: dict) -> list[Any]:
    """Take ``k`` items, the first with ``next()`` and the rest with ``for``, then drop the call
    (the loop's break alone does not: the call is still referenced) and (optionally) keep
    working until ``release`` exists."""
    call = _stub(msg["path"])(msg.get("data"))
    items = [next(call)]
    for x in call:
        items.append(x)
        if len(items) >= msg["k"]:
            break
    del call
    _wait_release(msg.get("release"))
    return items


async def drain(msg: dict) -> int:
    """Iterate the whole (possibly endless) callback stream."""
    n = 0
    async for _ in await _open(msg):
        n += 1
    return n


def drain_sync(msg: dict) -> int:
    n = 0
    for _ in _stub(msg["path"])(msg.get("data")):
        n += 1
    return n


# ----------------------------------------------------------------------------- tracing


async def trace(msg: dict) -> dict[str, Any]:
    items = [x async for x in kameo.trace.Probe(None)]
    return {"worker": kameo.current_traceparent(), "parent": items}


def trace_sync(msg: dict) -> dict[str, Any]:
    items = list(kameo.trace.Probe(None))
    return {"worker": kameo.current_traceparent(), "parent": items}


async def echo_round_trips(msg: dict) -> dict[str, Any]:
    """``msg["n"]`` sequential one-item callbacks to ``bench.Echo``; also how many times the
    worker waited for an item outside its event loop (its fast path, see AsyncServer.wait_here)."""
    from kameo import _runtime

    got = []
    for i in range(msg["n"]):
        async for item in kameo.bench.Echo({"i": i}):
            got.append(item["i"])
    server = _runtime.current().server  # type: ignore[union-attr]
    return {"items": got, "here_waits": server.here_waits, "direct": server.direct is not None}
