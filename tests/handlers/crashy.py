"""Handlers that misbehave on purpose: crash, hang, stop, leak, spawn, corrupt the socket.

They run inside kameo workers (tests/test_resilience.py, tests/test_hardening.py). Executions
are recorded in files with ``O_APPEND`` writes of one short line each, so the test process can
count how many times a request really ran. No side effects at import time.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import struct
import subprocess
import sys
import time
from typing import Any

import kameo

MiB = 1024 * 1024
RELEASE_WAIT = 20.0

# Set by the init hooks, read by `init_state`.
_STATE: dict[str, Any] = {}
# Grown by `grow` to push the worker's RSS up.
_HOARD: list[bytes] = []


# ----------------------------------------------------------------------------- helpers


def append_line(path: str, text: str) -> None:
    """One atomic append of ``text`` plus a newline."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_for_file(path: str | None) -> None:
    if path:
        deadline = time.monotonic() + RELEASE_WAIT
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)


def die(how: str, text: str) -> None:
    """Write ``text`` to stderr, then end this process the way ``how`` says."""
    say(text)
    if how == "exit":
        os._exit(3)
    elif how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segv":
        ctypes.string_at(0)
    elif how == "oom":
        # What the kernel OOM killer does: a process that grew large gets SIGKILL.
        hoard = b"x" * (200 * MiB)
        _HOARD.append(hoard)
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise ValueError(f"unknown way to die {how!r}")
    time.sleep(10)  # a signal is delivered before this returns
    raise AssertionError("still alive")


def own_socket_fd() -> int:
    rt = kameo._runtime.current()
    assert rt is not None, "not inside a kameo worker"
    return int(rt.chan.fileno())


# ----------------------------------------------------------------------------- sync handler


def cmd(msg: dict) -> Any:
    """Multi-purpose sync handler; ``msg["op"]`` selects the behaviour."""
    op = msg["op"]
    log = msg.get("log")
    if log:
        append_line(log, str(msg.get("tag", op)))
    if op == "echo":
        wait_for_file(msg.get("release"))
        return msg.get("value")
    if op == "pid":
        return os.getpid()
    if op == "double":
        if msg.get("sleep"):
            time.sleep(msg["sleep"])
        return {"value": msg["value"] * 2, "pid": os.getpid()}
    if op == "die":
        wait_for_file(msg.get("release"))
        die(msg["how"], f"crashy: dying by {msg['how']} pid={os.getpid()} tag={msg.get('tag')}")
    if op == "die_first_time":
        # `log` was appended above: one line means this is the first run.
        if count_lines(log) == 1:
            die("sigkill", f"crashy: first run, dying pid={os.getpid()}")
        return {"value": msg["value"] * 2, "pid": os.getpid(), "runs": count_lines(log)}
    if op == "sleep":
        if msg.get("text"):
            say(msg["text"])
        if msg.get("started"):
            append_line(msg["started"], str(os.getpid()))
        time.sleep(msg["seconds"])
        return msg.get("value", os.getpid())
    if op == "spin":
        deadline = time.monotonic() + msg["seconds"]
        n = 0
        while time.monotonic() < deadline:
            n += 1
        return n
    if op == "stop":
        say(f"crashy: stopping myself pid={os.getpid()}")
        os.kill(os.getpid(), signal.SIGSTOP)
        return "resumed"
    if op == "raise":
        raise ValueError(f"requested failure {msg.get('value')!r}")
    if op == "grow":
        _HOARD.append(b"g" * (msg["mib"] * MiB))
        return {"pid": os.getpid(), "held_mib": sum(len(b) for b in _HOARD) // MiB}
    if op == "spawn_sleep":
        child = subprocess.Popen(["sleep", "60"])
        return {"pid": os.getpid(), "child": child.pid}
    if op == "write_socket":
        os.write(own_socket_fd(), bytes(msg["data"]))
        if msg.get("then_sleep"):
            time.sleep(msg["then_sleep"])
        return {"pid": os.getpid(), "value": msg.get("value")}
    if op == "unknown_frame":
        rid = kameo._runtime.current_request.get() if msg.get("own_id") else msg.get("id", 0)
        frame = struct.pack("<IBBQ", 10, msg.get("kind", 200), 0, rid)
        os.write(own_socket_fd(), frame)
        return {"pid": os.getpid(), "value": msg.get("value")}
    raise ValueError(f"unknown op {op!r}")


# ----------------------------------------------------------------------------- async handler


async def acmd(msg: dict) -> Any:
    """Async handler: sleeps with markers around the sleep, or blocks its own event loop."""
    op = msg["op"]
    if op == "sleep":
        append_line(msg["log"], "start")
        try:
            await asyncio.sleep(msg["seconds"])
        except asyncio.CancelledError:
            append_line(msg["log"], "cancelled")
            raise
        finally:
            append_line(msg["log"], "finally")
        return os.getpid()
    if op == "block_loop":
        time.sleep(msg["seconds"])  # no await: the worker's event loop is stuck
        return os.getpid()
    if op == "hold":  # log the tag, then wait (without blocking the loop) for the release file
        append_line(msg["log"], msg["tag"])
        deadline = time.monotonic() + RELEASE_WAIT
        while not os.path.exists(msg["release"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return msg["tag"]
    if op == "pid":
        return os.getpid()
    raise ValueError(f"unknown op {op!r}")


# ----------------------------------------------------------------------------- streams


def gen_then_die(msg: dict) -> Any:
    """Yield ``count`` items, wait for the release file, then die."""
    for i in range(msg["count"]):
        yield {"i": i, "pid": os.getpid()}
    wait_for_file(msg.get("release"))
    die(msg.get("how", "exit"), f"crashy: stream dying pid={os.getpid()}")


# ----------------------------------------------------------------------------- callbacks


async def callback_die_after(msg: dict) -> Any:
    it = await kameo.callback_handle(msg["path"], msg.get("data"))
    n = 0
    async for _ in it:
        n += 1
        if n >= msg["k"]:
            die(msg.get("how", "sigkill"), f"crashy: dying inside a callback pid={os.getpid()}")
    return n


# ----------------------------------------------------------------------------- init hooks


def init_ok() -> None:
    _STATE["initialized_by"] = os.getpid()
    _STATE["token"] = os.environ.get("CRASHY_TOKEN", "")


async def init_ok_async() -> None:
    await asyncio.sleep(0)
    _STATE["initialized_by"] = os.getpid()
    _STATE["token"] = "async:" + os.environ.get("CRASHY_TOKEN", "")


def init_fail() -> None:
    raise ValueError("init boom: the database is unreachable")


def init_once() -> None:
    """Succeeds in the first worker only; every later start dies in the hook (a crash loop).

    Each start appends to ``$CRASHY_SPAWN_LOG``.
    """
    spawn_log = os.environ["CRASHY_SPAWN_LOG"]
    append_line(spawn_log, str(os.getpid()))
    if count_lines(spawn_log) > 1:
        say(f"crashy: init_once refusing to start pid={os.getpid()}")
        os._exit(7)


def init_state(msg: Any) -> dict:
    return {"pid": os.getpid(), **_STATE, "msg": msg}
