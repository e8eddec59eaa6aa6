"""Transport hardening: what the parent does with peers that are not (well-behaved) workers.

Handshake cases use ``Pool(python=<fake>)``: an executable script (tests/handlers/fake/worker.py
behind a ``#!`` line for this interpreter) that ignores its argv and writes the bytes a test asks
for on the inherited socket. Mid-run cases use a real worker whose handler writes to its own
socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import sys
import time
from pathlib import Path

import kameo
import pytest
from conftest import (
    TESTS_DIR,
    async_wait_until,
    child_pids,
    pid_alive,
    start_mode,
    wait_until,
)

CRASHY = "handlers.crashy"
FAKE_SOURCE = Path(TESTS_DIR) / "handlers" / "fake" / "worker.py"
V = kameo.PROTOCOL_VERSION


def make_fake(tmp_path: Path) -> str:
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\n" + FAKE_SOURCE.read_text())
    path.chmod(0o755)
    return str(path)


def fake_runs(log: Path) -> list[str]:
    try:
        return log.read_text().splitlines()
    except FileNotFoundError:
        return []


# (mode, pattern the WorkerStartupError message must match, startup_timeout)
HANDSHAKE_CASES = [
    ("garbage_text", r"not a kameo worker|malformed|bad handshake", 4.0),
    ("garbage_short", r"malformed", 4.0),
    ("garbage_flags", r"malformed|flag", 4.0),
    ("bad_magic", r"not a kameo worker", 20.0),
    ("wrong_secret", r"refused.*secret", 20.0),
    ("short_secret", r"refused.*secret", 20.0),
    ("wrong_version", rf"refused.*version 99.*version {V}", 20.0),
    ("wrong_worker_id", r"refused.*worker id", 20.0),
    ("wrong_pid", r"refused.*pid", 20.0),
    ("truncated_hello", r"refused.*malformed", 20.0),
    ("exit_early", r"exited with code 4.*giving up before the handshake", 20.0),
    ("silent", r"did not finish starting.*startup_timeout=1.0", 1.0),
    ("good_hello_then_silence", r"did not finish starting.*startup_timeout=1.0", 1.0),
]


@pytest.mark.parametrize(
    ("mode", "pattern", "startup_timeout"),
    HANDSHAKE_CASES,
    ids=[c[0] for c in HANDSHAKE_CASES],
)
async def test_bad_handshake_is_a_quick_startup_error(
    tmp_path: Path, baseline_children, mode: str, pattern: str, startup_timeout: float
):
    log = tmp_path / "fake.log"
    pool = kameo.Pool(
        f"{CRASHY}:cmd",
        size=1,
        python=make_fake(tmp_path),
        start="exec",  # the fake is no interpreter a zygote could run in
        env={"FAKE_MODE": mode, "FAKE_LOG": str(log)},
        startup_timeout=startup_timeout,
    )
    t0 = time.monotonic()
    with pytest.raises(kameo.WorkerStartupError) as info:
        await pool.start()
    elapsed = time.monotonic() - t0
    runs = fake_runs(log)
    assert len(runs) == 1 and runs[0].endswith(mode), runs  # the fake ran, once
    message = str(info.value)
    assert re.search(pattern, message, re.S | re.I), message
    # decided from the bytes (or the exit), not by waiting out the startup timeout
    assert elapsed < startup_timeout + 4.0, f"took {elapsed:.1f} s"
    if startup_timeout > 3:
        assert elapsed < 3.0, f"took {elapsed:.1f} s: {message}"
    fake_pid = int(runs[0].split()[0])
    assert not pid_alive(fake_pid)
    assert wait_until(lambda: not (child_pids() - baseline_children), 5)
    with pytest.raises(kameo.PoolClosed):
        await pool.ask(1)


@pytest.mark.parametrize("mode", ["wrong_secret", "wrong_version"])
async def test_refused_peer_is_told_why(tmp_path: Path, caplog, mode: str):
    """The parent answers a bad HELLO with REJECT and the reason, rather than just hanging up
    (the fake prints what it received to its stderr, which the parent logs)."""
    caplog.set_level(logging.WARNING, logger="kameo.worker")
    pool = kameo.Pool(
        f"{CRASHY}:cmd",
        size=1,
        python=make_fake(tmp_path),
        start="exec",  # the fake is no interpreter a zygote could run in
        env={"FAKE_MODE": mode},
        startup_timeout=20,
    )
    with pytest.raises(kameo.WorkerStartupError) as info:
        await pool.start()
    reason = str(info.value).split("was refused: ", 1)[-1]
    assert reason
    assert f"fake worker: rejected: {reason}" in caplog.text, caplog.text


# --------------------------------------------------------------------------- mid-run garbage

GARBAGE = {
    "ff20": b"\xff" * 20,
    "bad_flags": struct.pack("<IBBQ", 10, 18, 0x80, 1),
    "too_short": struct.pack("<I", 3) + b"abc" + b"\x00" * 16,
}


@pytest.mark.parametrize("name", list(GARBAGE))
async def test_garbage_from_a_running_worker_replaces_it(name: str):
    data = GARBAGE[name]
    async with kameo.Pool(f"{CRASHY}:cmd", size=2, prefetch=0, cancel_grace=0.5) as pool:
        original = {w.pid for w in pool.workers}
        bad = asyncio.ensure_future(
            pool.ask({"op": "write_socket", "data": data, "value": "bad"}, timeout=4)
        )
        await asyncio.sleep(0)
        others = await asyncio.gather(
            *(pool.ask({"op": "double", "value": i, "sleep": 0.005}, timeout=30) for i in range(60))
        )
        assert [r["value"] for r in others] == [2 * i for i in range(60)]
        try:
            outcome: object = await bad
        except kameo.KameoError as exc:
            outcome = exc
        assert isinstance(outcome, (kameo.WorkerCrashed, kameo.ProtocolError)), repr(outcome)
        assert await async_wait_until(
            lambda: len(original - {w.pid for w in pool.workers}) == 1, 10
        )
        gone = original - {w.pid for w in pool.workers}
        if isinstance(outcome, kameo.WorkerCrashed):
            assert {outcome.pid} == gone
        assert await async_wait_until(
            lambda: sum(w.state in ("ready", "busy") for w in pool.workers) == 2, 10
        )
        assert await pool.ask({"op": "echo", "value": "after"}, timeout=10) == "after"


async def test_unknown_frame_kind_is_logged_and_ignored(caplog):
    caplog.set_level(logging.WARNING, logger="kameo")
    async with kameo.Pool(f"{CRASHY}:cmd", size=1) as pool:
        pid = pool.workers[0].pid
        reply = await pool.ask(
            {"op": "unknown_frame", "kind": 200, "id": 0, "value": "v"}, timeout=10
        )
        assert reply == {"pid": pid, "value": "v"}
        assert await async_wait_until(lambda: "unknown frame kind 200" in caplog.text, 5)
        results = await asyncio.gather(*(pool.ask({"op": "echo", "value": i}) for i in range(20)))
        assert results == list(range(20))
        assert [w.pid for w in pool.workers] == [pid]
        assert pool.stats().crashes == 0


async def test_unknown_frame_kind_for_a_request_fails_only_that_request(caplog):
    caplog.set_level(logging.WARNING, logger="kameo")
    async with kameo.Pool(f"{CRASHY}:cmd", size=1) as pool:
        pid = pool.workers[0].pid
        with pytest.raises(kameo.ProtocolError, match="unknown frame kind 200"):
            await pool.ask({"op": "unknown_frame", "kind": 200, "own_id": True}, timeout=10)
        assert "unknown frame kind 200" in caplog.text
        # the real reply for that id comes later and must not land on another request
        results = await asyncio.gather(*(pool.ask({"op": "echo", "value": i}) for i in range(20)))
        assert results == list(range(20))
        assert [w.pid for w in pool.workers] == [pid]
        assert pool.stats().crashes == 0


def _open_files(pid: str) -> dict[int, str]:
    """What each descriptor of process ``pid`` ("self": this one) refers to."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return out


async def test_the_pool_secret_is_not_in_the_worker_environment():
    """The secret reaches the worker through a pipe it reads and closes, so neither its
    environment as the kernel shows it (/proc/<pid>/environ) nor its open descriptors hold it."""
    async with kameo.Pool("handlers.basic:cmd", size=1) as pool:
        pid = pool.workers[0].pid
        secret = pool._secret
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert secret.hex().encode() not in environ
        assert secret not in environ
        assert b"KAMEO_SECRET=" not in environ
        # The handler itself sees no trace of it either.
        seen = await pool.ask({"op": "read_file", "path": "/proc/self/environ"})
        assert secret.hex().encode() not in seen
        # The pipe it came in is closed once read.
        if start_mode() == "exec":
            env = dict(kv.split(b"=", 1) for kv in environ.split(b"\0") if b"=" in kv)
            named = int(env[b"KAMEO_SECRET_FD"])
            link = f"/proc/{pid}/fd/{named}"
            assert not os.path.exists(link) or not os.readlink(link).startswith("pipe:")
        else:  # a fork's environ is its zygote's: no pipe of its own open but stderr
            ours = set(_open_files("self").values())
            theirs = _open_files(str(pid))
            pipes = [
                link
                for fd, link in theirs.items()
                if fd > 2 and link.startswith("pipe:") and link not in ours  # not inherited
            ]
            assert pipes == []
        assert await pool.ask({"op": "echo", "value": 1}) == 1


async def test_no_descriptor_of_the_parent_reaches_a_worker(tmp_path: Path):
    """Only the worker's own ends cross into it: not a file this process made inheritable, not
    the loop's epoll, not another worker's socket (in either start mode: a zygote is exec'd with
    the same rule)."""
    leak = tmp_path / "inheritable"
    with open(leak, "w") as f:
        os.set_inheritable(f.fileno(), True)
        async with kameo.Pool("handlers.preloaded:info", size=2) as pool:
            sessions = [pool.session() for _ in range(2)]
            try:
                infos = [await s.call("handlers.preloaded:info", "fds") for s in sessions]
            finally:
                for s in sessions:
                    await s.close()
    assert len({info["pid"] for info in infos}) == 2  # both workers were asked
    for info in infos:
        links = info["fds"]
        assert str(leak) not in links.values(), links
        assert not [link for link in links.values() if "eventpoll" in link], links
        sockets = [link for link in links.values() if link.startswith("socket:")]
        assert len(sockets) == 1, links  # its own end of its socketpair
