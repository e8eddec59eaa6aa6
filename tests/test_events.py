"""Events (kameo.events): listeners of every pool and of one pool, against real workers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kameo
import pytest
from conftest import async_wait_until, start_mode
from kameo.events import CallFinished, WorkerExited, WorkerStarted

BASIC = "handlers.basic"
STREAMING = "handlers.streaming"
BOUND = 15.0


class Recorder:
    """A listener keeping what it got."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.events.append(event)

    def of(self, cls: type, **fields: Any) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, cls) and all(getattr(e, k) == v for k, v in fields.items())
        ]

    async def wait_for(self, cls: type, n: int = 1, **fields: Any) -> list[Any]:
        assert await async_wait_until(lambda: len(self.of(cls, **fields)) >= n, BOUND), (
            cls,
            fields,
            self.events,
        )
        return self.of(cls, **fields)


@pytest.fixture
def everywhere() -> Any:
    """A global listener, removed after the test."""
    rec = Recorder()
    kameo.add_listener(rec)
    yield rec
    kameo.remove_listener(rec)


# ------------------------------------------------------------------------------ workers


async def test_worker_started_and_closed(everywhere: Recorder) -> None:
    async with kameo.Pool(f"{BASIC}:echo", size=2, name="pricing") as pool:
        started = await everywhere.wait_for(WorkerStarted, 2, pool="pricing")
        assert {(e.worker_id, e.pid) for e in started} == {(w.id, w.pid) for w in pool.workers}
        assert all(e.startup_s > 0 for e in started)
        pids = {w.pid for w in pool.workers}
    exited = everywhere.of(WorkerExited, pool="pricing")
    assert {e.pid for e in exited} == pids
    assert all(e.reason == "closed" and e.exitcode == 0 and e.signal is None for e in exited)


async def test_sigkill_is_a_crash_with_its_signal(everywhere: Recorder) -> None:
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        victim = pool.workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        (exited,) = await everywhere.wait_for(WorkerExited, pid=victim.pid)
        assert (exited.reason, exited.signal, exited.exitcode) == ("crashed", signal.SIGKILL, None)
        assert exited.pool == f"{BASIC}:echo"  # the default name: the target
        assert exited.worker_id == victim.id
        # its replacement reports its start too
        await everywhere.wait_for(WorkerStarted, worker_id=victim.id + 1)
        assert await pool.ask("after", timeout=10) == "after"


async def test_exit_reasons_retired_killed_startup_failed(everywhere: Recorder) -> None:
    async with kameo.Pool(f"{BASIC}:cmd", size=1, max_tasks_per_worker=1) as pool:
        first = pool.workers[0]
        assert await pool.ask({"op": "echo", "value": 1}, timeout=10) == 1
        (retired,) = await everywhere.wait_for(WorkerExited, pid=first.pid)
        assert (retired.reason, retired.exitcode) == ("retired", 0)

    async with kameo.Pool(f"{BASIC}:cmd", size=1, cancel_grace=0.2) as pool:
        stuck = pool.workers[0]
        with pytest.raises(kameo.CallTimeout):
            await pool.ask({"op": "sleep", "seconds": 30}, timeout=0.2)
        (killed,) = await everywhere.wait_for(WorkerExited, pid=stuck.pid)
        assert (killed.reason, killed.signal) == ("killed", signal.SIGKILL)

    with pytest.raises(kameo.WorkerStartupError):
        await kameo.Pool("handlers.no_such_module:f", size=1, name="broken").start()
    (failed,) = await everywhere.wait_for(WorkerExited, pool="broken")
    assert failed.reason == "startup_failed" and failed.exitcode == 3
    assert not everywhere.of(WorkerStarted, pool="broken")


# ------------------------------------------------------------------------------ calls


async def test_call_finished_ok_and_error(everywhere: Recorder) -> None:
    async with kameo.Pool(f"{BASIC}:raise_value_error", size=1, name="calls") as pool:
        wid = pool.workers[0].id
        with pytest.raises(ValueError):
            await pool.ask(1)
        assert await pool.call("math:hypot", 3, 4) == 5.0
        with pytest.raises(ValueError):
            await pool.call("math:sqrt", -1)
        with pytest.raises(kameo.RemoteError):
            await pool.call(f"{BASIC}:raise_custom", "x")
        events = await everywhere.wait_for(CallFinished, 4, pool="calls")
    ask, hypot, sqrt, custom = events
    assert (ask.kind, ask.target, ask.ok, ask.error_type) == (
        "ask",
        f"{BASIC}:raise_value_error",
        False,
        "ValueError",
    )
    assert (hypot.kind, hypot.target, hypot.ok, hypot.error_type) == (
        "call",
        "math:hypot",
        True,
        None,
    )
    assert (sqrt.ok, sqrt.error_type) == (False, "ValueError")
    assert (custom.ok, custom.error_type) == (False, f"{BASIC}.MyError")
    for e in events:
        assert e.worker_id == wid
        assert e.queued_s >= 0 and e.run_s > 0


async def test_queued_and_run_split() -> None:
    """``queued_s`` is the time before the request left the parent, ``run_s`` the time from
    then to the answer: with one worker taking one request at a time, the second request waits
    in the parent for the whole first one (lower bounds set by the handler's sleep)."""
    rec = Recorder()
    async with kameo.Pool(f"{BASIC}:cmd", size=1, prefetch=0, on_event=rec) as pool:
        first = pool.ask({"op": "sleep", "seconds": 0.3, "value": 1})
        second = pool.ask({"op": "echo", "value": 2})
        assert await asyncio.gather(first, second) == [1, 2]
        a, b = await rec.wait_for(CallFinished, 2)
    assert a.run_s >= 0.3
    assert b.queued_s >= 0.25  # sent only once the first one was answered
    assert a.queued_s < b.queued_s and b.run_s < a.run_s


async def test_streams_maps_timeouts_and_crashes(everywhere: Recorder, tmp_path: Path) -> None:
    async with kameo.Pool(f"{STREAMING}:count", size=1, name="s") as pool:
        assert [x async for x in pool.stream({"n": 5})] == list(range(5))
        with pytest.raises(ValueError):
            async for _ in pool.stream({"n": 5, "raise_after": 2, "error": "ValueError"}):
                pass
        async for _ in pool.stream({"n": 1000, "delay": 0.01}):
            break  # abandoned
        got = [x async for x in pool.call_stream("builtins:range", 3)]
        assert got == [0, 1, 2]
        await everywhere.wait_for(CallFinished, 4, pool="s")
    done, failed, left, call_stream = everywhere.of(CallFinished, pool="s")
    assert (done.kind, done.target, done.ok) == ("stream", f"{STREAMING}:count", True)
    assert (failed.ok, failed.error_type) == (False, "ValueError")
    assert (left.ok, left.error_type) == (False, "CancelledError")
    assert (call_stream.kind, call_stream.target, call_stream.ok) == (
        "call_stream",
        "builtins:range",
        True,
    )

    async with kameo.Pool(f"{BASIC}:cmd", size=1, name="m") as pool:
        results = [r async for r in pool.map(range(10), fn="math:sqrt")]
        assert results[4] == 2.0
        async for _ in pool.map([1, -1], fn="math:sqrt", return_exceptions=True, chunksize=2):
            pass
        with pytest.raises(kameo.CallTimeout):
            await pool.ask({"op": "sleep", "seconds": 0.6}, timeout=0.2)
        # it finishes its sleep within cancel_grace: the same worker goes on
        assert await async_wait_until(lambda: pool.workers[0].in_flight == 0, BOUND)
        victim = pool.workers[0]
        started = tmp_path / "started"
        crashing = pool.ask({"op": "sleep", "seconds": 30, "started": str(started)})
        assert await async_wait_until(started.exists, BOUND)  # it runs: it will not be resent
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(kameo.WorkerCrashed):
            await crashing
        crashed = await everywhere.wait_for(CallFinished, pool="m", error_type="WorkerCrashed")
    maps = everywhere.of(CallFinished, pool="m", kind="map")
    assert maps and all(m.target == "math:sqrt" for m in maps)
    assert maps[-1].ok is False and maps[-1].error_type == "ValueError"
    assert all(m.ok for m in maps[:-1])
    (timed_out,) = everywhere.of(CallFinished, pool="m", error_type="CallTimeout")
    assert timed_out.kind == "ask" and timed_out.worker_id == victim.id
    assert timed_out.run_s >= 0.2
    assert crashed[0].worker_id == victim.id and crashed[0].ok is False


# ------------------------------------------------------------------------------ listeners


async def test_a_raising_listener_is_logged_and_the_pool_goes_on(
    everywhere: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kameo")

    def broken(event: Any) -> None:
        raise RuntimeError("listener bug")

    kameo.add_listener(broken)
    try:
        async with kameo.Pool(f"{BASIC}:echo", size=1, on_event=broken, name="fine") as pool:
            results = await asyncio.gather(*(pool.ask(i) for i in range(50)))
            assert results == list(range(50))
            # the other listeners still get everything
            await everywhere.wait_for(CallFinished, 50, pool="fine")
    finally:
        kameo.remove_listener(broken)
    logged = [r for r in caplog.records if "event listener" in r.getMessage()]
    assert logged, caplog.text
    assert logged[0].exc_info is not None and "listener bug" in caplog.text
    # logged the first time, then at most once per interval with a count: not 2 x 53 times
    assert len(logged) < 10


async def test_remove_listener_and_listeners_added_to_a_running_pool() -> None:
    rec = Recorder()
    async with kameo.Pool(f"{BASIC}:echo", size=1, name="late") as pool:
        assert await pool.ask(0) == 0
        kameo.add_listener(rec)
        kameo.add_listener(rec)  # once only
        try:
            assert await pool.ask(1) == 1
            (first,) = await rec.wait_for(CallFinished)
            assert first.ok and first.pool == "late"
        finally:
            kameo.remove_listener(rec)
        kameo.remove_listener(rec)  # not registered any more: nothing happens
        assert await pool.ask(2) == 2
        await asyncio.sleep(0.05)  # a done callback would run in a loop iteration or two
        assert len(rec.of(CallFinished)) == 1
        # nothing is recorded for a request while no one listens
        fut = pool.ask(3)
        assert await fut == 3
        assert pool._core.take_timing(fut._kameo_rid) is None
    assert not rec.of(WorkerExited)


async def test_on_event_is_for_its_pool_only(everywhere: Recorder) -> None:
    mine = Recorder()
    async with (
        kameo.Pool(f"{BASIC}:echo", size=1, name="mine", on_event=mine) as a,
        kameo.Pool(f"{BASIC}:echo", size=1, name="other") as b,
    ):
        assert await a.ask("a") == "a" and await b.ask("b") == "b"
        await everywhere.wait_for(CallFinished, pool="other")
        await mine.wait_for(CallFinished)
    assert {e.pool for e in mine.events} == {"mine"}
    assert mine.of(WorkerStarted) and mine.of(WorkerExited, reason="closed")
    assert {e.pool for e in everywhere.events} == {"mine", "other"}


async def test_listeners_run_on_the_loop_thread() -> None:
    import threading

    threads: set[int] = set()
    here = threading.get_ident()
    record: Callable[[Any], None] = lambda event: threads.add(threading.get_ident())  # noqa: E731
    async with kameo.Pool(f"{BASIC}:echo", size=1, on_event=record) as pool:
        await asyncio.gather(*(pool.ask(i) for i in range(10)))
    assert threads == {here}


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        kameo.add_listener("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kameo.Pool(f"{BASIC}:echo", on_event=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kameo.Pool(f"{BASIC}:echo", name="")
    assert kameo.Pool(f"{BASIC}:echo").name == f"{BASIC}:echo"
    assert kameo.Pool().name == "kameo"
    assert kameo.Pool(f"{BASIC}:echo", name="pricing").name == "pricing"


# ------------------------------------------------------------------------------ names


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


async def test_process_names() -> None:
    async with kameo.Pool(f"{BASIC}:cmd", size=2, name="pricing") as pool:
        # "kameo pricing w0" is 16 bytes, one over what Linux keeps: the name and the id
        assert sorted(_comm(w.pid) for w in pool.workers) == ["pricing w0", "pricing w1"]
        pid = pool.workers[0].pid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if start_mode() == "exec":
            assert argv[-3:-1] in ([b"pricing", b"w0"], [b"pricing", b"w1"])
        else:  # a fork keeps its zygote's command line (`ps -f`); its name is its own
            assert argv[-2] == b"pricing" and b"kameo._zygote" in argv[-3]
        # the handler sees a plain sys.argv
        assert await pool.call("sys:argv.__len__") == 1
    async with kameo.Pool(f"{BASIC}:cmd", size=1, name="api") as pool:
        assert _comm(pool.workers[0].pid) == "kameo api w0"
    async with kameo.Pool(size=1) as pool:
        assert _comm(pool.workers[0].pid) == "kameo w0"
    async with kameo.Pool(size=1, name="inventory-service") as pool:
        assert _comm(pool.workers[0].pid) == "inventory-se w0"  # cut to 15 bytes


async def test_stderr_lines_carry_the_pool_name(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kameo.worker")
    async with kameo.Pool(f"{BASIC}:cmd", size=1, name="pricing") as pool:
        wid, pid = pool.workers[0].id, pool.workers[0].pid
        assert await pool.ask({"op": "stderr", "text": "raw line"}, timeout=10) == "printed"

        def line() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "raw line" in r.getMessage()]

        assert await async_wait_until(lambda: bool(line()), BOUND)
    (record,) = line()
    assert record.getMessage() == f"[pricing worker {wid} pid {pid}] raw line"
    assert (record.pool, record.worker_id, record.pid) == ("pricing", wid, pid)  # type: ignore[attr-defined]
