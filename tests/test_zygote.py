"""Pool(start="zygote"): workers forked from a template process (kameo._zygote).

What a forked worker must share with an exec'd one runs in the whole suite (`--start=zygote`,
which `make test` runs too); these tests are about the zygote itself: preload, what a fork
resets, the refusal to fork a threaded process, its own death, and its descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import kameo
import pytest
from conftest import async_wait_until, child_pids, pid_alive, ppid_of

PRELOADED = "handlers.preloaded:info"
CRASHY = "handlers.crashy:cmd"


def zygote_pid(pool: kameo.Pool) -> int:
    """The parent of the pool's workers (its zygote), checked to be the same for all."""
    parents = {ppid_of(w.pid) for w in pool.workers}
    assert len(parents) == 1, parents
    (pid,) = parents
    assert pid != os.getpid(), "the workers are this process's children: not forked"
    assert ppid_of(pid) == os.getpid()
    return pid


async def info_of_each(pool: kameo.Pool) -> dict[int, dict]:
    """handlers.preloaded:info from every worker (open sessions bind to distinct workers)."""
    sessions = [pool.session() for _ in range(pool.size)]
    try:
        infos = [await s.call(PRELOADED, "fds") for s in sessions]
    finally:
        for s in sessions:
            await s.close()
    out = {info["pid"]: info for info in infos}
    assert len(out) == pool.size, out
    return out


async def test_workers_are_forked_from_a_zygote_that_imported_the_handler():
    async with kameo.Pool(PRELOADED, size=2, start="zygote") as pool:
        zygote = zygote_pid(pool)
        infos = await info_of_each(pool)
        for pid, info in infos.items():
            assert info["imported_by"] == zygote != pid  # preloaded before the fork
            assert info["ppid"] == zygote
            assert info["pgid"] == pid  # a process group of its own
        assert sorted(infos) == sorted(w.pid for w in pool.workers)
        # A fork copies the generators' state: each worker reseeds them.
        assert len({info["random"] for info in infos.values()}) == 2
        if all("numpy" in info for info in infos.values()):
            assert len({info["numpy"] for info in infos.values()}) == 2
        with open(f"/proc/{zygote}/comm") as f:
            assert f.read().strip() == "handlers zygote"  # the pool's name, cut, and its role


async def test_a_forked_worker_holds_no_descriptor_of_the_zygote_or_of_other_workers():
    async with kameo.Pool(PRELOADED, size=2, start="zygote") as pool:
        infos = await info_of_each(pool)
        sockets = []
        for info in infos.values():
            fds = info["fds"].values()
            own = [link for link in fds if link.startswith("socket:")]
            assert len(own) == 1, info["fds"]  # its own end of its socketpair only
            sockets += own
            assert not [link for link in fds if "pidfd" in link], info["fds"]
        assert len(set(sockets)) == 2


async def test_a_thread_started_at_import_makes_the_pool_exec_its_workers(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING, logger="kameo")
    async with kameo.Pool("handlers.threaded_import:echo", size=1, start="zygote") as pool:
        assert await pool.ask(5) == 5
        assert ppid_of(pool.workers[0].pid) == os.getpid()  # exec'd by the pool itself
    text = caplog.text
    assert "start='zygote' falls back to exec" in text, text
    assert "importing 'handlers.threaded_import' started threads (import-time" in text, text
    assert "never forks a threaded process" in text


async def test_a_failing_preload_makes_the_pool_exec_its_workers_and_says_why(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING, logger="kameo")
    async with kameo.Pool(
        CRASHY, size=1, start="zygote", preload=["handlers.broken_import"]
    ) as pool:
        assert await pool.ask({"op": "echo", "value": 1}) == 1
        assert ppid_of(pool.workers[0].pid) == os.getpid()
    text = caplog.text
    assert "preloading 'handlers.broken_import' failed: RuntimeError: kameo-import-boom" in text
    assert "Traceback" in text


async def test_a_preload_that_hangs_fails_the_start_within_startup_timeout(baseline_children):
    t0 = time.monotonic()
    with pytest.raises(kameo.WorkerStartupError, match=r"zygote .* did not finish importing"):
        async with kameo.Pool("handlers.hang_import:handler", start="zygote", startup_timeout=0.5):
            pass
    assert time.monotonic() - t0 < 3.0
    assert await async_wait_until(lambda: not (child_pids() - baseline_children), 2.0)


@pytest.mark.parametrize(("how", "exitcode", "sig"), [("exit", 3, None), ("sigkill", None, 9)])
async def test_a_forked_worker_that_dies_is_reported_as_an_exec_d_one_and_forked_again(
    how: str, exitcode: int | None, sig: int | None
):
    async with kameo.Pool(CRASHY, size=1, start="zygote") as pool:
        zygote = zygote_pid(pool)
        victim = pool.workers[0].pid
        with pytest.raises(kameo.WorkerCrashed) as info:
            await pool.ask({"op": "die", "how": how})
        err = info.value
        assert (err.pid, err.exitcode, err.signal) == (victim, exitcode, sig)
        assert f"crashy: dying by {how} pid={victim}" in err.stderr_tail
        assert await pool.ask({"op": "pid"}) != victim
        assert zygote_pid(pool) == zygote  # the replacement is a fork too
        assert not pid_alive(victim)


async def test_when_the_zygote_dies_its_workers_go_too_and_it_is_started_again():
    async with kameo.Pool(CRASHY, size=2, start="zygote", max_retries=0) as pool:
        zygote = zygote_pid(pool)
        old = {w.pid for w in pool.workers}
        busy = asyncio.ensure_future(pool.ask({"op": "sleep", "seconds": 30}))
        await asyncio.sleep(0.2)
        os.kill(zygote, signal.SIGKILL)
        with pytest.raises(
            kameo.WorkerCrashed, match=r"died with it: its zygote \(pid \d+\) was killed by SIGKILL"
        ):
            await asyncio.wait_for(busy, 10)
        assert await async_wait_until(lambda: not any(pid_alive(p) for p in old), 5.0)
        # Meanwhile the pool execs replacements, and serves.
        assert await pool.ask({"op": "echo", "value": 2}) == 2
        # The zygote is started again (after a second's back-off); later replacements fork.
        sup = pool._supervisor
        assert sup is not None
        assert await async_wait_until(lambda: sup.zygote is not None, 10.0)
        assert sup.zygote is not None and sup.zygote.pid != zygote
        with pytest.raises(kameo.WorkerCrashed):
            await pool.ask({"op": "die", "how": "sigkill"})
        assert await async_wait_until(
            lambda: any(ppid_of(w.pid) == sup.zygote.pid for w in pool.workers if pid_alive(w.pid)),
            10.0,
        )


async def test_close_stops_the_zygote_and_leaves_no_process(baseline_children):
    async with kameo.Pool(CRASHY, size=2, start="zygote") as pool:
        zygote = zygote_pid(pool)
        assert await pool.ask({"op": "echo", "value": 1}) == 1
    assert not pid_alive(zygote)
    assert not (child_pids() - baseline_children)


async def test_numpy_in_the_preload_forks_without_a_blas_thread():
    pytest.importorskip("numpy")
    async with kameo.Pool("handlers.numpy_preload:mean", size=2, start="zygote") as pool:
        zygote_pid(pool)  # forked: numpy's import started no thread in the zygote
        assert await pool.ask([1, 2, 3]) == 2.0
        threads = str(max(1, (os.cpu_count() or 1) // 2))
        assert await pool.call("os:getenv", "OPENBLAS_NUM_THREADS") == threads


async def test_start_and_preload_are_checked():
    with pytest.raises(ValueError, match="start must be"):
        kameo.Pool(CRASHY, start="fork")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="preload must be a list"):
        kameo.Pool(CRASHY, preload="handlers.basic")


def children_of(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


async def spare_of(pool: kameo.Pool, zygote: int, not_: set[int] = frozenset()) -> int:
    """The zygote's spare: its one child that is not a worker (once it has made it)."""
    workers = {w.pid for w in pool.workers}

    def spares() -> set[int]:
        return children_of(zygote) - workers - not_

    assert await async_wait_until(lambda: len(spares()) == 1, 10), (children_of(zygote), workers)
    (spare,) = spares()
    return spare


async def test_a_replacement_is_the_spare_the_zygote_forked_ahead():
    async with kameo.Pool(PRELOADED, size=2, start="zygote") as pool:
        zygote = zygote_pid(pool)
        spare = await spare_of(pool, zygote)
        with open(f"/proc/{spare}/comm") as f:
            assert f.read().strip() == "handlers zygote"  # not a worker yet
        victim = pool.workers[0].pid
        os.kill(victim, signal.SIGKILL)
        assert await async_wait_until(
            lambda: spare in {w.pid for w in pool.workers if w.state == "ready"}, 10
        ), pool.workers
        infos = await info_of_each(pool)
        assert infos[spare]["ppid"] == zygote and infos[spare]["pgid"] == spare
        assert infos[spare]["imported_by"] == zygote
        # its own descriptors only, as a worker forked on request
        links = infos[spare]["fds"].values()
        assert len([link for link in links if link.startswith("socket:")]) == 1, links
        # and the zygote forks the next spare
        assert await spare_of(pool, zygote, {spare, victim}) not in {spare, victim}


async def test_a_spare_that_dies_is_made_again_and_no_call_notices():
    async with kameo.Pool(PRELOADED, size=2, start="zygote") as pool:
        zygote = zygote_pid(pool)
        before = [(w.id, w.pid) for w in pool.workers]
        spare = await spare_of(pool, zygote)
        os.kill(spare, signal.SIGKILL)
        again = await spare_of(pool, zygote, {spare})
        assert again != spare and not pid_alive(spare)  # reaped by the zygote
        assert [(w.id, w.pid) for w in pool.workers] == before
        assert all(w.restarts == 0 for w in pool.workers)
        assert (await pool.ask("x"))["ppid"] == zygote
