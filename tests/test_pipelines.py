"""Pipelines: several steps in one round trip, placeholders, failure mid-way.

Real workers; targets in the standard library and tests/handlers/remote.py.
"""

from __future__ import annotations

import kameo
import pytest

R = "handlers.remote"


async def test_steps_use_earlier_results_in_one_round_trip() -> None:
    async with kameo.Pool(size=2) as pool:
        async with pool.session() as s:
            p = s.pipeline()
            a = p.new("collections:Counter", "abc")
            p.call_method(a, "update", "aab")
            top = p.call_method(a, "most_common", 1)
            n = p.call("builtins:len", a)
            s_ = p.call(f"{R}:async_add", 1, 2)
            results = await p.run()
            assert len(results) == 5 and len(p) == 5
            assert isinstance(results[a.index], kameo.Ref)
            assert results[a.index].worker_id == s.worker_id
            assert results[1] is None
            assert results[top.index] == [("a", 3)]
            assert results[n.index] == 3 and results[s_.index] == 3
            assert await results[a.index].most_common(1) == [("a", 3)]  # the same object
        p = pool.pipeline()
        x = p.call("math:hypot", 3, 4)
        p.call("builtins:round", x)
        p.getattr(x, "real")
        assert await p.run() == [5.0, 5, 5.0]
        assert await pool.pipeline().run() == []


async def test_a_failing_step_stops_the_pipeline_with_its_error() -> None:
    async with kameo.Pool(size=1) as pool:
        p = pool.pipeline()
        p.call("math:sqrt", 16)
        p.call("math:sqrt", -1)
        p.call(f"{R}:die")  # never runs: it would kill the worker
        with pytest.raises(kameo.PipelineError) as info:
            await p.run()
        err = info.value
        assert err.step == 1 and err.results == [4.0]
        assert isinstance(err.__cause__, ValueError)
        assert isinstance(err.__cause__, kameo.RemoteError)
        assert "step 1" in str(err)
        assert await pool.call("math:sqrt", 4) == 2.0  # the worker is alive
        bad = pool.pipeline()
        bad.call("nosuch_mod:f")
        with pytest.raises(kameo.PipelineError) as info:
            await bad.run()
        assert isinstance(info.value.__cause__, ModuleNotFoundError)


async def test_a_ref_in_a_pipeline_pins_it_to_the_ref_worker() -> None:
    async with kameo.Pool(size=2) as pool:
        refs = [await pool.new("collections:Counter", "ab") for _ in range(2)]
        for ref in refs:
            p = pool.pipeline()
            p.call_method(ref, "update", "b")
            p.call(f"{R}:pid_of", ref)
            _, pid = await p.run()
            assert pid == next(w.pid for w in pool.workers if w.id == ref.worker_id)


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_async_steps_on_either_server(max_concurrency: int) -> None:
    """The sync server runs an async step on its own loop; the async server runs the pipeline
    in a handler thread and its async steps on the serving loop."""
    async with kameo.Pool(size=1, max_concurrency=max_concurrency) as pool:
        p = pool.pipeline()
        a = p.call(f"{R}:async_add", 1, 2)
        p.call(f"{R}:async_add", a, 10)
        box = p.new(f"{R}:Box", 7)
        p.call_method(box, "aget")
        assert (await p.run())[::3] == [3, 7] and len(await p.run()) == 4


async def test_placeholders_as_keywords_and_unencodable_entries() -> None:
    """A placeholder may be a keyword argument; an entry the codec cannot encode comes back
    as a Ref while the others stay values; placeholders belong to their own pipeline."""
    async with kameo.Pool(size=1) as pool:
        p = pool.pipeline()
        d = p.call("builtins:dict", a=1)
        lock = p.call("threading:Lock")  # not encodable: a Ref
        merged = p.call("builtins:dict", d, b=d)
        results = await p.run()
        assert results[d.index] == {"a": 1}
        assert isinstance(results[lock.index], kameo.Ref)
        assert results[lock.index].type_name == "_thread.lock"
        assert results[merged.index] == {"a": 1, "b": {"a": 1}}
        assert await results[lock.index].locked() is False
        other = pool.pipeline()
        with pytest.raises(ValueError, match="another pipeline"):
            other.call("builtins:len", d)
        with pytest.raises(TypeError, match="Ref or a step's Result"):
            other.call_method("not a ref", "upper")
        ref = await pool.new("collections:Counter", "ab")
        q = pool.pipeline()
        q.call_method(ref, "most_common", 1)
        await ref.release()
        with pytest.raises(kameo.RefError, match="released"):
            await q.run()
