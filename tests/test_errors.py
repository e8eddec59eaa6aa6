"""Remote exceptions, startup failures, timeouts, serialization and frame limits."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import kameo
import kameo.errors
import pytest
from conftest import async_wait_until, child_pids, socket_fd_count
from handlers.basic import MyError

BASIC = "handlers.basic"


# --------------------------------------------------------------------------- hierarchy


def test_exception_hierarchy():
    names = [
        "RemoteError",
        "WorkerStartupError",
        "PoolClosed",
        "ProtocolError",
        "SerializationError",
        "WorkerCrashed",
        "CallTimeout",
    ]
    assert issubclass(kameo.KameoError, Exception)
    assert kameo.KameoError is kameo.errors.KameoError
    for name in names:
        cls = getattr(kameo, name)
        assert cls is getattr(kameo.errors, name), f"kameo.{name} is not kameo.errors.{name}"
        assert issubclass(cls, kameo.KameoError), name
    assert issubclass(kameo.CallTimeout, TimeoutError)


# --------------------------------------------------------------------------- remote errors


def _assert_remote_origin(err: kameo.RemoteError, pool: kameo.Pool) -> None:
    by_id = {w.id: w.pid for w in pool.workers}
    assert err.pid in by_id.values(), f"error pid {err.pid} is not a worker pid {by_id}"
    assert err.worker_id in by_id, f"error worker_id {err.worker_id} unknown {by_id}"
    assert by_id[err.worker_id] == err.pid


async def test_remote_value_error():
    async with kameo.Pool(f"{BASIC}:raise_value_error", size=2) as pool:
        try:
            await pool.ask(42, timeout=5.0)
        except ValueError as e:  # a remote ValueError is caught as a ValueError
            err = e
        else:
            pytest.fail("no exception raised")
        assert isinstance(err, kameo.RemoteError)
        assert isinstance(err, kameo.KameoError)
        assert err.remote_type == "builtins.ValueError"
        assert err.remote_message == "bad value 42"
        assert isinstance(err.remote_traceback, str)
        assert "raise_value_error" in err.remote_traceback
        assert "bad value 42" in err.remote_traceback
        _assert_remote_origin(err, pool)


async def test_remote_error_does_not_kill_worker():
    async with kameo.Pool(f"{BASIC}:raise_value_error", size=1) as pool:
        pid = pool.workers[0].pid
        for i in range(3):
            with pytest.raises(ValueError) as ei:
                await pool.ask(i, timeout=5.0)
            assert ei.value.pid == pid
            assert ei.value.remote_message == f"bad value {i}"
        assert pool.workers[0].pid == pid
        assert pool.workers[0].state == "ready"


async def test_remote_key_error():
    async with kameo.Pool(f"{BASIC}:raise_key_error", size=1) as pool:
        with pytest.raises(kameo.RemoteError) as ei:
            await pool.ask("missing-key", timeout=5.0)
        err = ei.value
        assert isinstance(err, KeyError)
        assert err.remote_type == "builtins.KeyError"
        assert "missing-key" in err.remote_message
        assert "raise_key_error" in err.remote_traceback
        assert "missing-key" in err.remote_traceback
        _assert_remote_origin(err, pool)


async def test_remote_custom_exception():
    async with kameo.Pool(f"{BASIC}:raise_custom", size=1) as pool:
        with pytest.raises(kameo.RemoteError) as ei:
            await pool.ask("xyz", timeout=5.0)
        err = ei.value
        assert err.remote_type == "handlers.basic.MyError"
        assert err.remote_message == "custom failure xyz"
        assert "raise_custom" in err.remote_traceback
        assert "custom failure xyz" in err.remote_traceback
        assert "MyError" in err.remote_traceback
        assert isinstance(err, MyError)  # the parent imported its module: except MyError works
        assert not isinstance(err, ValueError)
        _assert_remote_origin(err, pool)


# --------------------------------------------------------------------------- startup errors


async def _startup_error(target: str, **kwargs) -> tuple[kameo.WorkerStartupError, float]:
    kwargs.setdefault("startup_timeout", 30.0)
    start = time.monotonic()
    with pytest.raises(kameo.WorkerStartupError) as ei:
        async with kameo.Pool(target, size=1, **kwargs):
            pass
    elapsed = time.monotonic() - start
    return ei.value, elapsed


async def test_startup_missing_module():
    target = "handlers.does_not_exist:echo"
    err, elapsed = await _startup_error(target)
    msg = str(err)
    assert target in msg
    assert "ModuleNotFoundError" in msg or "No module named" in msg, msg
    assert elapsed < 10.0


async def test_startup_missing_function():
    target = f"{BASIC}:no_such_function"
    err, elapsed = await _startup_error(target)
    msg = str(err)
    assert target in msg
    lowered = msg.lower()
    assert any(
        s in lowered
        for s in ("attributeerror", "has no attribute", "not found", "missing", "does not exist")
    ), msg
    assert elapsed < 10.0


async def test_startup_not_callable():
    target = f"{BASIC}:NOT_CALLABLE"
    err, elapsed = await _startup_error(target)
    msg = str(err)
    assert target in msg
    assert "callable" in msg.lower(), msg
    assert elapsed < 10.0


async def test_startup_module_raises_at_import():
    target = "handlers.broken_import:handler"
    err, elapsed = await _startup_error(target)
    msg = str(err)
    assert target in msg
    assert "kameo-import-boom-7f3a" in msg, msg
    assert "RuntimeError" in msg, msg
    assert elapsed < 10.0


async def test_startup_error_from_explicit_start():
    target = "handlers.broken_import:handler"
    pool = kameo.Pool(target, size=2, startup_timeout=30.0)
    start = time.monotonic()
    with pytest.raises(kameo.WorkerStartupError) as ei:
        await pool.start()
    assert time.monotonic() - start < 10.0
    assert target in str(ei.value)
    assert "kameo-import-boom-7f3a" in str(ei.value)
    await pool.close()  # closing a pool whose start failed is harmless


async def test_startup_bad_python_path():
    err, elapsed = await _startup_error(f"{BASIC}:echo", python="/nonexistent/bin/python3")
    assert isinstance(err, kameo.KameoError)
    assert elapsed < 10.0


async def test_startup_handshake_timeout():
    target = "handlers.hang_import:handler"
    err, elapsed = await _startup_error(target, startup_timeout=0.5)
    assert target in str(err)
    assert elapsed < 5.0, f"startup_timeout=0.5 but the error came after {elapsed:.2f} s"


@pytest.mark.parametrize(
    "target",
    ["handlers.does_not_exist:echo", "handlers.broken_import:handler", f"{BASIC}:NOT_CALLABLE"],
)
async def test_failed_start_leaves_no_child_and_no_socket(target, baseline_children):
    sockets_before = socket_fd_count()
    with pytest.raises(kameo.WorkerStartupError):
        async with kameo.Pool(target, size=2, startup_timeout=30.0):
            pass
    leftover = child_pids() - baseline_children
    assert not leftover, f"child processes left after a failed start: {leftover}"
    assert socket_fd_count() <= sockets_before


async def test_failed_handshake_timeout_leaves_no_child(baseline_children):
    sockets_before = socket_fd_count()
    with pytest.raises(kameo.WorkerStartupError):
        async with kameo.Pool("handlers.hang_import:handler", size=1, startup_timeout=0.5):
            pass
    # the hung child must have been killed and reaped
    assert await async_wait_until(lambda: not (child_pids() - baseline_children), 2.0), (
        f"children left: {child_pids() - baseline_children}"
    )
    assert socket_fd_count() <= sockets_before


# --------------------------------------------------------------------------- timeouts


async def test_call_timeout():
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        start = time.monotonic()
        with pytest.raises(kameo.CallTimeout) as ei:
            await pool.ask({"op": "sleep", "seconds": 1.0}, timeout=0.2)
        elapsed = time.monotonic() - start
        assert isinstance(ei.value, TimeoutError)
        assert isinstance(ei.value, kameo.KameoError)
        assert elapsed < 0.9, f"timeout=0.2 but raised after {elapsed:.2f} s"
        # the pool keeps serving afterwards
        assert await pool.ask({"op": "echo", "value": "after"}, timeout=10.0) == "after"


async def test_call_timeout_caught_as_builtin_timeout_error():
    async with kameo.Pool(f"{BASIC}:cmd", size=2) as pool:
        with pytest.raises(TimeoutError):
            await pool.ask({"op": "sleep", "seconds": 1.0}, timeout=0.1)
        assert await pool.ask({"op": "echo", "value": 5}, timeout=10.0) == 5


# --------------------------------------------------------------------------- serialization


async def test_serialization_error_names_type_and_path():
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        with pytest.raises(kameo.SerializationError) as ei:
            await pool.ask({"a": [1, object()]}, timeout=5.0)
        msg = str(ei.value)
        assert "object" in msg, msg
        assert '["a"][1]' in msg or "['a'][1]" in msg, msg
        # nothing was sent; the pool still answers
        assert await pool.ask({"a": [1, 2]}, timeout=5.0) == {"a": [1, 2]}
        assert pool.workers[0].state == "ready"


def test_encode_serialization_error():
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.encode({"a": [1, object()]})
    msg = str(ei.value)
    assert "object" in msg
    assert '["a"][1]' in msg or "['a'][1]" in msg, msg


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, object()}, "object"),
        ([1, 2, iter([3])], "list_iterator"),
        ({"k": {"n": threading.Lock()}}, "lock"),
    ],
)
def test_encode_rejects_unsupported_types(value, type_name):
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.encode(value)
    assert type_name in str(ei.value)


async def test_unserializable_reply_raises_and_pool_survives():
    async with kameo.Pool(f"{BASIC}:cmd", size=1) as pool:
        with pytest.raises(kameo.KameoError) as ei:
            await pool.ask({"op": "unserializable"}, timeout=5.0)
        assert not isinstance(ei.value, kameo.CallTimeout)
        assert await pool.ask({"op": "echo", "value": "still here"}, timeout=10.0) == "still here"


# --------------------------------------------------------------------------- frame limit


# Large bytes travel in shared memory, outside the frame: these pools keep them inline.
INLINE = {"shm_threshold": None}


def _numbers(msg: str) -> list[int]:
    return [int(re.sub(r"[,_]", "", m)) for m in re.findall(r"\d[\d,_]*\d|\d", msg)]


async def test_oversize_request_frame():
    async with kameo.Pool(f"{BASIC}:echo", size=1, max_frame_bytes=1_000_000, **INLINE) as pool:
        with pytest.raises(kameo.ProtocolError) as ei:
            await pool.ask(b"x" * 2_000_000, timeout=10.0)
        nums = _numbers(str(ei.value))
        assert 1_000_000 in nums, f"limit not named: {ei.value}"
        assert any(2_000_000 <= n < 2_100_000 for n in nums), f"frame size not named: {ei.value}"
        assert await pool.ask(b"small", timeout=10.0) == b"small"


async def test_oversize_reply_frame():
    async with kameo.Pool(f"{BASIC}:cmd", size=1, max_frame_bytes=1_000_000, **INLINE) as pool:
        with pytest.raises(kameo.ProtocolError):
            await pool.ask({"op": "big", "n": 2_000_000}, timeout=10.0)
        assert await pool.ask({"op": "echo", "value": "next"}, timeout=10.0) == "next"
        assert await pool.ask({"op": "big", "n": 1000}, timeout=10.0) == b"x" * 1000


async def test_frame_just_under_limit_is_accepted():
    async with kameo.Pool(f"{BASIC}:echo", size=1, max_frame_bytes=1_000_000, **INLINE) as pool:
        payload = b"y" * 900_000
        assert await pool.ask(payload, timeout=10.0) == payload


async def test_concurrent_asks_survive_an_oversize_request():
    async with kameo.Pool(f"{BASIC}:echo", size=2, max_frame_bytes=1_000_000, **INLINE) as pool:
        results = await asyncio.gather(
            *(pool.ask(i, timeout=10.0) for i in range(20)),
            pool.ask(b"z" * 1_500_000, timeout=10.0),
            return_exceptions=True,
        )
        assert results[:20] == list(range(20))
        assert isinstance(results[20], kameo.ProtocolError)
