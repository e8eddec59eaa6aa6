"""Callbacks: worker handlers calling parent-side handlers registered in ``kameo.Callbacks``.

Parent handlers are closures defined in each test, so the test can see when they start and when
their ``finally`` runs; every wait on such a flag is bounded.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import kameo
import pytest
from conftest import async_wait_until

MOD = "handlers.callers"
BOUND = 10.0  # generous bound for anything that must happen "promptly"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MAIN_THREAD = threading.main_thread().ident


def _target(name: str) -> str:
    return f"{MOD}:{name}"


class TickError(Exception):
    """A non-built-in exception raised by a parent handler."""


class Tracker:
    """Observes a parent handler: how many runs started, and how many ran their ``finally``."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.starts = 0
        self.finals = 0
        self.items = 0
        self.data: list[Any] = []

    def endless(self, delay: float = 0.02) -> Any:
        async def endless_feed(data: Any) -> Any:
            self.starts += 1
            self.data.append(data)
            try:
                i = 0
                while True:
                    yield {"i": i}
                    self.items += 1
                    self.started.set()
                    i += 1
                    await asyncio.sleep(delay)
            finally:
                self.finals += 1

        return endless_feed

    async def wait_finally(self, what: str, n: int = 1) -> None:
        ok = await async_wait_until(lambda: self.finals >= n, BOUND)
        assert ok, f"the parent handler's finally did not run within {BOUND}s after {what}"


def _ticks() -> kameo.Callbacks:
    callbacks = kameo.Callbacks()

    @callbacks.handler("trading.DataFetch")
    async def data_fetch(req: dict) -> Any:
        assert req["symbol"]
        for i in range(10):
            yield {"price": 150.0 + i}

    return callbacks


# --------------------------------------------------------------------------- the example


async def test_execute_trade_example():
    seen: list[Any] = []
    callbacks = kameo.Callbacks()

    @callbacks.handler("trading.DataFetch")
    async def data_fetch(req: dict) -> Any:
        seen.append(req)
        for i in range(10):
            yield {"price": 150.0 + i}

    async with kameo.Pool(_target("execute_trade"), size=2, callbacks=callbacks) as pool:
        result = await asyncio.wait_for(pool.ask({"symbol": "AAPL"}), BOUND)
    expected = [150.0 + i for i in range(10)]
    assert result["prices"] == expected
    assert result["again"] == expected
    assert result["types"] == ["float"] * 10
    assert seen == [{"symbol": "AAPL"}, {"symbol": "AAPL"}]


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_sync_worker_handler_iterates_with_for(max_concurrency: int):
    # max_concurrency=1: the blocking serving loop; 2: a thread pool behind an event loop.
    async with kameo.Pool(
        _target("sync_trade"), size=1, max_concurrency=max_concurrency, callbacks=_ticks()
    ) as pool:
        result = await asyncio.wait_for(pool.ask({"symbol": "MSFT"}), BOUND)
    assert result["prices"] == [150.0 + i for i in range(10)]
    assert result["types"] == ["float"] * 10


# --------------------------------------------------------------------------- handler kinds


def _kind_callbacks() -> kameo.Callbacks:
    """`kinds.<Kind>` for each kind of parent handler; items carry typed values."""
    callbacks = kameo.Callbacks()

    @callbacks.handler("kinds.AsyncGen")
    async def async_gen(data: dict) -> Any:
        for i in range(3):
            await asyncio.sleep(0)
            yield {"i": i, "x": data["x"], "blob": b"\x00\xff", "pair": (i, "a"), "none": None}

    async def coroutine(data: dict) -> Any:
        await asyncio.sleep(0)
        return {"i": 0, "x": data["x"], "flag": True}

    def plain(data: dict) -> Any:
        return {"i": 0, "x": data["x"], "off_main": threading.get_ident() != MAIN_THREAD}

    def sync_gen(data: dict) -> Any:
        for i in range(3):
            yield {"i": i, "x": data["x"], "off_main": threading.get_ident() != MAIN_THREAD}

    callbacks.register("kinds.Coroutine", coroutine)
    callbacks.register("kinds.Plain", plain)
    callbacks.register("kinds.SyncGen", sync_gen)
    return callbacks


KIND_EXPECTED = {
    "AsyncGen": [
        {"i": i, "x": 1.5, "blob": b"\x00\xff", "pair": (i, "a"), "none": None} for i in range(3)
    ],
    "Coroutine": [{"i": 0, "x": 1.5, "flag": True}],
    "Plain": [{"i": 0, "x": 1.5, "off_main": True}],
    "SyncGen": [{"i": i, "x": 1.5, "off_main": True} for i in range(3)],
}
KIND_TYPES = {
    "AsyncGen": {"i": "int", "x": "float", "blob": "bytes", "pair": "tuple", "none": "NoneType"},
    "Coroutine": {"i": "int", "x": "float", "flag": "bool"},
    "Plain": {"i": "int", "x": "float", "off_main": "bool"},
    "SyncGen": {"i": "int", "x": "float", "off_main": "bool"},
}


@pytest.mark.parametrize("kind", sorted(KIND_EXPECTED))
@pytest.mark.parametrize("via", ["module", "handle"])
async def test_parent_handler_kinds_async_worker(kind: str, via: str):
    msg = {"path": f"kinds.{kind}", "data": {"x": 1.5}, "via": via}
    async with kameo.Pool(_target("collect"), size=1, callbacks=_kind_callbacks()) as pool:
        result = await asyncio.wait_for(pool.ask(msg), BOUND)
    assert result["items"] == KIND_EXPECTED[kind]
    assert result["types"] == [KIND_TYPES[kind]] * len(KIND_EXPECTED[kind])


@pytest.mark.parametrize("kind", sorted(KIND_EXPECTED))
async def test_parent_handler_kinds_sync_worker(kind: str):
    msg = {"path": f"kinds.{kind}", "data": {"x": 1.5}}
    async with kameo.Pool(_target("collect_sync"), size=1, callbacks=_kind_callbacks()) as pool:
        result = await asyncio.wait_for(pool.ask(msg), BOUND)
    assert result["items"] == KIND_EXPECTED[kind]
    assert result["types"] == [KIND_TYPES[kind]] * len(KIND_EXPECTED[kind])


@pytest.mark.parametrize("target", ["collect", "collect_sync"])
async def test_long_callback_stream_is_credited(target: str):
    # A window of 4: the parent handler stops after 4 items until the worker credits them.
    callbacks = kameo.Callbacks()

    @callbacks.handler("feed.Many")
    async def many(n: int) -> Any:
        for i in range(n):
            yield i

    msg = {"path": "feed.Many", "data": 200}
    async with kameo.Pool(_target(target), size=1, callbacks=callbacks, stream_window=4) as pool:
        result = await asyncio.wait_for(pool.ask(msg), BOUND)
    assert result["items"] == list(range(200))


async def test_callback_data_keeps_shared_values_and_names_what_cannot_be_sent():
    callbacks = kameo.Callbacks()

    @callbacks.handler("data.Echo")
    async def echo(data: dict) -> Any:
        return {"shared": data["a"] is data["b"], "a": data["a"]}

    async with kameo.Pool(_target("shared_data_sync"), size=1, callbacks=callbacks) as pool:
        result = await asyncio.wait_for(pool.ask({"path": "data.Echo"}), BOUND)
    assert result["items"] == [{"shared": True, "a": [1, 2]}]
    assert result["error"] is not None
    assert result["error"].startswith("callback data[1]['bad']: "), result["error"]


# --------------------------------------------------------------------------- concurrency


async def test_fifty_concurrent_callbacks_in_one_ask():
    running = 0
    peak = 0
    callbacks = kameo.Callbacks()

    @callbacks.handler("fan.Out")
    async def fan_out(data: dict) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            for j in range(data["n"]):
                await asyncio.sleep(0.005)
                yield [data["k"], j]
        finally:
            running -= 1

    msg = {"path": "fan.Out", "count": 50, "n": 8}
    async with kameo.Pool(_target("fan_out"), size=1, callbacks=callbacks) as pool:
        results = await asyncio.wait_for(pool.ask(msg), 30.0)
    assert len(results) == 50
    for k, items in enumerate(results):
        assert items == [[k, j] for j in range(8)], f"callback {k} got another's items"
    assert peak > 1, "the 50 callbacks of one request never ran concurrently in the parent"
    assert running == 0


@pytest.mark.parametrize(
    ("target", "size", "max_concurrency"),
    [("collect", 2, 4), ("collect_sync", 2, 1), ("collect_sync", 1, 3)],
)
async def test_callbacks_across_concurrent_asks(target: str, size: int, max_concurrency: int):
    callbacks = kameo.Callbacks()

    @callbacks.handler("per.Ask")
    async def per_ask(data: dict) -> Any:
        for j in range(5):
            await asyncio.sleep(0.002)
            yield {"key": data["key"], "j": j}

    async with kameo.Pool(
        _target(target), size=size, max_concurrency=max_concurrency, callbacks=callbacks
    ) as pool:
        asks = [pool.ask({"path": "per.Ask", "data": {"key": f"k{n}"}}) for n in range(40)]
        results = await asyncio.wait_for(asyncio.gather(*asks), 30.0)
    for n, result in enumerate(results):
        assert result["items"] == [{"key": f"k{n}", "j": j} for j in range(5)]


# --------------------------------------------------------------------------- errors


def _failing_callbacks() -> kameo.Callbacks:
    callbacks = kameo.Callbacks()

    @callbacks.handler("bad.Gen")
    async def failing_ticks(data: Any) -> Any:
        yield {"price": 1.0}
        yield {"price": 2.0}
        raise ValueError("bad tick from the parent")

    def failing_plain(data: Any) -> Any:
        raise ValueError("bad tick from the parent")

    async def failing_custom(data: Any) -> Any:
        raise TickError("custom tick failure")

    callbacks.register("bad.Plain", failing_plain)
    callbacks.register("bad.Custom", failing_custom)
    return callbacks


@pytest.mark.parametrize(
    ("path", "fn_name", "items"),
    [
        ("bad.Gen", "failing_ticks", [{"price": 1.0}, {"price": 2.0}]),
        ("bad.Plain", "failing_plain", []),
    ],
)
@pytest.mark.parametrize("target", ["catch_error", "catch_error_sync"])
async def test_parent_error_is_typed_in_worker(target: str, path: str, fn_name: str, items: list):
    msg = {"path": path, "data": None}
    async with kameo.Pool(_target(target), size=1, callbacks=_failing_callbacks()) as pool:
        report = await asyncio.wait_for(pool.ask(msg), BOUND)
    assert report["items"] == items, "items yielded before the error must arrive first"
    assert report["is_value_error"], report
    assert report["is_remote_error"], report
    assert report["remote_type"] == "builtins.ValueError"
    assert "bad tick from the parent" in report["message"]
    assert fn_name in report["traceback"], report["traceback"]


async def test_parent_custom_error_in_worker():
    msg = {"path": "bad.Custom", "data": None}
    async with kameo.Pool(_target("catch_error"), size=1, callbacks=_failing_callbacks()) as pool:
        report = await asyncio.wait_for(pool.ask(msg), BOUND)
    assert report["is_remote_error"]
    assert not report["is_value_error"]
    assert report["remote_type"].endswith("TickError")
    assert "custom tick failure" in report["message"]
    assert "failing_custom" in report["traceback"]


@pytest.mark.parametrize("target", ["uncaught", "uncaught_sync"])
async def test_uncaught_parent_error_reaches_ask(target: str):
    msg = {"path": "bad.Gen", "data": None}
    async with kameo.Pool(_target(target), size=1, callbacks=_failing_callbacks()) as pool:
        with pytest.raises(kameo.RemoteError) as info:
            await asyncio.wait_for(pool.ask(msg), BOUND)
        err = info.value
        assert isinstance(err, ValueError)
        assert err.remote_type == "builtins.ValueError"
        assert "bad tick from the parent" in err.remote_message
        # The parent handler's frame is in the traceback that reaches the caller.
        assert "failing_ticks" in err.remote_traceback
        assert "failing_ticks" in str(err)


async def test_uncaught_parent_error_keeps_pool_usable():
    callbacks = _failing_callbacks()
    callbacks.register("good.Feed", lambda data: {"ok": data})
    async with kameo.Pool(_target("uncaught"), size=1, callbacks=callbacks) as pool:
        with pytest.raises(ValueError):
            await asyncio.wait_for(pool.ask({"path": "bad.Plain", "data": 1}), BOUND)
        got = await asyncio.wait_for(pool.ask({"path": "good.Feed", "data": 7}), BOUND)
    assert got == [{"ok": 7}]


# --------------------------------------------------------------------------- unknown paths


async def test_unknown_callback_paths():
    async with kameo.Pool(_target("probe_unknown"), size=1, callbacks=_ticks()) as pool:
        report = await asyncio.wait_for(pool.ask(None), BOUND)
    handle = report["handle"]
    assert handle["is_callback_not_found"], handle
    assert "nope.Missing" in handle["message"]
    assert "LookupError" in handle["mro"]
    # The module style raises the same CallbackNotFound (an AttributeError too), naming what
    # is registered.
    for key in ("module", "type"):
        report[key].pop("traceback")
        assert report[key]["type"] == "CallbackNotFound", report[key]
        assert report[key]["is_callback_not_found"], report[key]
        assert {"LookupError", "AttributeError", "KameoError"} <= set(report[key]["mro"])
        assert "registered: trading.DataFetch" in report[key]["message"], report[key]
    assert "nope" in report["module"]["message"]
    assert "trading.Missing" in report["type"]["message"]
    assert report["type"]["message"] == handle["message"].replace("nope.Missing", "trading.Missing")
    assert report["known_ok"] == [{"price": 150.0}]


async def test_unknown_callback_paths_in_sync_worker():
    async with kameo.Pool(_target("probe_unknown_sync"), size=1, callbacks=_ticks()) as pool:
        report = await asyncio.wait_for(pool.ask(None), BOUND)
    for key in ("handle", "module", "type"):
        assert report[key]["type"] == "CallbackNotFound", report[key]
        assert {"LookupError", "AttributeError"} <= set(report[key]["mro"]), report[key]
        assert "registered: trading.DataFetch" in report[key]["message"], report[key]
    assert "nope.Missing" in report["handle"]["message"]
    assert "trading.Missing" in report["type"]["message"]


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_attribute_probes_in_a_worker_stay_plain(max_concurrency: int):
    async with kameo.Pool(
        _target("probe_attributes"), size=1, max_concurrency=max_concurrency, callbacks=_ticks()
    ) as pool:
        report = await asyncio.wait_for(pool.ask(None), BOUND)
    assert report["hasattr_module"] is False
    assert report["hasattr_type"] is False
    assert report["getattr_default"] == "default"
    assert report["hasattr_known"] is True
    assert report["from_import"] == "ImportError"
    for key in ("dunder", "private", "type_dunder", "type_private"):
        assert report[key]["type"] == "AttributeError", report[key]
        assert not report[key]["is_callback_not_found"], report[key]


def test_unknown_attribute_outside_a_worker_is_a_plain_attribute_error():
    with pytest.raises(AttributeError) as info:
        kameo.nothere  # noqa: B018
    assert type(info.value) is AttributeError
    assert not hasattr(kameo, "nothere")
    with pytest.raises(kameo.KameoError, match="inside a kameo worker"):
        kameo.callback_handle("trading.DataFetch")


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_callback_handle_iterates_with_for_in_a_sync_handler(max_concurrency: int):
    msg = {"path": "kinds.SyncGen", "data": {"x": 1.5}}
    async with kameo.Pool(
        _target("handle_for_sync"),
        size=1,
        max_concurrency=max_concurrency,
        callbacks=_kind_callbacks(),
    ) as pool:
        result = await asyncio.wait_for(pool.ask(msg), BOUND)
    assert result["items"] == KIND_EXPECTED["SyncGen"]


async def test_callback_handle_awaited_or_not_in_an_async_handler():
    msg = {"path": "kinds.AsyncGen", "data": {"x": 1.5}}
    async with kameo.Pool(_target("handle_async"), size=1, callbacks=_kind_callbacks()) as pool:
        result = await asyncio.wait_for(pool.ask(msg), BOUND)
    assert result["awaited"] == KIND_EXPECTED["AsyncGen"]
    assert result["direct"] == KIND_EXPECTED["AsyncGen"]


# --------------------------------------------------------------------------- registration


def test_register_validates_paths():
    callbacks = kameo.Callbacks()
    for bad in [
        "",
        "trading",
        "trading.",
        ".DataFetch",
        "a.b.c",
        "1x.Type",
        "trading.Data-Fetch",
        "trading.Data Fetch",
        "trading:DataFetch",
    ]:
        with pytest.raises(ValueError):
            callbacks.register(bad, lambda data: data)
    assert len(callbacks) == 0

    def fetch(data: Any) -> Any:
        return data

    callbacks.register("trading.DataFetch", fetch)
    with pytest.raises(ValueError, match=r"trading\.DataFetch"):
        callbacks.register("trading.DataFetch", lambda data: data)
    with pytest.raises(ValueError):

        @callbacks.handler("trading.DataFetch")
        def again(data: Any) -> Any:
            return data

    assert callbacks.get("trading.DataFetch") is not None
    assert callbacks.get("trading.DataFetch")[0] is fetch  # the first registration stays
    assert "trading.DataFetch" in callbacks
    assert callbacks.paths == ["trading.DataFetch"]

    @callbacks.handler("weather.CurrentConditions")
    async def conditions(data: Any) -> Any:
        return data

    assert conditions.__name__ == "conditions"  # the decorator returns the function
    assert list(callbacks) == ["trading.DataFetch", "weather.CurrentConditions"]


def test_register_refuses_non_callable_and_reserved_names():
    callbacks = kameo.Callbacks()
    with pytest.raises(TypeError):
        callbacks.register("trading.Price", 42)  # type: ignore[arg-type]
    # `kameo.pool` and friends are kameo's own API: a callback module may not shadow them.
    for reserved in ["pool.Thing", "errors.Thing", "callbacks.Thing", "_private.Thing"]:
        with pytest.raises(ValueError):
            callbacks.register(reserved, lambda data: data)


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("target", ["break_after", "break_after_sync", "next_then_drop_sync"])
async def test_break_in_worker_cancels_parent_handler(target: str):
    tracker = Tracker()
    callbacks = kameo.Callbacks()
    callbacks.register("feed.Endless", tracker.endless())
    msg = {"path": "feed.Endless", "data": None, "k": 3}
    async with kameo.Pool(_target(target), size=1, callbacks=callbacks) as pool:
        got = await asyncio.wait_for(pool.ask(msg), BOUND)
        assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
        await tracker.wait_finally("the worker broke out of its loop")


@pytest.mark.parametrize("target", ["break_after", "break_after_sync", "next_then_drop_sync"])
async def test_break_in_worker_cancels_parent_handler_before_request_ends(
    target: str, tmp_path: Path
):
    # After the break the worker handler keeps running (until `release` exists): the parent
    # handler must be cancelled by the break itself, not only when the request ends.
    tracker = Tracker()
    callbacks = kameo.Callbacks()
    callbacks.register("feed.Endless", tracker.endless())
    release = tmp_path / "release"
    msg = {"path": "feed.Endless", "data": None, "k": 3, "release": str(release)}
    async with kameo.Pool(_target(target), size=1, callbacks=callbacks) as pool:
        ask = asyncio.create_task(pool.ask(msg))
        try:
            cancelled = await async_wait_until(lambda: tracker.finals >= 1, 3.0)
            still_running = not ask.done()
        finally:
            release.write_text("go")
        got = await asyncio.wait_for(ask, BOUND)
        assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert still_running, "the worker handler returned before it was released"
        assert cancelled, (
            "the parent handler was still running 3 s after the worker broke out of its loop "
            "(while the request went on)"
        )


@pytest.mark.parametrize("target", ["drain", "drain_sync"])
async def test_worker_killed_mid_callback_cancels_parent_handler(target: str):
    tracker = Tracker()
    callbacks = kameo.Callbacks()
    callbacks.register("feed.Endless", tracker.endless())
    msg = {"path": "feed.Endless", "data": None}
    async with kameo.Pool(_target(target), size=1, callbacks=callbacks) as pool:
        pid = pool.workers[0].pid
        ask = asyncio.create_task(pool.ask(msg))
        await asyncio.wait_for(tracker.started.wait(), BOUND)
        assert tracker.finals == 0
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(kameo.WorkerCrashed):
            await asyncio.wait_for(ask, BOUND)
        await tracker.wait_finally("the worker was killed")


@pytest.mark.parametrize("target", ["drain", "drain_sync"])
async def test_cancelled_ask_cancels_parent_handler(target: str):
    tracker = Tracker()
    callbacks = kameo.Callbacks()
    callbacks.register("feed.Endless", tracker.endless())
    callbacks.register("feed.Finite", lambda data: data)
    async with kameo.Pool(_target(target), size=1, callbacks=callbacks) as pool:
        ask = asyncio.create_task(pool.ask({"path": "feed.Endless", "data": None}))
        await asyncio.wait_for(tracker.started.wait(), BOUND)
        ask.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ask
        await tracker.wait_finally("the asking task was cancelled")
        # The worker is free for the next request.
        n = await asyncio.wait_for(pool.ask({"path": "feed.Finite", "data": 1}), BOUND)
        assert n == 1


async def test_cancelled_sync_handler_in_a_handler_thread_stops_waiting_for_its_callback():
    # The async server runs a sync handler in a handler thread, which waits on the loop for
    # the callback's next item: cancelling the ask must end that wait (the handler stops),
    # or the thread is lost for good. More cancellations than the worker has threads, then an
    # ask that needs one.
    tracker = Tracker()
    callbacks = kameo.Callbacks()
    callbacks.register("feed.Endless", tracker.endless())
    callbacks.register("feed.Finite", lambda data: data)
    async with kameo.Pool(
        _target("drain_sync"), size=1, max_concurrency=2, callbacks=callbacks
    ) as pool:
        for n in range(1, 4):
            ask = asyncio.create_task(pool.ask({"path": "feed.Endless", "data": None}))
            ok = await async_wait_until(lambda: tracker.starts >= n, BOUND)  # noqa: B023
            assert ok, f"ask {n} did not start: its worker has no free handler thread"
            ask.cancel()
            with pytest.raises(asyncio.CancelledError):
                await ask
            await tracker.wait_finally("the asking task was cancelled", n)
        n = await asyncio.wait_for(pool.ask({"path": "feed.Finite", "data": 1}), BOUND)
        assert n == 1


@pytest.mark.parametrize("target", ["drain", "drain_sync"])
async def test_timed_out_ask_cancels_parent_handler(target: str):
    tracker = Tracker()
    callbacks = kameo.Callbacks()
    callbacks.register("feed.Endless", tracker.endless())
    callbacks.register("feed.Finite", lambda data: data)
    async with kameo.Pool(_target(target), size=1, callbacks=callbacks) as pool:
        with pytest.raises(kameo.CallTimeout):
            await asyncio.wait_for(
                pool.ask({"path": "feed.Endless", "data": None}, timeout=0.5), BOUND
            )
        assert tracker.starts == 1
        await tracker.wait_finally("the ask timed out")
        n = await asyncio.wait_for(pool.ask({"path": "feed.Finite", "data": 1}), BOUND)
        assert n == 1


# --------------------------------------------------------------------------- traceparent


def _trace_callbacks(kind: str) -> kameo.Callbacks:
    callbacks = kameo.Callbacks()
    if kind == "asyncgen":

        async def probe(data: Any) -> Any:
            await asyncio.sleep(0)
            yield {"trace": kameo.current_traceparent()}

        callbacks.register("trace.Probe", probe)
    else:

        def probe_sync(data: Any) -> Any:
            return {"trace": kameo.current_traceparent()}

        callbacks.register("trace.Probe", probe_sync)
    return callbacks


@pytest.mark.parametrize("kind", ["asyncgen", "sync"])
@pytest.mark.parametrize("target", ["trace", "trace_sync"])
async def test_traceparent_reaches_worker_and_parent_callback(target: str, kind: str):
    async with kameo.Pool(_target(target), size=1, callbacks=_trace_callbacks(kind)) as pool:
        traced = await asyncio.wait_for(pool.ask(None, traceparent=TRACEPARENT), BOUND)
        untraced = await asyncio.wait_for(pool.ask(None), BOUND)
    assert traced == {"worker": TRACEPARENT, "parent": [{"trace": TRACEPARENT}]}
    assert untraced == {"worker": None, "parent": [{"trace": None}]}
    assert kameo.current_traceparent() is None  # nothing leaked into the test's context


async def test_traceparent_on_stream_and_concurrent_asks_do_not_mix():
    async with kameo.Pool(
        _target("trace"), size=1, max_concurrency=4, callbacks=_trace_callbacks("asyncgen")
    ) as pool:
        parents = [f"00-{i:032x}-{i:016x}-01" for i in range(1, 9)]
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.ask(None, traceparent=tp) for tp in parents)), BOUND
        )
    for tp, result in zip(parents, results, strict=True):
        assert result == {"worker": tp, "parent": [{"trace": tp}]}


# --------------------------------------------------------------------------- None items


@pytest.mark.parametrize("kind", ["asyncgen", "async", "sync"])
async def test_parent_handler_yielding_none(kind: str):
    # None is an ordinary value: a callback item that is None must reach the worker as None.
    callbacks = kameo.Callbacks()
    if kind == "asyncgen":

        async def nones(data: Any) -> Any:
            yield None
            yield 1
            yield None

        callbacks.register("nil.Value", nones)
        expected: list[Any] = [None, 1, None]
    elif kind == "async":

        async def none_async(data: Any) -> Any:
            return None

        callbacks.register("nil.Value", none_async)
        expected = [None]
    else:
        callbacks.register("nil.Value", lambda data: None)
        expected = [None]
    async with kameo.Pool(_target("collect"), size=1, callbacks=callbacks) as pool:
        result = await asyncio.wait_for(pool.ask({"path": "nil.Value", "data": None}), BOUND)
    assert result["items"] == expected


# ------------------------------------------------- parent handlers start eagerly, inside a task


async def test_parent_handler_first_step_runs_in_its_own_task_and_context():
    # Handlers start eagerly (their first step runs in the callback that read the request):
    # current_task() is the task that runs the rest of the handler, asyncio.timeout() and
    # TaskGroup work from the first line, and a context variable one handler sets is not seen
    # by the next.
    seen: list[Any] = []
    mark: contextvars.ContextVar[int | None] = contextvars.ContextVar("mark", default=None)
    callbacks = kameo.Callbacks()

    @callbacks.handler("probe.Task")
    async def probe(data: Any) -> Any:
        before = mark.get()
        mark.set(data["i"])
        task = asyncio.current_task()
        assert task is not None
        async with asyncio.timeout(BOUND):
            if data["i"] % 2:  # half of them wait, so the rest runs on in the task
                async with asyncio.TaskGroup() as group:
                    group.create_task(asyncio.sleep(0.001))
                await asyncio.sleep(0)
        seen.append((before, asyncio.current_task() is task, mark.get() == data["i"]))
        return data["i"]

    async with kameo.Pool(_target("collect"), size=1, callbacks=callbacks) as pool:
        for i in range(6):
            msg = {"path": "probe.Task", "data": {"i": i}}
            result = await asyncio.wait_for(pool.ask(msg), BOUND)
            assert result["items"] == [i]
    assert seen == [(None, True, True)] * 6


async def test_callbacks_served_while_an_ask_is_awaited_directly_run_as_from_the_loop():
    # An ask awaited directly (no wait_for, nothing else to run) serves the worker's callbacks
    # while it waits for its answer: the handlers still run in tasks of their own, never in
    # the awaiting one, each in its own context, and the awaiting task is current again after.
    me = asyncio.current_task()
    seen: list[Any] = []
    mark: contextvars.ContextVar[int | None] = contextvars.ContextVar("mark2", default=None)
    callbacks = kameo.Callbacks()

    @callbacks.handler("probe.Task")
    async def probe(data: Any) -> Any:
        before = mark.get()
        mark.set(data["i"])
        task = asyncio.current_task()
        seen.append((before, task is not None and task is not me))
        return data["i"]

    async with kameo.Pool(_target("collect"), size=1, callbacks=callbacks) as pool:
        waits = pool._answer_waits
        for i in range(6):
            await asyncio.sleep(0.01)  # nothing else to run when the ask is awaited
            result = await pool.ask({"path": "probe.Task", "data": {"i": i}})
            assert asyncio.current_task() is me
            assert result["items"] == [i]
        assert pool._answer_waits > waits
    assert seen == [(None, True)] * 6


async def test_handlers_that_ask_another_pool_from_their_first_step_wait_through_the_loop():
    # A handler's first step runs inside the read of the worker's frames (here, inside the
    # direct wait of the outer ask): an ask it awaits there waits through the loop, never
    # directly, so that it holds up neither the rest of that read nor the tasks around it.
    # Concurrent relays therefore overlap.
    callbacks = kameo.Callbacks()

    async with kameo.Pool("handlers.basic:cmd", size=2) as other:

        @callbacks.handler("probe.Relay")
        async def relay(data: Any) -> Any:
            return await other.ask({"op": "sleep", "seconds": 0.3, "value": data["i"]})

        async with kameo.Pool(_target("collect"), size=2, callbacks=callbacks) as pool:
            await asyncio.sleep(0.01)  # nothing else to run: the outer ask waits directly
            result = await pool.ask({"path": "probe.Relay", "data": {"i": 0}}, timeout=BOUND)
            assert result["items"] == [0]
            assert pool._answer_waits > 0
            assert other._answer_waits == 0
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(
                    pool.ask({"path": "probe.Relay", "data": {"i": i}}, timeout=BOUND)
                    for i in range(2)
                )
            )
            elapsed = time.monotonic() - t0
    assert [r["items"] for r in results] == [[0], [1]]
    assert elapsed < 0.55, f"two 0.3 s relays took {elapsed:.2f} s: they ran one after the other"


async def test_parent_handler_timeout_in_first_step_fires():
    # asyncio.timeout() entered in the eager first step cancels the handler's own task.
    outcome: list[str] = []
    callbacks = kameo.Callbacks()

    @callbacks.handler("probe.Slow")
    async def slow(data: Any) -> Any:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(BOUND)
        except TimeoutError:
            outcome.append("timed out")
            return "timed out"
        return "slept"

    async with kameo.Pool(_target("collect"), size=1, callbacks=callbacks) as pool:
        result = await asyncio.wait_for(pool.ask({"path": "probe.Slow"}), BOUND)
    assert result["items"] == ["timed out"]
    assert outcome == ["timed out"]


async def test_cancelled_ask_cancels_parent_handler_waiting_since_first_step():
    # A coroutine handler that waits from its first step on gets CancelledError where it
    # waits, and runs its finally, when the ask that made the callback is cancelled.
    tracker = Tracker()
    callbacks = kameo.Callbacks()

    @callbacks.handler("probe.Wait")
    async def wait(data: Any) -> Any:
        tracker.starts += 1
        tracker.started.set()
        try:
            await asyncio.sleep(BOUND * 2)
        finally:
            tracker.finals += 1

    async with kameo.Pool(_target("collect"), size=1, callbacks=callbacks) as pool:
        ask = asyncio.ensure_future(pool.ask({"path": "probe.Wait"}))
        await asyncio.wait_for(tracker.started.wait(), BOUND)
        ask.cancel()
        await tracker.wait_finally("the ask was cancelled")
        with pytest.raises(asyncio.CancelledError):
            await ask
        assert tracker.starts == 1


async def test_async_worker_waits_for_callback_items_without_a_loop_iteration():
    # An async handler awaiting a callback's item while its loop has nothing else to do waits
    # on the socket itself (AsyncServer.wait_here): the fast path is taken, not silently
    # skipped, and every item arrives in order.
    callbacks = kameo.Callbacks()

    @callbacks.handler("bench.Echo")
    async def echo(req: dict) -> Any:
        return req

    async with kameo.Pool(_target("echo_round_trips"), size=1, callbacks=callbacks) as pool:
        out = await asyncio.wait_for(pool.ask({"n": 50}), BOUND)
    assert out["items"] == list(range(50))
    assert out["direct"]
    assert out["here_waits"] >= 40  # (the first may find the loop with work to do)
