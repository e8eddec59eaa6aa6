"""Requests, replies, scheduling, worker bookkeeping and pool options."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import threading
import time
import weakref

import kameo
import pytest
from conftest import async_wait_until, pid_alive

BASIC = "handlers.basic"


async def test_sync_handler_echo():
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        assert await pool.ask({"symbol": "AAPL"}, timeout=5.0) == {"symbol": "AAPL"}
        assert await pool.ask("second", timeout=5.0) == "second"


async def test_async_handler_echo():
    async with kameo.Pool(f"{BASIC}:aecho", size=1) as pool:
        assert await pool.ask({"symbol": "MSFT", "qty": 3}, timeout=5.0) == {
            "symbol": "MSFT",
            "qty": 3,
        }


async def test_handler_runs_in_worker_process():
    async with kameo.Pool(f"{BASIC}:whoami", size=2) as pool:
        reply = await pool.ask("hi", timeout=5.0)
        assert reply["msg"] == "hi"
        assert reply["pid"] != os.getpid()
        assert reply["pid"] in {w.pid for w in pool.workers}


async def test_explicit_start_and_close():
    pool = kameo.Pool(f"{BASIC}:echo", size=1)
    await pool.start()
    try:
        assert await pool.ask(7, timeout=5.0) == 7
    finally:
        await pool.close()


async def test_default_size_is_cpu_count():
    async with kameo.Pool(f"{BASIC}:echo") as pool:
        assert pool.size == os.cpu_count()
        assert len(pool.workers) == os.cpu_count()


async def test_thousand_concurrent_asks_over_two_workers():
    async with kameo.Pool(f"{BASIC}:whoami", size=2) as pool:
        assert pool.size == 2
        msgs = [{"i": i, "s": f"payload-{i}"} for i in range(1000)]
        replies = await asyncio.wait_for(
            asyncio.gather(*(pool.ask(m, timeout=30.0) for m in msgs)), 45
        )
        assert [r["msg"] for r in replies] == msgs
        worker_pids = {w.pid for w in pool.workers}
        used = {r["pid"] for r in replies}
        assert used == worker_pids, "both workers should have served requests"


async def test_workers_fields():
    async with kameo.Pool(f"{BASIC}:whoami", size=2) as pool:
        workers = pool.workers
        assert len(workers) == 2
        ids = [w.id for w in workers]
        assert all(isinstance(i, int) for i in ids)
        assert len(set(ids)) == 2
        pids = [w.pid for w in workers]
        assert all(isinstance(p, int) for p in pids)
        assert len(set(pids)) == 2
        for w in workers:
            assert w.pid != os.getpid()
            assert pid_alive(w.pid), f"worker pid {w.pid} is not a live process"
            assert isinstance(w.state, str)
            assert w.state == "ready"
            assert w.in_flight == 0
            assert isinstance(w.completed, int)
            assert w.completed == 0

        replies = [await pool.ask(i, timeout=5.0) for i in range(10)]
        per_pid: dict[int, int] = {}
        for r in replies:
            per_pid[r["pid"]] = per_pid.get(r["pid"], 0) + 1

        await async_wait_until(lambda: sum(w.completed for w in pool.workers) >= 10, 2.0)
        after = {w.pid: w for w in pool.workers}
        assert sum(w.completed for w in after.values()) == 10
        for pid, n in per_pid.items():
            assert after[pid].completed == n
        for w in after.values():
            assert w.in_flight == 0
            assert w.state == "ready"


async def test_worker_in_flight_and_busy_state():
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        task = asyncio.ensure_future(pool.ask({"op": "sleep", "seconds": 0.6}, timeout=10.0))
        assert await async_wait_until(lambda: pool.workers[0].in_flight == 1, 3.0)
        assert pool.workers[0].state == "busy"
        await task
        assert await async_wait_until(lambda: pool.workers[0].in_flight == 0, 3.0)
        assert pool.workers[0].state == "ready"
        assert pool.workers[0].completed == 1


async def test_fifo_order_with_single_worker():
    async with kameo.Pool(f"{BASIC}:seq", size=1) as pool:
        n = 50
        replies = await asyncio.gather(*(pool.ask(i, timeout=20.0) for i in range(n)))
        assert [r[1] for r in replies] == list(range(n))
        seqs = [r[0] for r in replies]
        assert seqs == sorted(seqs), f"requests did not run in issue order: {seqs}"
        assert len(set(seqs)) == n


@pytest.mark.parametrize("prefetch", [0, 1])
async def test_parent_queue_never_exceeds_worker_window(prefetch: int):
    # A worker holds at most max_concurrency running + prefetch queued requests;
    # the rest wait in the parent.
    window = 2 + prefetch
    async with kameo.Pool(f"{BASIC}:track", size=1, max_concurrency=2, prefetch=prefetch) as pool:
        observed: list[int] = []

        async def sample():
            while True:
                observed.append(pool.workers[0].in_flight)
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        try:
            replies = await asyncio.gather(
                *(pool.ask({"seconds": 0.15, "value": i}, timeout=20.0) for i in range(6))
            )
        finally:
            sampler.cancel()
        assert [r["value"] for r in replies] == list(range(6))
        assert max(r["max_running"] for r in replies) == 2
        assert max(observed) <= window, f"in_flight exceeded {window}: {observed}"
        assert window in observed


async def test_auto_prefetch_sends_ahead_only_to_workers_with_short_requests(tmp_path):
    """prefetch="auto" (the default): short requests are sent well ahead; a worker stuck on a
    long request gets nothing more, so short requests run on the other worker instead of
    waiting behind it."""
    async with kameo.Pool(f"{BASIC}:cmd", size=2) as pool:
        for _ in range(20):  # both workers answer quickly: measured as short
            await asyncio.gather(*(pool.ask({"op": "echo", "value": i}) for i in range(4)))
        burst = [pool.ask({"op": "echo", "value": i}, timeout=20.0) for i in range(200)]
        # Sent ahead: more in flight than the worker runs at once (how far ahead depends on the
        # measured ~1 ms of work, so on how loaded the machine is).
        assert max(w.in_flight for w in pool.workers) >= 2, pool.workers
        await asyncio.gather(*burst)

        started = tmp_path / "started"
        long = asyncio.ensure_future(
            pool.ask({"op": "sleep", "seconds": 1.5, "started": str(started)}, timeout=20.0)
        )
        assert await async_wait_until(started.exists, 10.0)
        stuck = next(w.id for w in pool.workers if w.in_flight == 1)

        def stuck_in_flight() -> int:
            return next(w.in_flight for w in pool.workers if w.id == stuck)

        await asyncio.sleep(0.05)  # busy far longer than its requests used to take
        shorts = [
            pool.ask({"op": "sleep", "seconds": 0.05, "value": i}, timeout=20.0) for i in range(6)
        ]
        assert stuck_in_flight() == 1, pool.workers  # nothing queued behind the long request
        assert await asyncio.gather(*shorts) == list(range(6))
        assert not long.done(), "the short requests should not have waited for the long one"
        await long


# An ask awaited directly waits for its answer outside the loop when the loop is idle
# (AskFuture.__await__): timers, other tasks, threads and cancellation must not notice.


async def test_sequential_asks_leave_timers_and_other_tasks_on_time():
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        ticks: list[float] = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        t = asyncio.ensure_future(ticker())
        try:
            t0 = time.monotonic()
            n = 0
            while time.monotonic() - t0 < 0.5:  # back-to-back quick asks
                assert await pool.ask({"op": "echo", "value": n}) == n
                n += 1
            assert pool._answer_waits > n // 2  # mostly answered without a loop iteration
            # and one slow ask, made just after a tick (so the loop has nothing else to run
            # when it is awaited): the ticker goes on while it runs
            seen = len(ticks)
            while len(ticks) == seen:
                await asyncio.sleep(0.001)
            waits = pool._answer_waits
            before = len(ticks)
            assert await pool.ask({"op": "sleep", "seconds": 0.3, "value": "slow"}) == "slow"
            during = len(ticks) - before
            assert pool._answer_waits > waits
        finally:
            t.cancel()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert n > 50
        assert during >= 10, f"the ticker ran {during} times during a 0.3 s ask"
        assert max(gaps) < 0.2, f"a 10 ms timer was late by {max(gaps):.3f} s"


async def test_awaited_ask_still_times_out_and_can_be_cancelled():
    async with kameo.Pool(f"{BASIC}:cmd", size=1, cancel_grace=0.5) as pool:
        await asyncio.sleep(0.01)  # nothing else to run: the ask is awaited directly
        waits = pool._answer_waits
        t0 = time.monotonic()
        with pytest.raises(kameo.CallTimeout):
            await pool.ask({"op": "sleep", "seconds": 2.0}, timeout=0.2)
        assert time.monotonic() - t0 < 0.6
        assert pool._answer_waits > waits

        async def waiter():
            await asyncio.sleep(0.01)
            return await pool.ask({"op": "sleep", "seconds": 2.0})

        t0 = time.monotonic()
        w = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.2)
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        assert time.monotonic() - t0 < 0.6
        assert await pool.ask({"op": "echo", "value": "after"}, timeout=10.0) == "after"


async def test_awaited_ask_lets_threads_and_signals_reach_the_loop():
    """A thread's call_soon_threadsafe and a signal handled by the loop, both 0.1 s into a
    0.6 s ask, run at once, not when the answer comes."""
    loop = asyncio.get_running_loop()
    seen: dict[str, float] = {}

    def mark(what: str) -> None:
        seen[what] = time.monotonic()

    loop.add_signal_handler(signal.SIGUSR1, mark, "signal")
    try:
        async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
            triggers = {
                "thread": threading.Timer(0.1, loop.call_soon_threadsafe, (mark, "thread")),
                "signal": threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)),
            }
            for what, timer in triggers.items():
                await asyncio.sleep(0.01)  # nothing else to run: the ask is awaited directly
                waits = pool._answer_waits
                timer.start()
                try:
                    await pool.ask({"op": "sleep", "seconds": 0.6})
                finally:
                    timer.cancel()
                done = time.monotonic()
                assert pool._answer_waits > waits
                assert what in seen, f"{what}: ran only after the ask"
                assert seen[what] < done - 0.3, f"{what}: ran {done - seen[what]:.3f} s early"
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


async def test_back_to_back_quick_asks_let_threads_and_sockets_reach_the_loop_at_once():
    """Asks answered within microseconds, one after another, with no timer due: a thread's
    call_soon_threadsafe and a socket that becomes readable are still served within
    milliseconds, not when some timer next fires."""
    loop = asyncio.get_running_loop()
    seen: dict[str, float] = {}
    a, b = socket.socketpair()
    loop.add_reader(a.fileno(), lambda: seen.setdefault("socket", time.monotonic()))
    try:
        async with kameo.Pool(
            f"{BASIC}:cmd", size=1, heartbeat_interval=5.0, heartbeat_timeout=30.0
        ) as pool:
            sent: dict[str, float] = {}

            def poke() -> None:
                sent["thread"] = time.monotonic()
                loop.call_soon_threadsafe(seen.setdefault, "thread", time.monotonic())
                time.sleep(0.05)
                sent["socket"] = time.monotonic()
                b.send(b"x")

            threading.Timer(0.1, poke).start()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.5:
                await pool.ask({"op": "echo", "value": 1})
            assert pool._answer_waits > 0
        for what in ("thread", "socket"):
            assert what in seen, f"{what}: not served during the asks"
            assert seen[what] - sent[what] < 0.02, (
                f"{what}: served {seen[what] - sent[what]:.3f} s late"
            )
    finally:
        loop.remove_reader(a.fileno())
        a.close()
        b.close()


async def test_an_answered_ask_with_a_timeout_is_freed_as_soon_as_it_is_dropped():
    # Nothing (its timer, a done callback waiting for a loop iteration) keeps the future, and
    # with it the reply, alive once the caller has its answer and drops it.
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        for _ in range(3):
            await asyncio.sleep(0.01)  # nothing else to run: answered without the loop
            fut = pool.ask({"op": "echo", "value": "x"}, timeout=10.0)
            ref = weakref.ref(fut)
            assert await fut == "x"
            del fut
            assert ref() is None


@pytest.mark.parametrize("spin_us", ["0", "5000"])
async def test_answers_arrive_whether_workers_spin_before_sleeping_or_not(spin_us):
    # KAMEO_SPIN_US: how long a process looks for data before it sleeps (workers read it
    # from the environment the pool gives them).
    async with kameo.Pool(f"{BASIC}:cmd", size=1, env={"KAMEO_SPIN_US": spin_us}) as pool:
        for i in range(20):
            assert await pool.ask({"op": "echo", "value": i}) == i
        assert await pool.ask({"op": "sleep", "seconds": 0.05, "value": "late"}) == "late"


@pytest.mark.parametrize("bad", ["fast", -1, True, 1.5])
def test_prefetch_must_be_a_count_or_auto(bad):
    with pytest.raises(ValueError, match="prefetch"):
        kameo.Pool(f"{BASIC}:echo", prefetch=bad)


async def test_max_concurrency_runs_async_handlers_concurrently():
    async with kameo.Pool(f"{BASIC}:track", size=1, max_concurrency=4) as pool:
        start = time.monotonic()
        replies = await asyncio.gather(
            *(pool.ask({"seconds": 0.3, "value": i}, timeout=10.0) for i in range(4))
        )
        elapsed = time.monotonic() - start
        assert [r["value"] for r in replies] == list(range(4))
        assert max(r["max_running"] for r in replies) == 4
        assert elapsed < 1.0, f"4 concurrent 0.3 s handlers took {elapsed:.2f} s"


@pytest.mark.parametrize("max_concurrency", [1, 4])
async def test_async_handler_runs_in_its_own_task_and_context(max_concurrency: int):
    # Async handlers start eagerly in the worker: from the first line current_task() is the
    # task that runs the rest, asyncio.timeout() and TaskGroup work, and a context variable set
    # by one request is not seen by the next.
    async with kameo.Pool(f"{BASIC}:task_probe", size=1, max_concurrency=max_concurrency) as pool:
        results = await asyncio.wait_for(
            asyncio.gather(*(pool.ask({"i": i}) for i in range(8))), 10.0
        )
    expected = {"before": None, "in_task": True, "same_task": True, "mark": True}
    assert results == [expected] * 8


async def test_default_max_concurrency_is_one():
    async with kameo.Pool(f"{BASIC}:track", size=1) as pool:
        replies = await asyncio.gather(
            *(pool.ask({"seconds": 0.05, "value": i}, timeout=10.0) for i in range(4))
        )
        assert [r["value"] for r in replies] == list(range(4))
        assert max(r["max_running"] for r in replies) == 1


async def test_least_loaded_worker_is_chosen():
    async with kameo.Pool(f"{BASIC}:cmd", size=2, max_concurrency=4) as pool:
        long = asyncio.ensure_future(pool.ask({"op": "sleep", "seconds": 1.0}, timeout=10.0))
        assert await async_wait_until(
            lambda: sorted(w.in_flight for w in pool.workers) == [0, 1], 3.0
        )
        busy_pid = next(w.pid for w in pool.workers if w.in_flight == 1)
        idle_pid = next(w.pid for w in pool.workers if w.in_flight == 0)
        for _ in range(5):
            pid = await pool.ask({"op": "pid"}, timeout=5.0)
            assert pid == idle_pid, "request went to the busier worker"
        assert await long == busy_pid


async def test_workers_start_concurrently():
    # Each worker spends 1 s importing the handler module; sequential startup
    # of two workers would need at least 2 s.
    start = time.monotonic()
    async with kameo.Pool("handlers.slow_import:handler", size=2) as pool:
        elapsed = time.monotonic() - start
        assert await pool.ask("ok", timeout=5.0) == "ok"
        assert all(w.state == "ready" for w in pool.workers)
    assert elapsed < 1.8, f"startup of 2 workers took {elapsed:.2f} s"


async def test_env_is_added_to_worker_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KAMEO_TEST_INHERITED", "from-parent")
    async with kameo.Pool(f"{BASIC}:cmd", size=1, env={"KAMEO_TEST_X": "hello wörld"}) as pool:
        assert await pool.ask({"op": "env", "name": "KAMEO_TEST_X"}, timeout=5.0) == "hello wörld"
        inherited = await pool.ask({"op": "env", "name": "KAMEO_TEST_INHERITED"}, timeout=5.0)
        assert inherited == "from-parent"
    assert "KAMEO_TEST_X" not in os.environ


async def test_env_defaults_to_parent_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KAMEO_TEST_ONLY_PARENT", "yes")
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        assert await pool.ask({"op": "env", "name": "KAMEO_TEST_ONLY_PARENT"}, timeout=5.0) == "yes"
        assert await pool.ask({"op": "env", "name": "KAMEO_TEST_X"}, timeout=5.0) is None


async def test_cwd_option(tmp_path):
    async with kameo.Pool(f"{BASIC}:cmd", size=1, cwd=str(tmp_path)) as pool:
        got = await pool.ask({"op": "cwd"}, timeout=5.0)
        assert os.path.realpath(got) == os.path.realpath(tmp_path)
    assert os.path.realpath(os.getcwd()) != os.path.realpath(tmp_path)


async def test_cwd_defaults_to_parent_cwd():
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        got = await pool.ask({"op": "cwd"}, timeout=5.0)
        assert os.path.realpath(got) == os.path.realpath(os.getcwd())


def test_ask_outside_a_running_loop_is_a_kameo_error():
    pool = kameo.Pool("handlers.basic:echo", size=1)
    with pytest.raises(kameo.PoolClosed, match=r"not started.*outside a running event loop"):
        pool.ask(1)


def test_pool_stats_and_ask_future_are_exported():
    assert kameo.PoolStats is kameo.pool.PoolStats
    assert issubclass(kameo.AskFuture, asyncio.Future)
    assert "PoolStats" in kameo.__all__ and "AskFuture" in kameo.__all__


#: What a sync worker serving a plain function does not need, so does not import: the
#: modules each cost a fresh worker (and the zygote) a few milliseconds before it is ready.
NOT_IMPORTED_BY_A_SYNC_WORKER = {
    "asyncio",
    "collections",
    "contextlib",
    "dataclasses",
    "functools",
    "inspect",
    "json",
    "logging",
    "pickle",
    "socket",
    "subprocess",
    "threading",
    "traceback",
    "typing",
}


async def test_a_sync_worker_imports_only_what_it_needs():
    """Beyond what the interpreter imports by itself (this venv's site included), a worker
    serving a sync function imports none of NOT_IMPORTED_BY_A_SYNC_WORKER (in both start
    modes: a zygote imports them no more than the workers it forks)."""
    import subprocess
    import sys

    bare = subprocess.run(
        [sys.executable, "-c", "import sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    async with kameo.Pool("handlers.logs_late:modules", size=1) as pool:
        modules = set(await pool.ask(None, timeout=10))
        assert await pool.ask(None, timeout=10)  # and it serves a second request alike
    assert "kameo._worker" in modules
    assert sorted((modules - set(bare)) & NOT_IMPORTED_BY_A_SYNC_WORKER) == []
