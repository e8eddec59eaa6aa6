"""Remote exceptions of the user's own classes arrive as instances of those classes (and of
``RemoteError``) when the receiving process has imported their module; args are kept; what
cannot be rebuilt falls back to a plain ``RemoteError`` without raising."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from typing import Any

import kameo
import pytest
from handlers import raising
from kameo import _error_info

HANDLER = "handlers.raising:handler"


def _assert_from_worker(err: kameo.RemoteError, pool: kameo.Pool) -> None:
    pids = {w.id: w.pid for w in pool.workers}
    assert pids.get(err.worker_id) == err.pid, (err.worker_id, err.pid, pids)


async def test_a_custom_class_arrives_as_that_class_through_ask():
    async with kameo.Pool(HANDLER, size=1) as pool:
        with pytest.raises(raising.AppError) as ei:
            await pool.ask({"raise": "raise_app", "args": ["x"]})
        err = ei.value
        assert isinstance(err, kameo.RemoteError)
        assert not isinstance(err, ValueError)
        assert type(err).__name__ == "RemoteAppError"
        assert err.remote_type == "handlers.raising.AppError"
        assert err.remote_message == "app failure x"
        assert err.args == ("app failure x",)
        assert "raise_app" in err.remote_traceback
        assert str(err).startswith("handlers.raising.AppError: app failure x (in worker")
        assert "Remote traceback:" in str(err)
        _assert_from_worker(err, pool)
        with pytest.raises(raising.AppError) as again:
            await pool.ask({"raise": "raise_app", "args": ["y"]})
        assert type(again.value) is type(err)  # one derived class per class


async def test_a_custom_class_arrives_as_that_class_through_call():
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(raising.AppError, match="app failure 3"):
            await pool.call(raising.raise_app, 3)
        with pytest.raises(raising.AppError):
            await pool.call("handlers.raising:raise_app", 3)
        f = pool.function(raising.raise_app)
        with pytest.raises(raising.AppError):
            await f(4)


async def test_args_and_attributes_are_rebuilt():
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(raising.CodeError) as ei:
            await pool.call(raising.raise_code, 7, "bad input")
        err = ei.value
        assert err.args == (7, "bad input")
        assert (err.code, err.detail) == (7, "bad input")  # its __init__ ran with them
        assert err.remote_message == "(7, 'bad input')"
        _assert_from_worker(err, pool)


async def test_an_init_that_takes_other_arguments_still_gives_its_class():
    async with kameo.Pool(HANDLER, size=1) as pool:
        with pytest.raises(raising.KeywordOnlyError) as ei:
            await pool.ask({"raise": "raise_keyword_only", "args": ["disk full"]})
        err = ei.value
        assert isinstance(err, kameo.RemoteError)
        assert err.args == ("reason: disk full",)
        assert err.remote_message == "reason: disk full"
        assert "reason: disk full" in str(err)
        _assert_from_worker(err, pool)


@pytest.mark.parametrize("via", ["ask", "call"])
async def test_a_class_nested_in_a_class(via):
    async with kameo.Pool(HANDLER, size=1) as pool:
        with pytest.raises(raising.Outer.NestedError) as ei:
            if via == "ask":
                await pool.ask({"raise": "raise_nested", "args": [1]})
            else:
                await pool.call(raising.raise_nested, 1)
        err = ei.value
        assert isinstance(err, ValueError)  # its base class too
        assert isinstance(err, kameo.RemoteError)
        assert err.remote_type == "handlers.raising.Outer.NestedError"
        assert err.args == ("nested 1",)


async def test_a_class_the_parent_cannot_import_is_a_plain_remote_error(tmp_path: Path):
    (tmp_path / "kameo_hidden_errors.py").write_text(
        textwrap.dedent(
            """
            class HiddenError(ValueError):
                def __init__(self, a, b):
                    super().__init__(a, b)
            """
        )
    )
    # Only the workers have the directory on their path.
    args = ["kameo_hidden_errors", "HiddenError", 1, "b"]
    async with kameo.Pool(HANDLER, size=1, env={"PYTHONPATH": str(tmp_path)}) as pool:
        for via in ("ask", "call"):
            with pytest.raises(kameo.RemoteError) as ei:
                if via == "ask":
                    await pool.ask({"raise": "raise_from", "args": args})
                else:
                    await pool.call(raising.raise_from, *args)
            err = ei.value
            assert type(err) is kameo.RemoteError, via
            assert err.remote_type == "kameo_hidden_errors.HiddenError"
            assert err.remote_message == "(1, 'b')"
            assert "HiddenError" in err.remote_traceback
            _assert_from_worker(err, pool)
    assert "kameo_hidden_errors" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        __import__("kameo_hidden_errors")


async def test_only_classes_of_modules_already_imported_are_used():
    assert "handlers.lazy_errors" not in sys.modules, "no other test may import it"
    async with kameo.Pool("handlers.lazy_errors:raise_lazy", size=1) as pool:
        with pytest.raises(kameo.RemoteError) as ei:
            await pool.ask(1)
        assert type(ei.value) is kameo.RemoteError  # the parent did not import it for this
        assert ei.value.remote_type == "handlers.lazy_errors.LazyError"
        assert "handlers.lazy_errors" not in sys.modules
        from handlers.lazy_errors import LazyError

        with pytest.raises(LazyError) as ei2:
            await pool.ask(2)
        assert ei2.value.args == ("lazy 2",)


async def test_built_in_exceptions_keep_their_args():
    async with kameo.Pool(HANDLER, size=1) as pool:
        with pytest.raises(KeyError) as ei:
            await pool.ask({"raise": "raise_builtin", "args": ["KeyError", "k"]})
        assert ei.value.args == ("k",)
        assert ei.value.remote_message == "'k'"
        with pytest.raises(FileNotFoundError) as ei:
            await pool.call(raising.raise_builtin, "FileNotFoundError", 2, "No such file", "/x")
        assert (ei.value.errno, ei.value.strerror, ei.value.filename) == (2, "No such file", "/x")
        with pytest.raises(UnicodeDecodeError) as ei:
            args = ["UnicodeDecodeError", "utf-8", b"\xff", 0, 1, "invalid start byte"]
            await pool.call(raising.raise_builtin, *args)
        assert ei.value.reason == "invalid start byte"
        assert isinstance(ei.value, kameo.RemoteError)


async def test_what_cannot_be_rebuilt_falls_back_to_remote_error():
    async with kameo.Pool(size=1) as pool:
        for fn, remote_type in [
            (raising.raise_read_only_pid, "handlers.raising.ReadOnlyPid"),
            (raising.raise_no_subclasses, "handlers.raising.NoSubclasses"),
        ]:
            with pytest.raises(kameo.RemoteError) as ei:
                await pool.call(fn)
            err = ei.value
            assert type(err) is kameo.RemoteError, remote_type
            assert err.remote_type == remote_type
            _assert_from_worker(err, pool)
        with pytest.raises(raising.Unprintable) as ei:
            await pool.call(raising.raise_unprintable)
        assert ei.value.remote_message == "<unprintable Unprintable>"
        assert ei.value.args == ("hidden",)
        assert "Unprintable" in str(ei.value)


async def test_kameo_errors_and_stop_iteration_stay_plain_remote_errors():
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(kameo.RemoteError) as ei:
            await pool.call(raising.raise_kameo)
        assert type(ei.value) is kameo.RemoteError
        assert not isinstance(ei.value, kameo.CallTimeout | TimeoutError)
        assert ei.value.remote_type == "kameo.errors.CallTimeout"
        # A coroutine may not raise StopIteration (it would become a RuntimeError).
        with pytest.raises(kameo.RemoteError) as ei:
            await pool.call(raising.raise_builtin, "StopIteration", "done")
        assert type(ei.value) is kameo.RemoteError
        assert ei.value.remote_type == "builtins.StopIteration"
        it = await pool.call("builtins:iter", [])
        with pytest.raises(kameo.RemoteError) as ei:
            await pool.call("builtins:next", it)
        assert ei.value.remote_type == "builtins.StopIteration"


@pytest.mark.parametrize(
    ("module", "name"), [("asyncio", "CancelledError"), ("builtins", "KeyboardInterrupt")]
)
async def test_what_is_not_an_exception_stays_a_plain_remote_error(module, name):
    # As instances of their classes they would cancel the awaiting task, or stop the loop.
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(kameo.RemoteError) as ei:
            await pool.call(raising.raise_from, module, name, "remote")
        assert type(ei.value) is kameo.RemoteError
        assert ei.value.remote_type.endswith(name)
        assert await pool.call(len, "ab") == 2  # the worker goes on


async def test_a_pipeline_steps_error_has_its_class():
    async with kameo.Pool(size=1) as pool:
        p = pool.pipeline()
        p.call(raising.raise_code, 1, "step")
        with pytest.raises(kameo.PipelineError) as ei:
            await p.run()
        cause = ei.value.__cause__
        assert isinstance(cause, raising.CodeError)
        assert cause.code == 1


async def test_a_parent_handlers_error_has_its_class_in_the_worker():
    callbacks = kameo.Callbacks()

    async def fail(data: Any) -> Any:
        raise raising.AppError("from the parent", 3)

    callbacks.register("app.Fail", fail)
    async with kameo.Pool(
        "handlers.raising:catch_parent_error", size=1, callbacks=callbacks
    ) as pool:
        report = await asyncio.wait_for(pool.ask({"path": "app.Fail"}), 30)
    assert report == {"caught": "AppError", "args": ["from the parent", 3], "remote": True}


async def test_the_class_and_args_go_on_through_another_process():
    async with kameo.Pool(size=1) as pool:
        with pytest.raises(raising.CodeError) as ei:
            await pool.call(raising.raise_code, 5, "again")
    info = _error_info.from_exception(ei.value)  # what this process would send on
    assert info["type"] == "handlers.raising.CodeError"
    assert (info["module"], info["qualname"], info["args"]) == (
        "handlers.raising",
        "CodeError",
        (5, "again"),
    )
    again = _error_info.from_worker(info, 9, 1234)
    assert isinstance(again, raising.CodeError)
    assert (again.code, again.worker_id, again.pid) == (5, 9, 1234)
