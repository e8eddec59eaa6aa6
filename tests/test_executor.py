"""kameo.Executor: a concurrent.futures.Executor on a pool, from sync code, threads and loops.

Real workers; functions in tests/handlers/pool_funcs.py, sent by reference.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import kameo
import pytest
from conftest import pid_alive
from handlers import pool_funcs as pf

HERE = Path(__file__).parent


def test_submit_and_map_like_the_stdlib() -> None:
    with kameo.Executor(max_workers=2) as ex:
        assert isinstance(ex, cf.Executor)
        fut = ex.submit(pf.add, 1, b=2)
        assert isinstance(fut, cf.Future)
        assert fut.result(timeout=10) == 3
        assert list(ex.map(pf.add, range(1000), range(1000))) == [2 * i for i in range(1000)]
        assert list(ex.map(pf.add, range(5), chunksize=2)) == [0, 1, 2, 3, 4]
        assert list(ex.map(pf.add, [])) == []
        # The builtin type of a remote error, raised where its result would be.
        with pytest.raises(ValueError, match="boom"):
            ex.submit(pf.fail, "boom").result(timeout=10)
        it = ex.map(pf.check, [0, 2, -3, 4])
        assert next(it) == 0 and next(it) == 2
        with pytest.raises(ValueError, match="negative"):
            next(it)


def test_functions_that_cannot_travel_by_name_fail_at_submit() -> None:
    with kameo.Executor(max_workers=1) as ex:
        with pytest.raises(kameo.SerializationError, match="lambda"):
            ex.submit(lambda: 1)
        with pytest.raises(TypeError):
            ex.map(lambda x: x, [1])


def test_map_is_lazy_and_times_out_like_the_stdlib() -> None:
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    with kameo.Executor(max_workers=2) as ex:
        for i, _ in enumerate(ex.map(pf.add, endless())):
            if i == 2000:
                break
        assert pulled < 2000 + 20_000  # within a window, not the whole (endless) input
        it = ex.map(pf.nap, [0.0, 5.0], timeout=0.5)
        assert next(it) == 0.0
        with pytest.raises(TimeoutError):
            next(it)
        assert ex.submit(pf.add, 2, 2).result(timeout=10) == 4


def test_from_threads_and_from_a_running_loop() -> None:
    with kameo.Executor(max_workers=2) as ex:
        results: list[int] = []
        lock = threading.Lock()

        def work(k: int) -> None:
            got = [ex.submit(pf.add, k, i).result(timeout=30) for i in range(50)]
            with lock:
                results.extend(got)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == sorted(k + i for k in range(4) for i in range(50))

        async def in_a_loop() -> list[int]:
            loop = asyncio.get_running_loop()
            # Blocking on a result inside a running loop (a notebook cell) does not deadlock.
            assert ex.submit(pf.add, 1, 1).result(timeout=10) == 2
            return list(
                await asyncio.gather(*(loop.run_in_executor(ex, pf.add, i, 1) for i in range(20)))
            )

        assert asyncio.run(in_a_loop()) == [i + 1 for i in range(20)]


def test_a_worker_death_fails_only_its_future() -> None:
    with kameo.Executor(max_workers=2) as ex:
        others = [ex.submit(pf.nap, 0.2) for _ in range(2)]
        with pytest.raises(kameo.WorkerCrashed, match="SIGKILL"):
            ex.submit(pf.die).result(timeout=30)
        assert [f.result(timeout=30) for f in others] == [0.2, 0.2]
        assert ex.submit(pf.add, 40, 2).result(timeout=30) == 42  # not broken


def test_cancel_a_pending_future_and_shutdown(tmp_path) -> None:
    marks = tmp_path / "marks"
    marks.touch()
    ex = kameo.Executor(max_workers=1, env={"KAMEO_TEST_MARKS": str(marks)})
    futs = [ex.submit(pf.mark, i) for i in range(40)]
    assert futs[-1].cancel()
    assert futs[-1].cancelled()
    with pytest.raises(cf.CancelledError):
        futs[-1].result(timeout=1)
    ex.shutdown(wait=True, cancel_futures=True)
    done = [f for f in futs if not f.cancelled()]
    assert all(f.done() for f in futs)
    assert len(done) < 40
    ran = [int(x) for x in marks.read_text().split()]
    assert 39 not in ran
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pf.add, 1)
    ex.shutdown()  # idempotent


def test_initializer_with_arguments() -> None:
    with kameo.Executor(max_workers=2, initializer=pf.setup, initargs=(7, "x")) as ex:
        assert {ex.submit(pf.init_state).result(timeout=10) for _ in range(4)} == {(7, "x")}


def test_interpreter_exit_with_an_open_executor_leaves_no_process() -> None:
    script = textwrap.dedent(
        """
        import kameo
        from handlers import pool_funcs as pf
        ex = kameo.Executor(max_workers=2)
        pids = {ex.submit(pf.pid).result(timeout=30) for _ in range(20)}
        print(" ".join(map(str, sorted(pids))), flush=True)
        # no shutdown: the interpreter exits with the executor open
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert pids
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)


def test_a_custom_exception_arrives_as_its_class() -> None:
    with kameo.Executor(max_workers=1) as ex:
        with pytest.raises(pf.Odd, match="odd: 3") as info:
            list(ex.map(pf.fail_odd, [0, 2, 3, 4]))
        assert isinstance(info.value, kameo.RemoteError)
        with pytest.raises(pf.Odd):
            ex.submit(pf.fail_odd, 1).result(timeout=10)


def test_a_worker_death_mid_map_fails_the_map_not_the_executor() -> None:
    with kameo.Executor(max_workers=2) as ex:
        with pytest.raises(kameo.WorkerCrashed):
            list(ex.map(pf.die_on, range(100), chunksize=1))
        assert list(ex.map(pf.add, range(10), chunksize=3)) == list(range(10))
