"""Closing, process reaping, crash handling and stderr forwarding."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import kameo
import pytest
from conftest import (
    TESTS_DIR,
    async_wait_until,
    child_pids,
    fd_count,
    in_start_mode,
    pid_alive,
    pid_exists,
    pid_gone_or_zombie,
    socket_fd_count,
    start_mode,
    wait_until,
    zygotes_of,
)

BASIC = "handlers.basic"


# --------------------------------------------------------------------------- close


async def test_close_reaps_children_and_sockets(baseline_children):
    sockets_before = socket_fd_count()
    pool = kameo.Pool(f"{BASIC}:whoami", size=2)
    await pool.start()
    pids = [w.pid for w in pool.workers]
    assert all(pid_alive(p) for p in pids)
    replies = await asyncio.gather(*(pool.ask(i, timeout=5.0) for i in range(20)))
    assert {r["pid"] for r in replies} <= set(pids)
    await pool.close()
    for pid in pids:
        # reaped, not merely dead: a zombie still has a /proc entry
        assert not pid_exists(pid), f"worker {pid} still exists after close (state zombie?)"
    assert socket_fd_count() <= sockets_before
    leftover = child_pids() - baseline_children
    assert not leftover, f"children left after close: {leftover}"


async def test_context_manager_exit_reaps_children():
    sockets_before = socket_fd_count()
    async with kameo.Pool(f"{BASIC}:echo", size=2) as pool:
        pids = [w.pid for w in pool.workers]
        assert await pool.ask("x", timeout=5.0) == "x"
    for pid in pids:
        assert not pid_exists(pid), f"worker {pid} still exists after context exit"
    assert socket_fd_count() <= sockets_before


async def test_context_manager_exit_on_exception_reaps_children():
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="user error"):
        async with kameo.Pool(f"{BASIC}:echo", size=2) as pool:
            pids = [w.pid for w in pool.workers]
            raise RuntimeError("user error")
    assert pids
    for pid in pids:
        assert not pid_exists(pid)


async def test_repeated_pools_do_not_leak_fds():
    # warm up anything created lazily once per process (runtime, loop internals)
    async with kameo.Pool(f"{BASIC}:echo", size=2) as pool:
        await pool.ask(1, timeout=5.0)
    before = fd_count()
    for _ in range(3):
        async with kameo.Pool(f"{BASIC}:echo", size=2) as pool:
            await pool.ask(1, timeout=5.0)
    assert fd_count() <= before, f"fd count grew from {before} to {fd_count()}"


async def test_close_is_idempotent():
    pool = kameo.Pool(f"{BASIC}:echo", size=1)
    await pool.start()
    pid = pool.workers[0].pid
    await pool.close()
    await pool.close()
    await pool.close(grace=0.1)
    assert not pid_exists(pid)

    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool2:
        pass
    await pool2.close()


async def test_ask_after_close_raises_pool_closed():
    pool = kameo.Pool(f"{BASIC}:echo", size=1)
    await pool.start()
    assert await pool.ask(1, timeout=5.0) == 1
    await pool.close()
    with pytest.raises(kameo.PoolClosed):
        await pool.ask(2, timeout=5.0)
    with pytest.raises(kameo.KameoError):
        await pool.ask(3, timeout=5.0)


async def test_ask_after_context_exit_raises_pool_closed():
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        pass
    with pytest.raises(kameo.PoolClosed):
        await pool.ask("late", timeout=5.0)


async def test_in_flight_ask_completes_within_grace():
    pool = kameo.Pool(f"{BASIC}:cmd", size=1)
    await pool.start()
    pid = pool.workers[0].pid
    task = asyncio.ensure_future(
        pool.ask({"op": "sleep", "seconds": 0.5, "value": "done"}, timeout=10.0)
    )
    assert await async_wait_until(lambda: pool.workers[0].in_flight == 1, 3.0)
    start = time.monotonic()
    await pool.close(grace=5.0)
    elapsed = time.monotonic() - start
    # the reply arrived during the grace period (the awaiting task may need one more
    # loop iteration to observe it, but must not have failed)
    assert await asyncio.wait_for(task, 1.0) == "done"
    assert elapsed < 4.0
    assert not pid_exists(pid)


async def test_close_does_not_wait_beyond_grace():
    pool = kameo.Pool(f"{BASIC}:cmd", size=1)
    await pool.start()
    pid = pool.workers[0].pid
    task = asyncio.ensure_future(pool.ask({"op": "sleep", "seconds": 30.0}, timeout=60.0))
    assert await async_wait_until(lambda: pool.workers[0].in_flight == 1, 3.0)
    start = time.monotonic()
    await pool.close(grace=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"close(grace=0.5) took {elapsed:.2f} s"
    assert not pid_exists(pid)
    with pytest.raises(kameo.KameoError):
        await asyncio.wait_for(task, 5.0)


async def test_close_fails_the_running_and_the_prefetched_requests_with_pool_closed(
    tmp_path: Path,
):
    """A long request running and two sent ahead behind it on the same worker: close(grace)
    ends them all with PoolClosed (the pool was closed, no worker crashed), the running one
    naming the grace it was given."""
    started = tmp_path / "started"
    async with kameo.Pool(f"{BASIC}:cmd", size=1, max_concurrency=1, prefetch=2) as pool:
        first = asyncio.ensure_future(
            pool.ask({"op": "sleep", "seconds": 30.0, "started": str(started)}, timeout=60.0)
        )
        assert await async_wait_until(started.exists, 10.0), "the first request did not start"
        behind = [
            asyncio.ensure_future(pool.ask({"op": "sleep", "seconds": 30.0}, timeout=60.0))
            for _ in range(2)
        ]
        assert await async_wait_until(lambda: pool.workers[0].in_flight == 3, 10.0), (
            "the two requests behind were not sent ahead to the busy worker"
        )
        await pool.close(grace=0.5)
        results = await asyncio.wait_for(
            asyncio.gather(first, *behind, return_exceptions=True), 10.0
        )
    assert all(isinstance(r, kameo.PoolClosed) for r in results), results
    assert not any(isinstance(r, kameo.WorkerCrashed) for r in results), results
    assert "grace=0.5s" in str(results[0]), results[0]
    assert "before the request completed" in str(results[0]), results[0]
    assert pool.stats().crashes == 0


async def test_a_cancelled_request_still_running_at_close_is_killed_not_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A cancelled sync request outlives cancel_grace while the pool closes (what Ctrl-C in
    ``async with Pool`` does): its worker is killed, nothing is replaced, and the log says so."""
    caplog.set_level(logging.INFO, logger="kameo")
    started = tmp_path / "started"
    pool = kameo.Pool(f"{BASIC}:cmd", size=1, cancel_grace=0.3)
    await pool.start()
    task = asyncio.ensure_future(
        pool.ask({"op": "sleep", "seconds": 30.0, "started": str(started)})
    )
    assert await async_wait_until(started.exists, 10.0), "the request did not start"
    task.cancel()
    await pool.close(grace=5.0)
    with pytest.raises(asyncio.CancelledError):
        await task
    messages = [r.getMessage() for r in caplog.records if r.name == "kameo"]
    assert not any("replac" in m for m in messages), messages
    assert any(
        "did not stop a cancelled request within cancel_grace=0.3s; killing it (the pool is "
        "closing)" in m
        for m in messages
    ), messages
    assert pool.stats().crashes == 0


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, os, signal, sys
    import kameo

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")

    async def main():
        async with kameo.Pool("handlers.basic:cmd", size=2) as pool:
            started = [os.path.join(sys.argv[1], f"started{i}") for i in range(2)]
            asks = [pool.ask({"op": "sleep", "seconds": 30.0, "started": f}) for f in started]
            while not all(os.path.exists(f) for f in started):
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.gather(*asks)

    asyncio.run(main())
    """
)


def test_ctrl_c_with_sync_handlers_running_replaces_no_worker(tmp_path: Path):
    script = tmp_path / "parent.py"
    script.write_text(in_start_mode(CTRL_C_SCRIPT))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        env=env,
        cwd=str(tmp_path),
        timeout=60,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert "KeyboardInterrupt" in stderr, stderr
    logs = [line for line in stderr.splitlines() if line.startswith("LOG ")]
    assert not any("replac" in line for line in logs), stderr
    killed = [line for line in logs if "killing it (the pool is closing)" in line]
    assert len(killed) == 2, stderr  # one per worker, each once


# --------------------------------------------------------------------------- parent SIGKILL

PARENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import kameo

    async def main():
        async with kameo.Pool("handlers.basic:echo", size=2) as pool:
            assert await pool.ask("ping", timeout=10.0) == "ping"
            print(json.dumps([w.pid for w in pool.workers]), flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_parent_sigkill_takes_workers_down(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(in_start_mode(PARENT_SCRIPT))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(tmp_path),
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        assert ready, "parent script did not report worker pids"
        line = proc.stdout.readline()
        assert line, f"parent exited early: {proc.stderr.read().decode(errors='replace')}"
        pids = json.loads(line)
        assert len(pids) == 2
        zygotes = zygotes_of(pids, proc.pid)
        assert len(zygotes) == (start_mode() == "zygote"), zygotes
        pids += zygotes
        assert all(pid_alive(p) for p in pids)

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        start = time.monotonic()
        gone = wait_until(lambda: all(pid_gone_or_zombie(p) for p in pids), 2.0)
        elapsed = time.monotonic() - start
        alive = [p for p in pids if pid_alive(p)]
        assert gone, f"workers {alive} still alive {elapsed:.2f} s after the parent was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


# --------------------------------------------------------------------------- worker crashes


async def test_worker_sigkill_raises_worker_crashed_and_pool_recovers(tmp_path: Path):
    started = tmp_path / "started"
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        old = pool.workers[0]
        old_pid, old_id = old.pid, old.id
        msg = {"op": "sleep", "seconds": 20.0, "started": str(started)}
        task = asyncio.ensure_future(pool.ask(msg, timeout=30.0))
        # Killed while the handler runs: the request may have had effects, so it fails (one
        # the worker had not taken up yet would run on the replacement instead).
        assert await async_wait_until(started.exists, 3.0)
        start = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(kameo.WorkerCrashed) as ei:
            await asyncio.wait_for(task, 10.0)
        elapsed = time.monotonic() - start
        err = ei.value
        assert isinstance(err, kameo.KameoError)
        assert err.pid == old_pid
        assert err.worker_id == old_id
        assert err.signal == signal.SIGKILL == 9
        assert err.exitcode is None
        assert isinstance(err.stderr_tail, str)
        assert elapsed < 3.0, f"crash reported after {elapsed:.2f} s"

        # the dead worker was reaped and replaced; the pool keeps serving
        new_pid = await pool.ask({"op": "pid"}, timeout=15.0)
        assert new_pid != old_pid
        assert pid_alive(new_pid)
        assert pool.size == 1
        assert await async_wait_until(
            lambda: len(pool.workers) == 1 and pool.workers[0].state == "ready", 5.0
        )
        assert pool.workers[0].pid == new_pid
        assert await async_wait_until(lambda: not pid_exists(old_pid), 3.0), (
            "killed worker was never reaped"
        )


async def test_worker_exit_reports_exitcode_and_stderr_tail():
    marker = f"dying-words-{uuid.uuid4().hex}"
    async with kameo.Pool(f"{BASIC}:cmd", size=2) as pool:
        pids = {w.pid for w in pool.workers}
        with pytest.raises(kameo.WorkerCrashed) as ei:
            await pool.ask({"op": "exit", "code": 3, "text": marker}, timeout=10.0)
        err = ei.value
        assert err.pid in pids
        assert err.exitcode == 3
        assert err.signal is None
        assert marker in err.stderr_tail
        # the pool is back to full size with live workers
        assert await async_wait_until(
            lambda: (
                len(pool.workers) == 2
                and all(w.state == "ready" and pid_alive(w.pid) for w in pool.workers)
            ),
            10.0,
        )
        assert err.pid not in {w.pid for w in pool.workers}
        results = await asyncio.gather(
            *(pool.ask({"op": "echo", "value": i}, timeout=10.0) for i in range(10))
        )
        assert results == list(range(10))


async def test_crash_fails_only_the_requests_on_that_worker():
    async with kameo.Pool(f"{BASIC}:cmd", size=2) as pool:
        slow = asyncio.ensure_future(
            pool.ask({"op": "sleep", "seconds": 0.8, "value": "survivor"}, timeout=10.0)
        )
        assert await async_wait_until(lambda: any(w.in_flight for w in pool.workers), 3.0)
        with pytest.raises(kameo.WorkerCrashed):
            await pool.ask({"op": "exit", "code": 1}, timeout=10.0)
        assert await slow == "survivor"


# --------------------------------------------------------------------------- stderr forwarding


async def test_worker_stderr_goes_to_logging(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG, logger="kameo.worker")
    marker = f"kameo-stderr-marker-{uuid.uuid4().hex}"
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        assert await pool.ask({"op": "stderr", "text": marker}, timeout=5.0) == "printed"

        def seen() -> bool:
            return any(
                marker in r.getMessage()
                and (r.name == "kameo.worker" or r.name.startswith("kameo.worker."))
                for r in caplog.records
            )

        assert await async_wait_until(seen, 5.0), "marker not logged; kameo records: " + repr(
            [(r.name, r.getMessage()) for r in caplog.records if "kameo" in r.name]
        )
