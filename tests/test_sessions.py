"""Sessions: one worker per session, the id and state in the worker, freeing, worker death.

Real workers; targets in tests/handlers/remote.py.
"""

from __future__ import annotations

import asyncio
import os
import signal

import kameo
import pytest
from conftest import async_wait_until

R = "handlers.remote"


async def test_a_session_runs_on_one_worker_with_its_id_and_state() -> None:
    async with kameo.Pool(f"{R}:handler", size=2) as pool:
        async with pool.session() as s1, pool.session() as s2:
            assert isinstance(s1.id, str) and s1.id != s2.id
            assert s1.worker_id != s2.worker_id  # a new session goes to the least-loaded worker
            infos = await asyncio.gather(*(s1.call(f"{R}:session_info") for _ in range(20)))
            assert {i for i, _ in infos} == {s1.id} and len({p for _, p in infos}) == 1
            await s1.call(f"{R}:remember", "k", 1)
            await s2.call(f"{R}:remember", "k", 2)
            assert await s1.call(f"{R}:recall", "k") == 1
            assert await s2.call(f"{R}:recall", "k") == 2
            assert await s1.ask("m") == (s1.id, "m")
            m = await s1.new("collections:Counter", "aab")
            assert m.worker_id == s1.worker_id
            assert await s1.call("builtins:len", m) == 2
            assert [x async for x in s1.call_stream("builtins:range", 3)] == [0, 1, 2]
        # Outside a session the worker sees none.
        assert (await pool.call(f"{R}:session_info"))[0] is None
        with pytest.raises(kameo.KameoError, match="inside a session"):
            await pool.call(f"{R}:recall", "k")


async def test_closing_a_session_frees_its_objects_and_state() -> None:
    async with kameo.Pool(size=1) as pool:
        async with pool.session() as s:
            refs = [await s.new("collections:Counter", "ab") for _ in range(5)]
            await s.call(f"{R}:remember", "k", "v")
            assert await pool.call("kameo:live_refs") == 5
        assert await pool.call("kameo:live_refs") == 0
        with pytest.raises(kameo.RefError):
            await refs[0].most_common()
        async with pool.session() as s:  # a new session starts empty
            assert await s.call(f"{R}:recall", "k") is None
        with pytest.raises(kameo.PoolClosed):
            s.call("math:sqrt", 1)


async def test_a_strict_session_is_lost_with_its_worker() -> None:
    async with kameo.Pool(size=2) as pool:
        async with pool.session() as s:
            _, pid = await s.call(f"{R}:session_info")
            running = s.call(f"{R}:sleep", 30)
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(kameo.WorkerCrashed):
                await running
            with pytest.raises(kameo.SessionLost, match="gone"):
                await s.call("math:sqrt", 4)
        assert await pool.call("math:sqrt", 4) == 2.0


async def test_a_loose_session_moves_to_another_worker() -> None:
    async with kameo.Pool(size=2) as pool, pool.session(strict=False) as s:
        await s.call(f"{R}:remember", "k", 1)
        _, pid = await s.call(f"{R}:session_info")
        os.kill(pid, signal.SIGKILL)
        assert await async_wait_until(
            lambda: (
                any(w.pid == pid and w.state == "dead" for w in pool.workers)
                or pid not in {w.pid for w in pool.workers}
            ),
            timeout=10,
        )
        await asyncio.sleep(0.1)
        sid, pid2 = await s.call(f"{R}:session_info")
        assert sid == s.id and pid2 != pid
        assert await s.call(f"{R}:recall", "k") is None  # the state went with the worker


async def test_a_retiring_worker_keeps_its_open_session() -> None:
    async with kameo.Pool(size=1, max_tasks_per_worker=3) as pool:
        async with pool.session() as s:
            _, pid = await s.call(f"{R}:session_info")
            for _ in range(5):  # past max_tasks: the worker retires but stays for the session
                assert (await s.call(f"{R}:session_info"))[1] == pid
            await s.call(f"{R}:remember", "k", 1)
            assert await s.call(f"{R}:recall", "k") == 1
        # Closed: the retiring worker goes, its successor serves.
        assert await async_wait_until(lambda: pid not in {w.pid for w in pool.workers}, timeout=10)
        assert (await pool.call(f"{R}:session_info"))[1] != pid
