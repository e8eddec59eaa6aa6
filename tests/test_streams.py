"""``pool.stream()``: generator handlers streaming items to the parent.

Every timing property is proved structurally: a generator that must still be running blocks
until the test releases it (a file the test creates), and cancellation is proved by the
generator's ``finally`` writing a marker file, polled for with a generous bound.
"""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path
from typing import Any

import kameo
import pytest
from conftest import async_wait_until

MOD = "handlers.streaming"
GENERATORS = ["count", "acount"]  # a plain generator and an async generator
# A sync generator in the sync serving loop only sees CANCEL between items (it polls the socket
# every 16 items, or when it runs out of credit), so cancellation tests use slow endless streams
# and allow this long for the generator's `finally` to run.
CANCEL_BOUND = 10.0


def _target(name: str) -> str:
    return f"{MOD}:{name}"


def _progress(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < 8:
        return 0
    return int(struct.unpack("<q", data[:8])[0])


async def _assert_worker_free(pool: kameo.Pool) -> None:
    """A new stream on the (size=1) pool runs to completion promptly."""
    items = await asyncio.wait_for(_collect(pool.stream({"n": 3}, timeout=10.0)), 15.0)
    assert items == [0, 1, 2]


async def _collect(stream: kameo.Stream) -> list[Any]:
    return [item async for item in stream]


async def _wait_marker(path: Path, what: str) -> None:
    ok = await async_wait_until(path.exists, CANCEL_BOUND)
    assert ok, f"the generator's finally did not run within {CANCEL_BOUND}s after {what}"


# --------------------------------------------------------------------------- delivery


@pytest.mark.parametrize("gen", GENERATORS)
async def test_first_item_arrives_before_generator_finishes(gen: str, tmp_path: Path):
    release = tmp_path / "release"
    done = tmp_path / "done"
    msg = {"n": 5, "release": str(release), "done": str(done)}
    async with kameo.Pool(_target(gen), size=1) as pool:
        stream = pool.stream(msg, timeout=30.0)
        # The generator blocks after its first item until `release` exists (up to 20 s).
        first = await asyncio.wait_for(stream.__anext__(), 5.0)
        assert first == 0
        assert not done.exists(), "the generator finished although it was never released"
        release.write_text("go")
        rest = await asyncio.wait_for(_collect(stream), 15.0)
        assert rest == [1, 2, 3, 4]
        assert done.exists()


@pytest.mark.parametrize("gen", GENERATORS)
async def test_burst_then_stall_arrives_while_generator_waits(gen: str, tmp_path: Path):
    # Items yielded in a quick burst are batched into few writes; the last of them must still
    # reach the consumer while the generator is stalled (here: until the consumer has them).
    release = tmp_path / "release"
    burst = 50
    msg = {"n": burst + 1, "release": str(release), "release_after": burst}
    # No heartbeat for the test's duration: its write would flush the queue too.
    async with kameo.Pool(
        _target(gen), size=1, heartbeat_interval=60.0, heartbeat_timeout=120.0
    ) as pool:
        stream = pool.stream(msg, timeout=30.0)
        got = [await asyncio.wait_for(stream.__anext__(), 5.0) for _ in range(burst)]
        assert got == list(range(burst))
        release.write_text("go")
        assert await asyncio.wait_for(_collect(stream), 15.0) == [burst]


@pytest.mark.parametrize("gen", GENERATORS)
async def test_order_and_count_100k(gen: str):
    n = 100_000
    async with kameo.Pool(_target(gen), size=1) as pool:
        items = await asyncio.wait_for(_collect(pool.stream({"n": n})), 40.0)
    assert len(items) == n
    assert items == list(range(n))


async def test_each_item_exactly_once_with_concurrent_streams():
    async with kameo.Pool(_target("acount"), size=2, max_concurrency=2) as pool:
        streams = [pool.stream({"n": 2_000, "tagged": True}) for _ in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*(_collect(s) for s in streams)), 30.0)
    for items in results:
        assert [x["i"] for x in items] == list(range(2_000))
        assert len({x["pid"] for x in items}) == 1  # one stream, one generator, one worker


async def test_items_are_real_python_values():
    async with kameo.Pool(_target("count"), size=1) as pool:
        items = await _collect(pool.stream({"n": 3, "tagged": True}, timeout=10.0))
    assert [type(x) for x in items] == [dict, dict, dict]
    assert [x["i"] for x in items] == [0, 1, 2]
    assert all(type(x["pid"]) is int for x in items)


async def test_empty_stream_ends():
    async with kameo.Pool(_target("count"), size=1) as pool:
        assert await _collect(pool.stream({"n": 0}, timeout=10.0)) == []
        await _assert_worker_free(pool)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("gen", GENERATORS)
@pytest.mark.parametrize(
    ("error", "builtin", "remote_type"),
    [
        ("KeyError", KeyError, "builtins.KeyError"),
        ("ValueError", ValueError, "builtins.ValueError"),
        ("StreamError", None, "handlers.streaming.StreamError"),
    ],
)
async def test_exception_after_items(
    gen: str, error: str, builtin: type[BaseException] | None, remote_type: str, tmp_path: Path
):
    fin = tmp_path / "finally"
    msg = {"n": 10, "raise_after": 3, "error": error, "finally": str(fin)}
    got: list[Any] = []
    async with kameo.Pool(_target(gen), size=1) as pool:
        with pytest.raises(kameo.RemoteError) as info:
            async for item in pool.stream(msg, timeout=15.0):
                got.append(item)
        assert got == [0, 1, 2], "the items yielded before the exception must arrive first"
        err = info.value
        assert err.remote_type == remote_type
        if builtin is not None:
            assert isinstance(err, builtin)
        assert "boom" in err.remote_message
        assert gen in err.remote_traceback  # the generator's frame is in the traceback
        assert fin.exists()
        await _assert_worker_free(pool)


async def test_exception_after_last_item():
    msg = {"n": 2, "raise_after": 2, "error": "KeyError"}
    got: list[Any] = []
    async with kameo.Pool(_target("count"), size=1) as pool:
        with pytest.raises(KeyError):
            async for item in pool.stream(msg, timeout=15.0):
                got.append(item)
    assert got == [0, 1]


# --------------------------------------------------------------------------- backpressure


@pytest.mark.parametrize("gen", GENERATORS)
async def test_backpressure_bounds_items_in_flight(gen: str, tmp_path: Path):
    window = 16
    progress = tmp_path / "progress"
    fin = tmp_path / "finally"
    msg = {"n": 1_000_000, "progress": str(progress), "finally": str(fin)}
    async with kameo.Pool(_target(gen), size=1, stream_window=window) as pool:
        consumed = 0
        async for item in pool.stream(msg, timeout=50.0):
            assert item == consumed
            consumed += 1
            if consumed < 33:
                await asyncio.sleep(0.01)  # a slow consumer: 33 items in ~0.33 s
                continue
            # Stop consuming; give the worker ample time to run as far ahead as it can.
            await asyncio.sleep(0.5)
            first = _progress(progress)
            await asyncio.sleep(0.3)
            second = _progress(progress)
            # Bound on produced - consumed: the worker sends at most `window` items beyond the
            # credit it was granted, and the parent grants credit for a batch only when the
            # consumer comes back for more, i.e. after the `async for` used every item of it.
            # So produced - consumed <= window (+1: the generator may have produced the next
            # item before it waits for credit).
            assert second == first, f"the worker kept producing while stalled: {first}->{second}"
            assert second - consumed <= window + 1, (
                f"produced {second}, consumed {consumed}: more than window={window} ahead"
            )
            assert second >= consumed
            break
        # Leaving the loop cancels the generator: it must not run on to 1,000,000.
        await _wait_marker(fin, "break")
        final = _progress(progress)
        assert final <= consumed + window + 1
        await _assert_worker_free(pool)


@pytest.mark.parametrize("gen", GENERATORS)
async def test_small_window_still_delivers_everything(gen: str):
    async with kameo.Pool(_target(gen), size=1, stream_window=1) as pool:
        items = await asyncio.wait_for(_collect(pool.stream({"n": 500})), 20.0)
    assert items == list(range(500))


# --------------------------------------------------------------------------- early exit


def _endless(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    fin = tmp_path / "finally"
    return {"n": None, "delay": 0.05, "finally": str(fin)}, fin


@pytest.mark.parametrize("gen", GENERATORS)
async def test_break_cancels_generator(gen: str, tmp_path: Path):
    msg, fin = _endless(tmp_path)
    async with kameo.Pool(_target(gen), size=1) as pool:
        got = []
        async for item in pool.stream(msg):
            got.append(item)
            if len(got) == 3:
                break
        assert got == [0, 1, 2]
        await _wait_marker(fin, "break")
        await _assert_worker_free(pool)


@pytest.mark.parametrize("gen", GENERATORS)
async def test_aclose_cancels_generator(gen: str, tmp_path: Path):
    msg, fin = _endless(tmp_path)
    async with kameo.Pool(_target(gen), size=1) as pool:
        stream = pool.stream(msg)
        assert await asyncio.wait_for(stream.__anext__(), 5.0) == 0
        await stream.aclose()  # `stream` stays referenced: aclose itself must cancel
        await _wait_marker(fin, "aclose()")
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await _assert_worker_free(pool)
        del stream


@pytest.mark.parametrize("gen", GENERATORS)
async def test_async_with_cancels_generator(gen: str, tmp_path: Path):
    msg, fin = _endless(tmp_path)
    async with kameo.Pool(_target(gen), size=1) as pool:
        stream = pool.stream(msg)
        async with stream as s:
            async for item in s:
                assert item == 0
                break
        await _wait_marker(fin, "leaving 'async with'")
        await _assert_worker_free(pool)
        del stream


@pytest.mark.parametrize("gen", GENERATORS)
async def test_task_cancellation_cancels_generator(gen: str, tmp_path: Path):
    msg, fin = _endless(tmp_path)
    async with kameo.Pool(_target(gen), size=1) as pool:
        first = asyncio.Event()
        got: list[Any] = []

        async def consume() -> None:
            async for item in pool.stream(msg):
                got.append(item)
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert got[:2] == list(range(min(2, len(got))))
        await _wait_marker(fin, "cancelling the consuming task")
        await _assert_worker_free(pool)


@pytest.mark.parametrize("gen", GENERATORS)
async def test_timeout_raises_and_cancels_generator(gen: str, tmp_path: Path):
    msg, fin = _endless(tmp_path)
    async with kameo.Pool(_target(gen), size=1) as pool:
        got: list[Any] = []
        start = time.monotonic()
        with pytest.raises(kameo.CallTimeout):
            async with asyncio.timeout(15.0):  # a guard: the stream's own timeout must fire
                async for item in pool.stream(msg, timeout=0.5):
                    got.append(item)
        assert time.monotonic() - start >= 0.5
        assert got and got == list(range(len(got)))
        await _wait_marker(fin, "the stream's timeout")
        await _assert_worker_free(pool)


async def test_timeout_while_waiting_for_first_item(tmp_path: Path):
    # The generator yields item 0, then blocks; the consumer asks for item 1 and times out.
    release = tmp_path / "release"
    fin = tmp_path / "finally"
    msg = {"n": 5, "release": str(release), "finally": str(fin)}
    async with kameo.Pool(_target("acount"), size=1) as pool:
        got: list[Any] = []
        with pytest.raises(kameo.CallTimeout):
            async with asyncio.timeout(15.0):
                async for item in pool.stream(msg, timeout=0.5):
                    got.append(item)
        assert got == [0]
        await _wait_marker(fin, "the stream's timeout")
        await _assert_worker_free(pool)


@pytest.mark.parametrize("gen", GENERATORS)
async def test_timeout_bounds_stream_with_fast_producer(gen: str, tmp_path: Path):
    # The docstring: "timeout bounds the whole stream". A producer faster than the consumer
    # keeps items buffered, so the stream never has to wait for one; the timeout must still fire.
    fin = tmp_path / "finally"
    msg = {"n": None, "finally": str(fin)}
    async with kameo.Pool(_target(gen), size=1) as pool:
        start = time.monotonic()
        timed_out = False
        try:
            async for _item in pool.stream(msg, timeout=0.5):
                await asyncio.sleep(0.005)
                if time.monotonic() - start > 3.0:
                    break
        except kameo.CallTimeout:
            timed_out = True
        elapsed = time.monotonic() - start
        assert timed_out, f"no CallTimeout after {elapsed:.1f}s of a stream with timeout=0.5"
        await _wait_marker(fin, "the stream's timeout")
        await _assert_worker_free(pool)


# --------------------------------------------------------------------------- handler types


@pytest.mark.parametrize("gen", GENERATORS)
async def test_ask_on_generator_raises_handler_type_error(gen: str):
    async with kameo.Pool(_target(gen), size=1) as pool:
        with pytest.raises(kameo.HandlerTypeError) as info:
            await pool.ask({"n": 1}, timeout=10.0)
        err = info.value
        assert isinstance(err, TypeError)
        assert isinstance(err, kameo.KameoError)
        text = str(err)
        assert _target(gen) in text
        assert "pool.stream()" in text
        await _assert_worker_free(pool)


@pytest.mark.parametrize("fn", ["plain", "aplain"])
async def test_stream_on_function_raises_handler_type_error(fn: str):
    async with kameo.Pool(_target(fn), size=1) as pool:
        with pytest.raises(kameo.HandlerTypeError) as info:
            async with asyncio.timeout(10.0):
                async for _ in pool.stream({"n": 1}):
                    pass
        err = info.value
        assert isinstance(err, TypeError)
        text = str(err)
        assert _target(fn) in text
        assert "pool.ask()" in text
        # The pool is unaffected.
        assert await pool.ask("hi", timeout=10.0) == "hi"


def test_stream_window_must_be_positive():
    with pytest.raises(ValueError):
        kameo.Pool(_target("count"), size=1, stream_window=0)


@pytest.mark.parametrize("gen", ["nones", "anones"])
async def test_none_items(gen: str):
    async with kameo.Pool(_target(gen), size=1) as pool:
        assert await _collect(pool.stream(None, timeout=10.0)) == [None, 1, None]


async def test_stats_count_streams_left_early_as_cancelled_or_timed_out():
    """A stream the caller broke out of counts as cancelled, one that timed out as timed out,
    and neither as completed; a stream read to its end counts as completed."""
    async with kameo.Pool(f"{MOD}:count", size=1) as pool:
        async for _ in pool.stream({"n": 3}):
            pass
        async for _ in pool.stream({"n": None, "delay": 0.001}):
            break
        with pytest.raises(kameo.CallTimeout):
            async for _ in pool.stream({"n": None, "delay": 0.05}, timeout=0.2):
                pass
        await async_wait_until(lambda: pool._core.outstanding() == 0, timeout=10)
        stats = pool.stats()
        assert (stats.completed, stats.cancelled, stats.timeouts) == (1, 1, 1), stats


async def test_stats_a_timed_out_ask_is_a_timeout_not_also_a_cancellation():
    async with kameo.Pool("handlers.basic:cmd", size=1) as pool:
        with pytest.raises(kameo.CallTimeout):
            await pool.ask({"op": "sleep", "seconds": 0.5}, timeout=0.05)
        task = asyncio.ensure_future(pool.ask({"op": "sleep", "seconds": 0.5}))
        await asyncio.sleep(0.05)
        task.cancel()
        await async_wait_until(lambda: pool._core.outstanding() == 0, timeout=10)
        stats = pool.stats()
        assert (stats.completed, stats.cancelled, stats.timeouts) == (0, 1, 1), stats
