"""Worker handlers used by the kameo benchmarks.

The benchmark scripts put this directory on ``sys.path`` so that worker processes (which inherit
the parent's ``sys.path``) can import ``bench_handlers:echo`` and the others below.
"""

import os
import signal
import time

import kameo


def echo(msg):
    return msg


async def aecho(msg):
    return msg


# ------------------------------------------------------------------------------ W4 streaming


def gen(m):
    yield from range(m["n"])


async def agen(m):
    for i in range(m["n"]):
        yield i


# ------------------------------------------------------------------------------ W5 callbacks


def cb_loop(n):
    """``n`` sequential one-item callbacks into the parent; returns the time they took (ns),
    measured in the worker."""
    t0 = time.perf_counter_ns()
    for _ in range(n):
        for _x in kameo.bench.Ping({}):
            pass
    return time.perf_counter_ns() - t0


async def acb_loop(n):
    """The async-worker form of ``cb_loop``: ``n`` sequential ``async for`` one-item callbacks
    (``kameo.bench.Echo(i)``, echoed by an ``async def`` parent handler); time in ns."""
    t0 = time.perf_counter_ns()
    for i in range(n):
        async for _x in kameo.bench.Echo(i):
            pass
    return time.perf_counter_ns() - t0


# ------------------------------------------------------------------------------ W8 threads


def spin(n):
    """Pure-Python CPU work (``n`` multiply-adds): parallel across handler threads only on a
    free-threaded interpreter."""
    total = 0
    for i in range(n):
        total += i * i
    return total


# ------------------------------------------------------------------------------ resilience

_ledger_fd = None


def chaos(msg):
    """Append the request id to the ledger (one O_APPEND write: atomic for a short line), then
    a short sleep so that requests are running when workers are killed; returns msg*2.

    The ledger path comes from the environment (``KAMEO_BENCH_LEDGER``)."""
    global _ledger_fd
    if _ledger_fd is None:
        _ledger_fd = os.open(
            os.environ["KAMEO_BENCH_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
        )
    os.write(_ledger_fd, b"%d\n" % msg)
    time.sleep(0.0002)
    return msg * 2


def die_now(msg):
    """Write CLOCK_MONOTONIC (ns) to ``msg["path"]``, then SIGKILL this process."""
    with open(msg["path"], "w") as f:
        f.write(str(time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # not reached


def peer_task(msg):
    """With ``msg["path"]``: the victim. Write this process's pid there (write, then rename, so
    a reader never sees a partial file), sleep ``msg["sleep"]`` seconds (until killed), return
    the pid. Otherwise a short task: sleep ``msg["sleep"]`` seconds, return ``msg["x"] * 2``.
    Module-level so that ProcessPoolExecutor and loky can pickle it by reference."""
    path = msg.get("path")
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
        time.sleep(msg["sleep"])
        return os.getpid()
    time.sleep(msg["sleep"])
    return msg["x"] * 2


# ------------------------------------------------------------------------------ W9 calls


class Echo:
    """A remote object for W9: one method that answers its argument."""

    def echo(self, msg):
        return msg


# ------------------------------------------------------------------------ W10 Executor.map


def tiny(x):
    """A tiny task for W10 (Executor.map against ProcessPoolExecutor and mpire)."""
    return x * 2 + 1


# ------------------------------------------------------------------------------ W11 kameo map


def json_path(record):
    """The JSON path of ``kameo map``'s workers (``kameo._jsonl.JSON_PATH``)."""
    from kameo import _jsonl

    return {"path": _jsonl.JSON_PATH}
