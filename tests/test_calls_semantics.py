"""Semantics of dynamic calls, remote objects and sessions (issue 13) that cut across them:
traceparent, callbacks into the parent from called functions and methods, timeouts and
cancellation in sessions, a retiring worker held by a Ref, no retries of pinned or session
calls, freeing without a further message, adapter classes and the init hook.

Real workers; targets in tests/handlers/calls.py and tests/handlers/remote.py. Every wait is
bounded; nothing asserts how long something took.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kameo
import pytest
from conftest import async_wait_until, pid_alive, pid_gone_or_zombie

C = "handlers.calls"
R = "handlers.remote"
BOUND = 10.0
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _state(pool: kameo.Pool, worker_id: int) -> str | None:
    return next((w.state for w in pool.workers if w.id == worker_id), None)


# --------------------------------------------------------------------------- traceparent


def _fan_callbacks(box: dict[str, kameo.Pool], async_server: bool) -> kameo.Callbacks:
    """``fan.Calls``: a parent handler (run for an ask made under a traceparent) that makes
    every kind of call and reports the traceparent each one saw in its worker."""
    callbacks = kameo.Callbacks()

    @callbacks.handler("fan.Calls")
    async def calls(_data: Any) -> dict[str, Any]:
        pool = box["pool"]
        seen: dict[str, Any] = {}
        seen["call"] = await pool.call(f"{C}:trace")
        seen["call async"] = await pool.call(f"{C}:atrace")
        seen["function"] = await pool.function(f"{C}:trace", timeout=BOUND)()
        tracer = await pool.new(f"{C}:Tracer")
        seen["method"] = await tracer.trace()
        seen["method async"] = await tracer.atrace()
        seen["call_method"] = await tracer.call_method("trace")
        seen["call_stream"] = [x async for x in pool.call_stream(f"{C}:trace_gen", 2)]
        if async_server:  # an async generator needs the async server
            seen["call_stream async"] = [x async for x in pool.call_stream(f"{C}:atrace_gen", 2)]
        p = pool.pipeline()
        p.call(f"{C}:trace")
        p.call_method(tracer, "trace")
        seen["pipeline"] = await p.run()
        async with pool.session() as s:
            seen["session call"] = await s.call(f"{C}:trace")
            seen["session stream"] = [x async for x in s.call_stream(f"{C}:trace_gen", 1)]
        # The called function's own callback carries it back to the parent.
        seen["callback"] = await pool.call(f"{C}:trace_of_callback")
        return seen

    callbacks.register("trace.Probe", lambda _data: kameo.current_traceparent())
    return callbacks


def _expected_traces(trace: str | None, async_server: bool) -> dict[str, Any]:
    expected: dict[str, Any] = {
        "call": trace,
        "call async": trace,
        "function": trace,
        "method": trace,
        "method async": trace,
        "call_method": trace,
        "call_stream": [trace, trace],
        "pipeline": [trace, trace],
        "session call": trace,
        "session stream": [trace],
        "callback": [trace],
    }
    if async_server:
        expected["call_stream async"] = [trace, trace]
    return expected


@pytest.mark.parametrize(
    ("size", "max_concurrency"),
    [(2, 1), (1, 4)],
    ids=["sync-server", "async-server"],
)
async def test_calls_made_under_a_traceparent_carry_it_to_the_worker(
    size: int, max_concurrency: int
) -> None:
    """Calls take the traceparent of the context they are made in, as asks do: here a parent
    handler serving an ask made with ``traceparent=``. (With one sync worker the ask occupies
    it; the calls go to the second worker.)"""
    async_server = max_concurrency > 1
    box: dict[str, kameo.Pool] = {}
    pool = kameo.Pool(
        f"{C}:ask_parent",
        size=size,
        max_concurrency=max_concurrency,
        callbacks=_fan_callbacks(box, async_server),
    )
    box["pool"] = pool
    async with pool:
        traced = await asyncio.wait_for(pool.ask(None, traceparent=TRACEPARENT), 30.0)
        untraced = await asyncio.wait_for(pool.ask(None), 30.0)
    assert traced == [_expected_traces(TRACEPARENT, async_server)]
    assert untraced == [_expected_traces(None, async_server)]
    assert kameo.current_traceparent() is None


# --------------------------------------------------------------------------- callbacks


def _ticks(seen: list[Any] | None = None) -> kameo.Callbacks:
    callbacks = kameo.Callbacks()

    @callbacks.handler("trading.DataFetch")
    async def data_fetch(req: dict[str, Any]) -> Any:
        if seen is not None:
            seen.append(req["symbol"])
        for i in range(5):
            await asyncio.sleep(0)
            yield {"price": f"{req['symbol']}{i}"}

    callbacks.register("calc.Double", lambda x: 2 * x)
    return callbacks


def _prices(symbol: str) -> list[str]:
    return [f"{symbol}{i}" for i in range(5)]


@pytest.mark.parametrize("max_concurrency", [1, 3], ids=["sync-server", "async-server"])
async def test_sync_functions_and_methods_call_back_into_the_parent(max_concurrency: int) -> None:
    seen: list[Any] = []
    async with kameo.Pool(size=1, max_concurrency=max_concurrency, callbacks=_ticks(seen)) as pool:
        assert await pool.call(f"{C}:prices", "A") == _prices("A")
        assert await pool.call(f"{C}:double", 20) == 41
        quoter = await pool.new(f"{C}:Quoter", "B")
        assert await quoter.prices() == _prices("B")
        assert [x async for x in pool.call_stream(f"{C}:price_stream", "C")] == _prices("C")
        async with pool.session() as s:
            assert await s.call(f"{C}:prices", "D") == _prices("D")
            q = await s.new(f"{C}:Quoter", "E")
            assert await q.prices() == _prices("E")
        p = pool.pipeline()
        p.call(f"{C}:prices", "F")
        p.call(f"{C}:double", 1)
        p.call_method(quoter, "prices")
        assert await p.run() == [_prices("F"), 3, _prices("B")]
        symbols = [f"G{k}" for k in range(6)]
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.call(f"{C}:prices", sym) for sym in symbols)), 30.0
        )
        assert results == [_prices(sym) for sym in symbols]
    assert sorted(seen) == sorted(["A", "B", "C", "D", "E", "F", "B", *symbols])


async def test_async_functions_and_methods_call_back_into_the_parent() -> None:
    """``async for`` over a callback in an async function, on the async server (see
    test_callbacks for asks)."""
    async with kameo.Pool(size=1, max_concurrency=3, callbacks=_ticks()) as pool:
        assert await pool.call(f"{C}:aprices", "A") == _prices("A")
        quoter = await pool.new(f"{C}:Quoter", "B")
        assert await quoter.aprices() == _prices("B")
        async with pool.session() as s:
            assert await s.call(f"{C}:aprices", "C") == _prices("C")
        p = pool.pipeline()  # a pipeline's async step runs on the serving loop
        p.call(f"{C}:aprices", "D")
        p.call_method(quoter, "aprices")
        assert await p.run() == [_prices("D"), _prices("B")]
        symbols = [f"E{k}" for k in range(6)]
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.call(f"{C}:aprices", sym) for sym in symbols)), 30.0
        )
        assert results == [_prices(sym) for sym in symbols]


# --------------------------------------------------------------------------- timeouts, cancellation


class _Feed:
    """``feed.Endless``: an endless parent handler; counts the runs whose finally ran."""

    def __init__(self) -> None:
        self.starts = 0
        self.finals = 0

    def callbacks(self) -> kameo.Callbacks:
        callbacks = kameo.Callbacks()

        async def endless(_data: Any) -> Any:
            self.starts += 1
            try:
                i = 0
                while True:
                    yield i
                    i += 1
                    await asyncio.sleep(0.01)
            finally:
                self.finals += 1

        callbacks.register("feed.Endless", endless)
        return callbacks


def _stopped(marker: Path) -> Callable[[], bool]:
    """The function writing to ``marker`` started and its finally ran."""
    return lambda: _lines(marker) == ["started", "finally"]


def _starts(feed: _Feed, n: int) -> Callable[[], bool]:
    return lambda: feed.starts == n


def _finals(feed: _Feed, n: int) -> Callable[[], bool]:
    return lambda: feed.finals == n


async def test_a_timed_out_session_call_stops_in_the_worker_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    """Session calls take the pool's ``default_timeout`` (they have no options of their own);
    the timeout cancels an async function in its worker, and the session keeps its worker and
    state."""
    first, second = tmp_path / "call", tmp_path / "method"
    async with kameo.Pool(size=2, max_concurrency=2, default_timeout=3.0) as pool:
        async with pool.session() as s:
            await s.call(f"{R}:remember", "k", 1)
            _, pid = await s.call(f"{R}:session_info")
            with pytest.raises(kameo.CallTimeout):
                await s.call(f"{C}:await_forever", str(first))
            assert await async_wait_until(lambda: _lines(first) == ["started", "finally"], BOUND)
            waiter = await s.new(f"{C}:Waiter")
            with pytest.raises(kameo.CallTimeout):
                await waiter.wait(str(second))
            assert await async_wait_until(lambda: _lines(second) == ["started", "finally"], BOUND)
            assert await s.call(f"{R}:recall", "k") == 1
            assert await s.call(f"{R}:session_info") == (s.id, pid)
        assert pool.stats().timeouts == 2


@pytest.mark.parametrize("max_concurrency", [1, 2], ids=["sync-server", "async-server"])
async def test_a_timed_out_sync_session_call_waiting_on_a_callback_stops(
    tmp_path: Path, max_concurrency: int
) -> None:
    """A sync function cannot be interrupted, but one waiting for a callback's item sees its
    cancellation: it stops, the parent handler is cancelled, the worker stays (on the async
    server, its handler thread is free again: more timeouts than it has threads)."""
    feed = _Feed()
    async with kameo.Pool(
        size=1,
        max_concurrency=max_concurrency,
        default_timeout=3.0,
        callbacks=feed.callbacks(),
    ) as pool:
        async with pool.session() as s:
            await s.call(f"{R}:remember", "k", 1)
            _, pid = await s.call(f"{R}:session_info")
            for k in range(1, max_concurrency + 2):
                marker = tmp_path / f"m{k}"
                with pytest.raises(kameo.CallTimeout):
                    await s.call(f"{C}:drain_feed", str(marker))
                assert await async_wait_until(_stopped(marker), BOUND)
                assert await async_wait_until(_finals(feed, k), BOUND)
            assert await s.call(f"{R}:recall", "k") == 1
            assert await s.call(f"{R}:session_info") == (s.id, pid)
        assert pool.workers[0].pid == pid


async def test_a_session_is_lost_when_its_worker_is_killed_for_a_timed_out_call() -> None:
    """A sync function that ignores its cancellation costs its worker after ``cancel_grace``:
    the session does not move, it is lost."""
    async with kameo.Pool(size=2, default_timeout=2.0, cancel_grace=0.5) as pool:
        async with pool.session() as s:
            _, pid = await s.call(f"{R}:session_info")
            with pytest.raises(kameo.CallTimeout):
                await s.call(f"{C}:sleep", 60)
            assert await async_wait_until(lambda: pid_gone_or_zombie(pid), BOUND)
            assert await async_wait_until(lambda: pid not in {w.pid for w in pool.workers}, BOUND)
            with pytest.raises(kameo.SessionLost, match="gone"):
                await s.call(f"{R}:session_info")
        assert await pool.call("math:sqrt", 4) == 2.0


@pytest.mark.parametrize("via", ["session call", "session method", "call", "method"])
async def test_cancelling_an_awaited_call_reaches_the_worker(tmp_path: Path, via: str) -> None:
    marker = tmp_path / "m"
    async with kameo.Pool(size=2, max_concurrency=2) as pool:
        async with pool.session() as s:
            await s.call(f"{R}:remember", "k", 1)
            _, pid = await s.call(f"{R}:session_info")
            if via == "session call":
                aw = s.call(f"{C}:await_forever", str(marker))
            elif via == "session method":
                aw = (await s.new(f"{C}:Waiter")).wait(str(marker))
            elif via == "call":
                aw = pool.call(f"{C}:await_forever", str(marker))
            else:
                aw = (await pool.new(f"{C}:Waiter")).wait(str(marker))
            task = asyncio.create_task(aw)  # an AskFuture is a coroutine too
            assert await async_wait_until(lambda: _lines(marker) == ["started"], BOUND)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await async_wait_until(lambda: _lines(marker) == ["started", "finally"], BOUND)
            assert await s.call(f"{R}:recall", "k") == 1
            assert await s.call(f"{R}:session_info") == (s.id, pid)
        assert pool.stats().cancelled == 1
        assert pool.stats().crashes == 0


@pytest.mark.parametrize("max_concurrency", [1, 2], ids=["sync-server", "async-server"])
async def test_cancelling_a_sync_session_call_waiting_on_a_callback(
    tmp_path: Path, max_concurrency: int
) -> None:
    feed = _Feed()
    async with kameo.Pool(
        size=1, max_concurrency=max_concurrency, callbacks=feed.callbacks()
    ) as pool:
        async with pool.session() as s:
            await s.call(f"{R}:remember", "k", 1)
            waiter = await s.new(f"{C}:Waiter")
            for k in range(1, max_concurrency + 2):  # more than the handler threads
                marker = tmp_path / f"m{k}"
                task = asyncio.create_task(waiter.drain(str(marker)))
                assert await async_wait_until(_starts(feed, k), BOUND)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert await async_wait_until(_stopped(marker), BOUND)
                assert await async_wait_until(_finals(feed, k), BOUND)
            assert await asyncio.wait_for(s.call(f"{R}:recall", "k"), BOUND) == 1
        assert pool.stats().crashes == 0


# --------------------------------------------------------------------------- retiring


@pytest.mark.parametrize("let_go", ["release", "drop"])
async def test_a_retiring_worker_held_by_a_ref_serves_only_it_until_it_goes(
    tmp_path: Path, let_go: str
) -> None:
    """Past max_tasks the worker retires; a live Ref (no session) keeps it, and its calls go
    on there, while new work (calls, objects, sessions) waits for the successor, which takes
    a while to start here. Once the Ref is released or collected the worker goes."""
    slow = tmp_path / "slow"
    env = {"KAMEO_TEST_SLOW_START": str(slow)}
    async with kameo.Pool(size=1, max_tasks_per_worker=3, init=f"{C}:slow_start", env=env) as pool:
        old = pool.workers[0]
        box = await pool.new(f"{C}:Box", 1)
        slow.write_text("x")  # from now on a worker takes 2 s to start
        for _ in range(3):
            assert await box.pid() == old.pid
        assert await async_wait_until(lambda: _state(pool, old.id) == "retiring", BOUND)
        async with pool.session() as s:
            assert s.worker_id != old.id
            assert await asyncio.wait_for(s.call("os:getpid"), 30.0) != old.pid
        pids = await asyncio.wait_for(
            asyncio.gather(*(pool.call("os:getpid") for _ in range(5))), 30.0
        )
        assert old.pid not in pids
        other = await pool.new(f"{C}:Box", 2)
        assert other.worker_id != old.id
        for _ in range(3):  # the Ref still works, on its retiring worker
            assert await box.pid() == old.pid
        assert _state(pool, old.id) == "retiring" and pid_alive(old.pid)
        if let_go == "release":
            await box.release()
        else:
            dead = weakref.ref(box)
            del box
            gc.collect()
            # (Collected once this task next goes round the loop: asyncio's handle that last
            # woke it holds the future of pool.new, and so the Ref, until then.)
            assert await async_wait_until(lambda: dead() is None, BOUND)
        assert await async_wait_until(lambda: _state(pool, old.id) is None, BOUND)
        assert await async_wait_until(lambda: pid_gone_or_zombie(old.pid), BOUND)
        assert await other.get() == 2
        assert pool.stats().crashes == 0


# --------------------------------------------------------------------------- no retries


async def test_an_idempotent_function_pinned_by_a_ref_is_not_run_again(tmp_path: Path) -> None:
    async with kameo.Pool(size=2) as pool:
        f = pool.function(f"{C}:crash_once_with", idempotent=True)
        box = await pool.new(f"{C}:Box", 1)
        with pytest.raises(kameo.WorkerCrashed):
            await f(box, str(tmp_path / "pinned"))
        with pytest.raises(kameo.RefError, match="SIGKILL"):
            await box.get()
        # Unpinned, the same function runs again on another worker.
        assert await asyncio.wait_for(f(None, str(tmp_path / "free")), 30.0) in {
            w.pid for w in pool.workers
        }
        assert pool.stats().retries == 1


@pytest.mark.parametrize("strict", [True, False])
async def test_a_session_call_is_not_run_again_when_its_worker_dies(
    tmp_path: Path, strict: bool
) -> None:
    """Never retried inside a session: the call in flight fails with WorkerCrashed (it would
    succeed if run again); then a strict session is lost, a loose one moves (empty)."""
    marker = str(tmp_path / "crashed")
    async with kameo.Pool(size=2) as pool, pool.session(strict=strict) as s:
        await s.call(f"{R}:remember", "k", 1)
        _, pid = await s.call(f"{R}:session_info")
        # A RemoteFunction brings its options into a session, never its retries.
        crash = pool.function(f"{C}:crash_once", idempotent=True)
        with pytest.raises(kameo.WorkerCrashed):
            await s.call(crash, marker)
        assert os.path.exists(marker)
        if strict:
            with pytest.raises(kameo.SessionLost):
                await s.call(f"{R}:session_info")
            assert issubclass(kameo.SessionLost, kameo.KameoError)
        else:
            sid, pid2 = await s.call(f"{R}:session_info")
            assert sid == s.id and pid2 != pid
            assert await s.call(f"{R}:recall", "k") is None
        assert pool.stats().retries == 0


async def test_a_remote_function_brings_its_options_into_a_session(tmp_path: Path) -> None:
    async with kameo.Pool(size=1, max_concurrency=2) as pool, pool.session() as s:
        wait = pool.function(f"{C}:await_forever", timeout=0.3)
        marker = tmp_path / "waiting"
        with pytest.raises(kameo.CallTimeout):
            await s.call(wait, str(marker))
        assert await async_wait_until(lambda: "finally" in marker.read_text(), timeout=5)
        box = await s.call(pool.function(f"{R}:echo", return_ref=True), [1, 2])
        assert isinstance(box, kameo.Ref) and await box.copy() == [1, 2]


async def test_a_loose_session_moves_to_the_replacement_of_its_only_worker(
    tmp_path: Path,
) -> None:
    async with kameo.Pool(size=1) as pool, pool.session(strict=False) as s:
        _, pid = await s.call(f"{R}:session_info")
        with pytest.raises(kameo.WorkerCrashed):
            await s.call(f"{C}:crash_once", str(tmp_path / "crashed"))
        sid, pid2 = await asyncio.wait_for(s.call(f"{R}:session_info"), 30.0)
        assert sid == s.id and pid2 != pid


async def test_a_session_opened_while_the_only_worker_is_replaced() -> None:
    async with kameo.Pool(size=1) as pool:
        pid = pool.workers[0].pid
        with pytest.raises(kameo.WorkerCrashed):
            await pool.call(f"{R}:die")
        async with pool.session() as s:
            sid, pid2 = await asyncio.wait_for(s.call(f"{R}:session_info"), 30.0)
        assert sid == s.id and pid2 != pid


# --------------------------------------------------------------------------- affinity, freeing


async def test_a_session_refuses_a_ref_of_another_worker() -> None:
    async with kameo.Pool(size=2) as pool, pool.session() as s:
        here = await s.new(f"{C}:Box", 1)
        # Made concurrently, these spread over both workers.
        boxes = await asyncio.gather(*(pool.new(f"{C}:Box", 2) for _ in range(4)))
        there = next(b for b in boxes if b.worker_id != s.worker_id)
        with pytest.raises(kameo.RefError) as info:
            await s.call("builtins:id", there)
        assert isinstance(info.value, LookupError)
        assert f"worker {there.worker_id}" in str(info.value)
        assert f"worker {s.worker_id}" in str(info.value)
        assert await s.call("builtins:len", [here]) == 1
        assert await there.get() == 2  # refused before it was sent: nothing broke


async def test_a_dropped_ref_is_freed_without_a_further_message(tmp_path: Path) -> None:
    """Collected in the loop's thread or in another, a Ref's object is freed in its worker
    without waiting for the next call to that worker."""
    first, second = tmp_path / "first", tmp_path / "second"
    async with kameo.Pool(size=1) as pool:
        a = await pool.new(f"{C}:Noisy", str(first))
        held = [await pool.new(f"{C}:Noisy", str(second))]
        del a
        gc.collect()
        assert await async_wait_until(lambda: _lines(first) == ["freed"], BOUND)
        assert _lines(second) == []
        thread = threading.Thread(target=held.clear)
        thread.start()
        thread.join(BOUND)
        assert await async_wait_until(lambda: _lines(second) == ["freed"], BOUND)
        assert await pool.call("kameo:live_refs") == 0


# --------------------------------------------------------------------------- adapter classes


@pytest.mark.parametrize("max_concurrency", [1, 2], ids=["sync-server", "async-server"])
async def test_an_adapter_is_built_after_the_init_hook_and_has_async_methods(
    max_concurrency: int,
) -> None:
    async with kameo.Pool(
        f"{C}:InitAdapter", size=1, init=f"{C}:init_hook", max_concurrency=max_concurrency
    ) as pool:
        assert await pool.call("seen") == ["init"]
        assert await pool.call("apredict", 2) == 6
        if max_concurrency > 1:
            assert [x async for x in pool.call_stream("astream", 3)] == [0, 1, 2]
        with pytest.raises(kameo.HandlerTypeError):
            await pool.ask(1)  # no __call__


async def test_a_sync_worker_cancels_a_called_coroutine(tmp_path: Path) -> None:
    """max_concurrency=1: the sync server runs an async function on its own loop and reads
    the socket meanwhile, so a timeout (or cancellation) cancels the coroutine there: its
    finally runs and the worker is not replaced after cancel_grace."""
    async with kameo.Pool(size=1, cancel_grace=0.5) as pool:
        pid = pool.workers[0].pid
        wait = pool.function(f"{C}:await_forever", timeout=0.3)
        marker = tmp_path / "waiting"
        with pytest.raises(kameo.CallTimeout):
            await wait(str(marker))
        assert await async_wait_until(lambda: "finally" in marker.read_text(), timeout=5)
        task = asyncio.ensure_future(pool.call(f"{C}:await_forever", str(tmp_path / "second")))
        assert await async_wait_until(lambda: (tmp_path / "second").exists(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await async_wait_until(
            lambda: "finally" in (tmp_path / "second").read_text(), timeout=5
        )
        await asyncio.sleep(1.0)  # past cancel_grace: the worker was not killed
        assert await pool.call("math:sqrt", 4) == 2.0
        assert pool.workers[0].pid == pid and pool.stats().crashes == 0
