"""Shared helpers for the kameo test suite.

Everything here inspects real processes through /proc; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import glob
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kameo
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--start",
        choices=("exec", "zygote"),
        default=os.environ.get("KAMEO_TEST_START", "exec"),
        help="how the suite's pools start their workers (Pool(start=...)'s default); "
        "`make test` runs the suite in both modes",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Every Pool (and Executor, which makes one) of the run starts its workers this way
    # unless a test says otherwise.
    defaults = kameo.Pool.__init__.__kwdefaults__
    assert defaults is not None and "start" in defaults
    defaults["start"] = config.getoption("--start")


def start_mode() -> str:
    """How this run's pools start their workers ("exec" or "zygote", from --start)."""
    defaults = kameo.Pool.__init__.__kwdefaults__
    assert defaults is not None
    return str(defaults["start"])


def in_start_mode(script: str) -> str:
    """``script`` (the source of a parent program a test runs) with its pools starting their
    workers as this run's do."""
    mode = start_mode()
    return f"import kameo\nkameo.Pool.__init__.__kwdefaults__['start'] = {mode!r}\n" + script


def ppid_of(pid: int) -> int:
    """The parent of process ``pid`` (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def zygotes_of(pids: list[int], parent: int) -> list[int]:
    """The parents of ``pids`` other than ``parent``: their zygote, when it forked them."""
    return sorted({ppid for ppid in map(ppid_of, pids) if ppid != parent})


def pytest_report_header(config: pytest.Config) -> str:
    return f"kameo workers start by: {config.getoption('--start')}"


def pid_exists(pid: int) -> bool:
    """True if /proc/<pid> exists (a zombie still exists)."""
    return os.path.exists(f"/proc/{pid}")


def pid_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    state = pid_state(pid)
    return state is not None and state not in ("Z", "X")


def pid_gone_or_zombie(pid: int) -> bool:
    return not pid_alive(pid)


def socket_fd_count() -> int:
    """Number of open socket file descriptors in this process."""
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def fd_count() -> int:
    n = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{entry}")
            n += 1
        except OSError:
            pass
    return n


def child_pids() -> set[int]:
    """Descendants (live or zombie) of this process: its children across all its threads,
    and theirs (the workers a zygote forked, what workers started)."""
    pids: set[int] = set()
    todo = ["self"]
    while todo:
        for path in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                with open(path) as f:
                    found = {int(p) for p in f.read().split()} - pids
            except OSError:
                continue
            pids |= found
            todo.extend(str(p) for p in found)
    return pids


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Blocking poll; returns the final value of predicate()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def async_wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.02
) -> bool:
    """Asyncio poll (lets the pool keep running); returns the final value of predicate()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


async def timed(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - start


def assert_identical(got: Any, expected: Any, path: str = "") -> None:
    """Recursive equality that also requires identical types at every level.

    Floats compare bit-for-bit in the ways that matter: NaN matches NaN and the
    sign of zero must be preserved. Dict key order must also be preserved.
    """
    where = path or "<root>"
    assert type(got) is type(expected), (
        f"type mismatch at {where}: got {type(got).__name__} {got!r}, "
        f"expected {type(expected).__name__} {expected!r}"
    )
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(got), f"at {where}: expected nan, got {got!r}"
        else:
            assert got == expected, f"at {where}: got {got!r}, expected {expected!r}"
            assert math.copysign(1.0, got) == math.copysign(1.0, expected), (
                f"sign of zero lost at {where}: got {got!r}, expected {expected!r}"
            )
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), f"length mismatch at {where}"
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_identical(g, e, f"{path}[{i}]")
    elif isinstance(expected, dict):
        assert len(got) == len(expected), f"dict size mismatch at {where}"
        for i, ((gk, gv), (ek, ev)) in enumerate(zip(got.items(), expected.items(), strict=True)):
            assert_identical(gk, ek, f"{path}<key #{i}>")
            assert_identical(gv, ev, f"{path}[{ek!r}]")
    else:
        assert got == expected, f"at {where}: got {got!r}, expected {expected!r}"


@pytest.fixture
def baseline_children() -> set[int]:
    """Direct children of the test process before the test body runs.

    (Socket fds are counted inside async test bodies instead: the event loop's
    own self-pipe is a socketpair created after sync fixtures run.)
    """
    return child_pids()


class BackgroundPool:
    """A started pool on an event loop in a helper thread, shared by many sync tests
    (and by hypothesis examples) so that workers are not restarted for every value."""

    def __init__(self, target: str, size: int = 1, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = self._run(self._start(target, size, kw), 30.0)

    @staticmethod
    async def _start(target: str, size: int, kw: dict[str, Any]) -> kameo.Pool:
        pool = kameo.Pool(target, size=size, **kw)
        await pool.start()
        return pool

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def ask(self, value: Any, timeout: float = 10.0) -> Any:
        return self._run(self.pool.ask(value, timeout=timeout), timeout + 5.0)

    def close(self) -> None:
        try:
            self._run(self.pool.close(), 30.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10.0)
            self.loop.close()
