"""Dynamic calls and remote objects: pool.call, call_stream, function, new, Ref.

Real workers; targets in tests/handlers/remote.py and the standard library.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from typing import Any

import kameo
import pytest
from conftest import async_wait_until

R = "handlers.remote"


async def test_call_forms_and_kwargs() -> None:
    async with kameo.Pool(size=1) as pool:
        assert await pool.call("math:hypot", 3, 4) == 5.0
        assert await pool.call("math.hypot", 3, 4) == 5.0
        assert await pool.call("os.path.join", "a", "b") == "a/b"
        assert await pool.call("json:dumps", {"a": 1}, indent=2) == '{\n  "a": 1\n}'
        assert await pool.call("collections:OrderedDict.fromkeys", "ab") == {"a": None, "b": None}
        assert await pool.call(f"{R}:async_add", 2, 3) == 5


async def test_bad_targets_raise_the_builtin_type_naming_the_target() -> None:
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(ModuleNotFoundError, match="nosuch_mod"):
            await pool.call("nosuch_mod:f")
        with pytest.raises(AttributeError, match="'math:nope'"):
            await pool.call("math:nope")
        with pytest.raises(TypeError, match="'math:pi' is not callable"):
            await pool.call("math:pi")
        with pytest.raises(kameo.RemoteError):
            await pool.call("math:sqrt", -1)  # ValueError, a RemoteError too
        assert await pool.call("math:sqrt", 4) == 2.0  # the worker carries on


async def test_a_pool_without_target_refuses_ask() -> None:
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(kameo.HandlerTypeError, match=r"pool\.call"):
            await pool.ask(1)


@pytest.mark.parametrize("max_concurrency", [1, 4])
async def test_a_handler_pool_calls_too(max_concurrency: int) -> None:
    """The sync server (max_concurrency=1) and the async one both serve calls."""
    async with kameo.Pool(f"{R}:echo", size=1, max_concurrency=max_concurrency) as pool:
        assert await pool.ask("x") == "x"
        assert await pool.call(f"{R}:echo", [1, 2]) == [1, 2]
        assert await pool.call(f"{R}:async_add", 1, 2) == 3
        assert [x async for x in pool.call_stream(f"{R}:gen", 4)] == [0, 1, 2, 3]
        box = await pool.new(f"{R}:Box", 5)
        assert await box.get() == 5
        assert await box.aget() == 5


async def test_call_stream_iterables_and_cancellation(tmp_path) -> None:
    marker = tmp_path / "finally"
    env = {"KAMEO_TEST_FINALLY": str(marker)}
    async with kameo.Pool(size=1, max_concurrency=2, env=env, stream_window=8) as pool:
        assert [x async for x in pool.call_stream("builtins:range", 3)] == [0, 1, 2]
        assert [x async for x in pool.call_stream(f"{R}:agen", 3)] == [0, 1, 2]
        async for x in pool.call_stream(f"{R}:gen", 1_000_000):
            if x == 10:
                break
        # The generator's finally ran in the worker (written, not only opened, by then).
        assert await async_wait_until(
            lambda: marker.exists() and marker.read_text() == "closed\n", timeout=5
        )
        assert await pool.call("math:sqrt", 9) == 3.0


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_async_iterables_and_async_callbacks_on_either_server(
    tmp_path, max_concurrency: int
) -> None:
    """The sync server (max_concurrency=1) has no serving loop: it runs async generators, the
    async iterables that functions return, and `async for` over a parent callback on a loop
    of its own; the async server on its serving loop."""
    marker = tmp_path / "finally"
    callbacks = kameo.Callbacks()

    @callbacks.handler("trading.DataFetch")
    async def data_fetch(req: dict) -> Any:
        for i in range(3):
            yield {"price": 100.0 + i}

    env = {"KAMEO_TEST_FINALLY": str(marker)}
    async with kameo.Pool(
        size=1, max_concurrency=max_concurrency, env=env, callbacks=callbacks, stream_window=4
    ) as pool:
        assert [x async for x in pool.call_stream(f"{R}:agen", 3)] == [0, 1, 2]
        assert [x async for x in pool.call_stream(f"{R}:async_iterable_of", 4)] == [0, 1, 2, 3]
        async for x in pool.call_stream(f"{R}:agen_forever"):
            if x == 20:
                break
        assert await async_wait_until(
            lambda: marker.exists() and marker.read_text() == "aclosed\n", timeout=5
        )
        result = await pool.call("handlers.callers:execute_trade", {"symbol": "KAM"})
        assert result["prices"] == result["again"] == [100.0, 101.0, 102.0]
        assert await pool.call("math:sqrt", 9) == 3.0


async def test_remote_function_options() -> None:
    async with kameo.Pool(size=1) as pool:
        f = pool.function(f"{R}:sleep", timeout=0.2)
        with pytest.raises(kameo.CallTimeout):
            await f(5)
        g = pool.function("math:sqrt")
        assert await g(16) == 4.0
        r = pool.function(f"{R}:echo", return_ref=True)
        ref = await r([1, 2])
        assert isinstance(ref, kameo.Ref) and ref.type_name == "list"
        assert await ref.copy() == [1, 2]


async def test_idempotent_function_runs_again_after_a_crash(tmp_path) -> None:
    path = str(tmp_path / "crashed")
    async with kameo.Pool(size=2) as pool:
        f = pool.function(f"{R}:crash_once", idempotent=True)
        survivor = await f(path)  # killed its first worker; ran again on another
        assert os.path.exists(path)
        assert survivor in {w.pid for w in pool.workers}
        plain = pool.function(f"{R}:crash_once")
        os.remove(path)
        with pytest.raises(kameo.WorkerCrashed):
            await plain(path)


async def test_new_methods_attributes_and_repr() -> None:
    async with kameo.Pool(size=2) as pool:
        c = await pool.new("collections:Counter", "abracadabra")
        assert isinstance(c, kameo.Ref)
        assert c.type_name == "collections.Counter"
        assert isinstance(c.id, str) and isinstance(c.worker_id, int)
        assert "collections.Counter" in repr(c) and c.id in repr(c)
        assert f"worker={c.worker_id}" in repr(c)
        assert await c.most_common(1) == [("a", 5)]
        assert await c.call_method("most_common", 1) == [("a", 5)]
        await c.setattr("x", 1)
        assert await c.getattr("x") == 1
        with pytest.raises(AttributeError):
            await c.getattr("nope")
        with pytest.raises(AttributeError, match="private"):
            await c.call_method("__class__")


async def test_a_ref_argument_is_the_live_object_on_its_worker() -> None:
    async with kameo.Pool(size=2) as pool:
        refs = await asyncio.gather(*(pool.new(f"{R}:Box", i) for i in range(4)))
        assert {r.worker_id for r in refs} == {w.id for w in pool.workers}
        pid_by_worker = {w.id: w.pid for w in pool.workers}
        for r in refs:
            assert await pool.call(f"{R}:pid_of", r) == pid_by_worker[r.worker_id]
        assert await pool.call("builtins:len", await pool.new("collections:Counter", "abc")) == 3
        other = next(r for r in refs if r.worker_id != refs[0].worker_id)
        with pytest.raises(kameo.RefError, match="two workers") as info:
            await pool.call("builtins:print", refs[0], other)
        # It says which: the path and worker of each.
        assert f"op[3][0] is a ref of worker {refs[0].worker_id}" in str(info.value)
        assert f"op[3][1] of worker {other.worker_id}" in str(info.value)


async def test_unencodable_results_come_back_as_refs() -> None:
    async with kameo.Pool(size=1) as pool:
        lock = await pool.call(f"{R}:lock")
        assert isinstance(lock, kameo.Ref) and lock.type_name == "_thread.lock"
        assert await lock.acquire() is True
        assert await lock.locked() is True
        assert await pool.call("kameo:live_refs") == 1


async def test_release_frees_at_once_and_later_use_raises() -> None:
    async with kameo.Pool(size=1) as pool:
        c = await pool.new("collections:Counter", "ab")
        assert await pool.call("kameo:live_refs") == 1
        await c.release()
        assert await pool.call("kameo:live_refs") == 0
        with pytest.raises(kameo.RefError, match="released"):
            await c.most_common()
        with pytest.raises(kameo.RefError, match="released"):
            await pool.call("builtins:len", c)
        await c.release()  # idempotent
        d = await pool.new("collections:Counter", "ab")
    await d.release()  # after close: the object went with its worker, nothing to do


async def test_dropped_refs_are_freed_in_batches_and_rss_stays_flat() -> None:
    async with kameo.Pool(size=1) as pool:
        rss0 = await pool.call(f"{R}:rss_kib")
        for _ in range(10):
            refs = await asyncio.gather(*(pool.new(f"{R}:Box", i) for i in range(1000)))
            assert await pool.call("kameo:live_refs") == 1000
            del refs
            gc.collect()
            await asyncio.sleep(0)  # one loop turn: the batched RELEASE goes out
            assert await pool.call("kameo:live_refs") == 0
        rss1 = await pool.call(f"{R}:rss_kib")
        # 1,000 live boxes hold ~5 MiB; after 10,000 made and freed the worker has not grown
        # by the 50 MiB they would hold if none were freed.
        assert rss1 - rss0 < 20_000


async def test_refs_of_a_dead_worker_raise_ref_error_with_the_reason() -> None:
    async with kameo.Pool(size=1) as pool:
        box = await pool.new(f"{R}:Box", 1)
        pid = pool.workers[0].pid
        os.kill(pid, signal.SIGKILL)
        assert await async_wait_until(
            lambda: any(w.pid != pid and w.state == "ready" for w in pool.workers), timeout=10
        )
        with pytest.raises(kameo.RefError, match="SIGKILL"):
            await box.get()
        assert await pool.call("math:sqrt", 4) == 2.0  # the replacement serves


async def test_a_ref_of_another_pool_is_refused() -> None:
    async with kameo.Pool(size=1) as p1, kameo.Pool(size=1) as p2:
        c = await p1.new("collections:Counter", "a")
        with pytest.raises(kameo.RefError, match="another pool"):
            await p2.call("builtins:len", c)


async def test_adapter_class_targets() -> None:
    async with kameo.Pool(f"{R}:Adapter", size=1) as pool:
        assert await pool.call("predict", 21) == 42
        assert await pool.call("count") == 1  # one instance per worker, kept
        assert await pool.ask("m") == ("called", "m")
        assert [x async for x in pool.call_stream("stream", 3)] == [0, 1, 2]
        with pytest.raises(AttributeError, match="no method 'train'"):
            await pool.call("train")
    async with kameo.Pool(f"{R}:PlainAdapter", size=1) as pool:
        assert await pool.call("predict", 1) == 2
        with pytest.raises(kameo.HandlerTypeError):
            await pool.ask(1)


def test_ref_cannot_be_made_or_encoded_directly() -> None:
    with pytest.raises(TypeError):
        kameo.Ref()
