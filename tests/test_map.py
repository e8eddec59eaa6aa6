"""Pool.map: lazy input, order, batches, errors in place, cancellation, progress.

Real workers; targets in tests/handlers/mapping.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator

import kameo
import pytest
from conftest import async_wait_until

M = "handlers.mapping"


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_results_in_input_order_or_as_they_finish(max_concurrency: int) -> None:
    async with kameo.Pool(size=2, max_concurrency=max_concurrency) as pool:
        n = 5000
        assert [r async for r in pool.map(range(n), fn=f"{M}:square")] == [i * i for i in range(n)]
        assert [r async for r in pool.map(range(100), fn=f"{M}:async_square")] == [
            i * i for i in range(100)
        ]
        got = [r async for r in pool.map(range(n), fn=f"{M}:square", ordered=False)]
        assert sorted(got) == [i * i for i in range(n)]
        assert [r async for r in pool.map([], fn=f"{M}:square")] == []
        # Fixed batch sizes and windows give the same results.
        for chunksize, window in ((1, 1), (7, 3), (100, None)):
            got = [
                r
                async for r in pool.map(
                    range(50), fn=f"{M}:square", chunksize=chunksize, window=window
                )
            ]
            assert got == [i * i for i in range(50)]


async def test_the_pool_handler_without_fn_and_bad_uses() -> None:
    async with kameo.Pool(f"{M}:handler", size=1) as pool:
        assert [r async for r in pool.map(range(3))] == [1000, 1001, 1002]
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(kameo.HandlerTypeError, match="fn="):
            pool.map(range(3))
        with pytest.raises(ValueError, match="window"):
            pool.map(range(3), fn=f"{M}:square", window=0)
        with pytest.raises(ModuleNotFoundError, match="no_such_mod"):
            async for _ in pool.map(range(3), fn="no_such_mod:f"):
                pass
        # An unencodable result comes back as a Ref, the others as values.
        got = [r async for r in pool.map(range(2), fn=f"{M}:lock", chunksize=2)]
        assert all(isinstance(r, kameo.Ref) for r in got)
        assert await got[0].locked() is False


async def test_input_is_pulled_lazily_within_the_window() -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    async with kameo.Pool(size=2) as pool:
        taken = 0
        async for _ in pool.map(endless(), fn=f"{M}:square", window=64):
            taken += 1
            if taken == 1000:
                break
        assert pulled <= 1000 + 64

        async def aitems() -> AsyncIterator[int]:
            for i in range(300):
                await asyncio.sleep(0)
                yield i

        assert [r async for r in pool.map(aitems(), fn=f"{M}:square")] == [
            i * i for i in range(300)
        ]


async def test_an_error_is_raised_in_place_or_returned() -> None:
    async with kameo.Pool(size=2) as pool:
        items = [1, 2, -3, 4, -5, 6]
        got = []
        with pytest.raises(ValueError, match="negative: -3") as info:
            async for r in pool.map(items, fn=f"{M}:check"):
                got.append(r)
        assert got == [1, 2]
        assert isinstance(info.value, kameo.RemoteError) and "check" in info.value.remote_traceback
        out = [r async for r in pool.map(items, fn=f"{M}:check", return_exceptions=True)]
        assert out[:2] == [1, 2] and out[3] == 4 and out[5] == 6
        assert isinstance(out[2], ValueError) and isinstance(out[4], ValueError)
        # The error of one item did not cost the others of its batch.
        out = [
            r async for r in pool.map(items, fn=f"{M}:check", return_exceptions=True, chunksize=6)
        ]
        assert [r for r in out if not isinstance(r, Exception)] == [1, 2, 4, 6]
        assert await pool.call(f"{M}:square", 3) == 9


async def test_a_worker_death_fails_only_its_items() -> None:
    async with kameo.Pool(size=2) as pool:
        out = [
            r
            async for r in pool.map(
                range(40), fn=f"{M}:die_on", return_exceptions=True, chunksize=1
            )
        ]
        assert isinstance(out[13], kameo.WorkerCrashed)
        assert "SIGKILL" in str(out[13])
        lost = [i for i, r in enumerate(out) if isinstance(r, Exception)]
        assert all(isinstance(out[i], kameo.WorkerCrashed) for i in lost)
        assert len(lost) < 10  # only what was in flight on that worker
        assert [r async for r in pool.map(range(5), fn=f"{M}:square")] == [0, 1, 4, 9, 16]
        with pytest.raises(kameo.WorkerCrashed):
            async for _ in pool.map(range(40), fn=f"{M}:die_on"):
                pass


async def test_leaving_the_loop_cancels_work_in_flight(tmp_path) -> None:
    marks = tmp_path / "marks"
    env = {"KAMEO_TEST_MARKS": str(marks)}
    async with kameo.Pool(size=2, env=env) as pool:
        async for x in pool.map(range(200), fn=f"{M}:slow_mark", window=4, chunksize=1):
            if x == 1:
                break
        await asyncio.sleep(0.5)  # what was running finishes; nothing queued may start
        ran = marks.read_text().split()
        assert len(ran) <= 8, ran
        # The task awaiting a map being cancelled cancels it too.
        marks.unlink()
        marks.touch()

        async def consume() -> None:
            async for _ in pool.map(range(200), fn=f"{M}:slow_mark", window=4, chunksize=1):
                pass

        task = asyncio.create_task(consume())
        assert await async_wait_until(lambda: len(marks.read_text().split()) >= 2, timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        assert len(marks.read_text().split()) <= 12
        assert await pool.call(f"{M}:square", 2) == 4


async def test_a_timeout_bounds_each_item() -> None:
    async with kameo.Pool(size=2) as pool:
        out = [
            r
            async for r in pool.map(
                [0.0, 5.0, 0.0], fn=f"{M}:nap", timeout=0.5, return_exceptions=True
            )
        ]
        assert out[0] == 0.0 and out[2] == 0.0
        assert isinstance(out[1], kameo.CallTimeout)


async def test_progress_bar(capsys) -> None:
    async with kameo.Pool(size=1) as pool:
        got = [r async for r in pool.map(range(25), fn=f"{M}:square", progress=True)]
        assert got == [i * i for i in range(25)]
        err = capsys.readouterr().err
        assert "25/25" in err
        # Without tqdm, a clear error says how to install it.
        saved = sys.modules.get("tqdm")
        sys.modules["tqdm"] = None  # type: ignore[assignment]
        try:
            with pytest.raises(ImportError, match=r"kameo\[progress\]") as info:
                pool.map(range(3), fn=f"{M}:square", progress=True)
            assert isinstance(info.value, kameo.KameoError)
        finally:
            if saved is None:
                del sys.modules["tqdm"]
            else:
                sys.modules["tqdm"] = saved
