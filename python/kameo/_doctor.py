"""``kameo doctor [--json]``: check that this machine and interpreter can run kameo pools.

Each check is a small function returning a :class:`Check`; :func:`run` runs them in order (the
system checks, then a real 1-worker pool: start, an ask, a stream, a callback from the worker to
this process, a buffer through shared memory, close) and reports each as it finishes. Every
check is bounded: one that raises, or does not finish in time, fails with its error; the doctor
never hangs and never crashes on a failing check.

A check is *required* unless it is informational (the optional extras), or kameo works without
it, only slower or less comfortably (uv, a low fd limit, recycled shared-memory segments, a
free-threaded interpreter whose GIL was turned back on). The exit status is 1 when a required
check failed, else 0.

``--json`` prints one object (see :func:`as_json`)::

    {"ok": true, "checks": [{"name": "memfd", "status": "ok", "ok": true, "required": true,
      "detail": "...", "fix": null, "value": null, "seconds": null}, ...]}

Imported only by :mod:`kameo.cli` (never by ``import kameo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import importlib.metadata
import json
import mmap
import os
import platform
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

__all__ = ["Check", "as_json", "main", "run"]

OK, FAIL, WARN, INFO, SKIP = "ok", "fail", "warn", "info", "skip"

#: Below this soft RLIMIT_NOFILE the fd-limit check warns.
FD_LIMIT_LOW = 4096
#: Bounds: the pool's start (its startup_timeout; the wait gets a little more), each call, a
#: helper subprocess (the pidfd and PR_SET_PDEATHSIG checks), the pool's close.
START_TIMEOUT = 30.0
CALL_TIMEOUT = 10.0
CHILD_TIMEOUT = 10.0
CLOSE_TIMEOUT = 15.0
#: Round trips measured per timed check (after one that warms up), and the stream's length.
ROUNDS = 20
STREAM_ITEMS = 1000
#: The buffer sent to the worker and back: over the pool's shm_threshold (1 MiB).
SHM_BYTES = 2 << 20

HANDLERS = "kameo._doctor_handlers"
POOL_CHECKS = ("pool.start", "pool.ask", "pool.stream", "pool.callback", "pool.shm", "pool.close")
POOL_FIX = (
    "read the error (it has the worker's stderr); the checks above (fd-limit, memfd, "
    "scm-rights, pidfd) name what this machine lacks"
)
POOL_FIX_FDS = "raise the fd limit first (ulimit -n 4096, see fd-limit); then " + POOL_FIX
# Not in Python's fcntl module (Linux 5.1+).
F_SEAL_FUTURE_WRITE = 0x0010
PR_GET_PDEATHSIG = 2


@dataclass
class Check:
    """The result of one check.

    ``ok``: the thing checked works (or is there). ``required``: a failure of it fails the
    doctor. ``level``: what a failure of a check that is not required is, ``"warn"`` or
    ``"info"``. ``detail``: what was found, one line. ``fix``: what to do, when not ok.
    ``value``: the main fact, for programs (a version, a limit, a path). ``seconds``: the time
    it measures, for the timed checks. ``skipped``: not run (an earlier check it needs failed).
    """

    name: str
    ok: bool
    detail: str = ""
    fix: str | None = None
    required: bool = True
    level: str = WARN
    value: str | int | float | bool | None = None
    seconds: float | None = None
    skipped: bool = False

    @property
    def status(self) -> str:
        """``ok``, ``fail`` (a required check failed), ``warn``/``info`` (one that is not
        required did) or ``skip``."""
        if self.skipped:
            return SKIP
        if self.ok:
            return OK
        return FAIL if self.required else self.level

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "ok": self.ok,
            "required": self.required,
            "detail": self.detail,
            "fix": None if self.ok else self.fix,
            "value": self.value,
            "seconds": self.seconds,
        }


def failed(checks: Iterable[Check]) -> list[Check]:
    """The required checks that did not pass (skipped ones included)."""
    return [c for c in checks if c.required and not c.ok]


def _low_fd_limit() -> bool:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft != resource.RLIM_INFINITY and soft < FD_LIMIT_LOW


def as_json(checks: Sequence[Check]) -> dict[str, Any]:
    """``{"ok": no required check failed, "checks": [each check's to_dict()]}``."""
    return {"ok": not failed(checks), "checks": [c.to_dict() for c in checks]}


def _error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return text
    return f"{type(exc).__name__}: {text}"


#: The fix of a check that raised for want of file descriptors.
FD_FIX = "no file descriptors left: raise the fd limit (ulimit -n 4096, see fd-limit)"
#: The fix of a check that raised something else.
BUG_FIX = "unexpected: please report it to kameo with this line"


def _guard(name: str, fn: Callable[[], Check], fix: str = BUG_FIX) -> Check:
    """``fn()``, or a failed check with its error if it raised."""
    try:
        return fn()
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            fix = FD_FIX
        return Check(name, False, f"the check raised: {_error(exc)}", fix)


def _ms(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


# --------------------------------------------------------------------------------- versions


def check_kameo() -> Check:
    import kameo
    from kameo import _native

    where = os.path.dirname(os.path.abspath(kameo.__file__))
    native = getattr(_native, "__version__", "?")
    detail = f"{kameo.__version__} at {where} (extension {native})"
    if native != kameo.__version__:
        return Check(
            "kameo",
            False,
            detail + ": the extension is not the package's version",
            f"reinstall kameo (pip install --force-reinstall kameo, or `maturin develop` in a "
            f"checkout): {_native.__file__} is a stale build",
            value=kameo.__version__,
        )
    return Check("kameo", True, detail, value=kameo.__version__)


def check_protocol() -> Check:
    import kameo

    return Check(
        "protocol",
        True,
        f"wire protocol {kameo.PROTOCOL_VERSION} (parent and workers run this same kameo)",
        value=kameo.PROTOCOL_VERSION,
    )


def check_python() -> Check:
    version = platform.python_version()
    detail = f"{platform.python_implementation()} {version} ({sys.executable})"
    return Check("python", True, detail, value=version)


def check_platform() -> Check:
    detail = (
        f"{platform.system()} {platform.release()} {platform.machine()} ({platform.platform()})"
    )
    if sys.platform != "linux":
        return Check(
            "platform",
            False,
            detail,
            "kameo runs on Linux only (memfd, pidfd, PR_SET_PDEATHSIG); use a Linux machine, "
            "VM or container",
            value=sys.platform,
        )
    return Check("platform", True, detail, value=sys.platform)


def check_free_threading() -> Check:
    build = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    gil = True if is_enabled is None else bool(is_enabled())
    # value: whether the GIL is actually off.
    if not build:
        return Check(
            "free-threading", True, "no: this interpreter has the GIL", required=False, value=False
        )
    if not gil:
        return Check(
            "free-threading",
            True,
            "yes: a free-threaded build, the GIL is off",
            required=False,
            value=True,
        )
    return Check(
        "free-threading",
        False,
        "a free-threaded build, but the GIL is on: sync handlers with max_concurrency > 1 "
        "take turns instead of running in parallel",
        "unset PYTHON_GIL=1 / -X gil=1, or find the extension module without free-threading "
        "support that turned the GIL back on (Python warns when it imports it)",
        required=False,
        value=False,
    )


# ------------------------------------------------------------------------------ the kernel


def check_memfd() -> Check:
    """What kameo's shared memory needs for every large array and buffer: a memfd, sealed
    against writes and resizes, that nobody can then change (crates/kameo-core/src/shm.rs,
    ``create_sealed``)."""
    name = "memfd"
    fix = "kameo's shared memory needs Linux 3.17+ (memfd_create with MFD_ALLOW_SEALING)"
    if not hasattr(os, "memfd_create"):
        return Check(name, False, "os.memfd_create is missing", fix)
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    fd = os.memfd_create("kameo-doctor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        os.pwrite(fd, b"kameo", 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        got = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if got & seals != seals:
            return Check(name, False, f"F_GET_SEALS gives {got:#x}, not {seals:#x}", fix)
        for what, attempt in (
            ("a write", lambda: os.pwrite(fd, b"x", 0)),
            ("a resize", lambda: os.ftruncate(fd, 2 * mmap.PAGESIZE)),
            ("a writable mapping", lambda: mmap.mmap(fd, mmap.PAGESIZE).close()),
        ):
            try:
                attempt()
            except PermissionError:
                continue
            return Check(name, False, f"{what} of a sealed memfd succeeded", fix)
        if os.pread(fd, 5, 0) != b"kameo":
            return Check(name, False, "a sealed memfd does not read back what was written", fix)
    finally:
        os.close(fd)
    return Check(name, True, "sealed memfd (F_SEAL_SHRINK|GROW|WRITE|SEAL): writes refused")


def check_memfd_recycle() -> Check:
    """What lets kameo reuse segments for large bytes instead of making one per message
    (``Recycler`` in shm.rs): F_SEAL_FUTURE_WRITE (our mapping writes, nobody else can) and a
    write lease telling when nobody else holds the segment. Without it kameo falls back to a new
    sealed segment per buffer."""
    fix = (
        "needs Linux 5.1+ (F_SEAL_FUTURE_WRITE), /proc, and file leases "
        "(sysctl fs.leases-enable=1); without them large bytes get a new segment each time "
        "(slower, still correct)"
    )

    def bad(why: str) -> Check:
        return Check("memfd-recycle", False, why, fix, required=False)

    if not hasattr(os, "memfd_create"):
        return bad("os.memfd_create is missing")
    fd = os.memfd_create("kameo-doctor-cache", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        # As shm.rs does: our own description, opened through /proc (the one memfd_create
        # returns does not count as a writer, so the lease test could never pass on it).
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return bad(f"cannot reopen a memfd through /proc: {exc}")
    finally:
        os.close(fd)
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
    try:
        os.ftruncate(rw, mmap.PAGESIZE)
        with mmap.mmap(rw, mmap.PAGESIZE) as mapping:
            # A lease break signals the holder; SIGURG is ignored, SIGIO would kill us.
            fcntl.fcntl(rw, fcntl.F_SETSIG, signal.SIGURG)
            try:
                fcntl.fcntl(rw, fcntl.F_ADD_SEALS, seals)
            except OSError as exc:
                return bad(f"F_SEAL_FUTURE_WRITE refused: {exc}")
            mapping[:5] = b"kameo"  # our mapping, made before the seal, still writes
            try:
                os.pwrite(rw, b"x", 0)
            except PermissionError:
                pass
            else:
                return bad("F_SEAL_FUTURE_WRITE did not stop a write")
            ro = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.pread(ro, 5, 0) != b"kameo":
                    return bad("another descriptor does not see the mapping's write")
                if _lease(rw):
                    return bad("a write lease was granted while another descriptor was open")
            finally:
                os.close(ro)
            if not _lease(rw):
                return bad("no write lease once nobody else held the segment")
    except OSError as exc:
        return bad(str(exc))
    finally:
        os.close(rw)
    return Check(
        "memfd-recycle",
        True,
        "F_SEAL_FUTURE_WRITE and write leases: large bytes reuse segments",
        required=False,
    )


def _lease(fd: int) -> bool:
    """Whether a write lease on ``fd`` is granted (given back at once); raises OSError when
    leases do not work at all."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return False
        raise
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def check_scm_rights() -> Check:
    """How every shared-memory segment travels: a descriptor passed over a Unix socket pair
    (the workers' connection), SCM_RIGHTS."""
    name = "scm-rights"
    fix = (
        "kameo passes descriptors over AF_UNIX sockets (SCM_RIGHTS): a sandbox (seccomp, "
        "AppArmor) may refuse it"
    )
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    got: list[int] = []
    try:
        a.settimeout(CALL_TIMEOUT)
        b.settimeout(CALL_TIMEOUT)
        os.write(w, b"kameo")
        socket.send_fds(a, [b"x"], [r])
        data, got, flags, _ = socket.recv_fds(b, 1, 4)
        if data != b"x" or len(got) != 1 or flags & socket.MSG_CTRUNC:
            return Check(
                name,
                False,
                f"received {data!r} with {len(got)} descriptors (flags {flags:#x})",
                fix,
            )
        if os.fstat(got[0]).st_ino != os.fstat(r).st_ino or os.read(got[0], 5) != b"kameo":
            return Check(name, False, "the descriptor received is not the one sent", fix)
    finally:
        for fd in (r, w, *got):
            os.close(fd)
        a.close()
        b.close()
    return Check(name, True, "a descriptor sent over a socketpair arrives")


def _child(code: str, *, stdin: int, stdout: int) -> subprocess.Popen[bytes]:
    """This interpreter running ``code`` (isolated, no site); its stderr goes where its stdout
    does (one pipe at most: the fewer descriptors, the fewer false alarms under a low limit)."""
    stderr = subprocess.STDOUT if stdout == subprocess.PIPE else stdout
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", code], stdin=stdin, stdout=stdout, stderr=stderr
    )


def _finish(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs, reap it (bounded) and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(CHILD_TIMEOUT)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def check_pidfd() -> Check:
    """How the pool sees a worker exit at once: a pidfd on the event loop."""
    name = "pidfd"
    fix = (
        "kameo sees a worker's exit at once through a pidfd (Linux 5.3+, pidfd_open); without "
        "one it finds exits through the socket's EOF and waitpid, later"
    )
    if not hasattr(os, "pidfd_open"):
        return Check(name, False, "os.pidfd_open is missing", fix)
    proc = _child("import sys; sys.stdin.read()", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if poller.poll(0):
                return Check(name, False, "the pidfd of a running child is readable", fix)
            assert proc.stdin is not None
            proc.stdin.close()  # the child reads EOF and exits
            started = time.perf_counter()
            if not poller.poll(CHILD_TIMEOUT * 1000):
                return Check(
                    name, False, f"no exit seen on the pidfd within {CHILD_TIMEOUT:g} s", fix
                )
            seconds = time.perf_counter() - started
        finally:
            os.close(pidfd)
    finally:
        _finish(proc)
    return Check(
        name, True, f"a child's exit seen on its pidfd ({_ms(seconds)} after its stdin closed)"
    )


PDEATHSIG_CHILD = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
sig, got, zero = signal.SIGRTMIN + 7, ctypes.c_int(-1), ctypes.c_ulong(0)
# 1: PR_SET_PDEATHSIG, 2: PR_GET_PDEATHSIG
if libc.prctl(ctypes.c_int(1), ctypes.c_ulong(sig), zero, zero, zero) != 0:
    sys.exit("PR_SET_PDEATHSIG: " + os.strerror(ctypes.get_errno()))
if libc.prctl(ctypes.c_int(2), ctypes.byref(got), zero, zero, zero) != 0:
    sys.exit("PR_GET_PDEATHSIG: " + os.strerror(ctypes.get_errno()))
print(sig, got.value)
"""


def check_pdeathsig() -> Check:
    """How a worker dies with its parent, even when the parent is SIGKILLed: the kernel sends it
    a signal (prctl PR_SET_PDEATHSIG). Set in a child (as kameo does in each worker) and read
    back; this process's own setting is only read."""
    name = "pdeathsig"
    fix = "workers die with their parent through prctl(PR_SET_PDEATHSIG): Linux only"
    if sys.platform != "linux":
        return Check(name, False, f"no prctl on {sys.platform}", fix)
    libc = ctypes.CDLL(None, use_errno=True)
    own, zero = ctypes.c_int(-1), ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(PR_GET_PDEATHSIG), ctypes.byref(own), zero, zero, zero) != 0:
        return Check(name, False, f"PR_GET_PDEATHSIG: {os.strerror(ctypes.get_errno())}", fix)
    proc = _child(PDEATHSIG_CHILD, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return Check(name, False, f"the child did not finish within {CHILD_TIMEOUT:g} s", fix)
    finally:
        _finish(proc)
    words = out.split()
    if proc.returncode != 0 or len(words) != 2 or words[0] != words[1]:
        text = out.decode(errors="replace").strip().splitlines()
        return Check(name, False, f"the child failed: {text[-1] if text else proc.returncode}", fix)
    return Check(name, True, f"set in a child and read back (signal {words[0].decode()})")


def check_fd_limit() -> Check:
    """Each worker holds a few descriptors in the parent (socket, stderr pipe, pidfd), and every
    shared-memory segment in flight one more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def text(n: int) -> str:
        return "unlimited" if n == resource.RLIM_INFINITY else str(n)

    detail = f"RLIMIT_NOFILE soft {text(soft)}, hard {text(hard)}"
    if soft == resource.RLIM_INFINITY or soft >= FD_LIMIT_LOW:
        return Check("fd-limit", True, detail, required=False, value=soft)
    if hard == resource.RLIM_INFINITY or hard >= FD_LIMIT_LOW:
        target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        fix = f"ulimit -n {target} (in the shell or service that starts this program)"
    else:
        fix = (
            f"raise the hard limit (limits.conf nofile, systemd LimitNOFILE=, docker --ulimit "
            f"nofile=), then ulimit -n {FD_LIMIT_LOW}"
        )
    return Check(
        "fd-limit",
        False,
        f"{detail}: low for many workers and large values in flight (< {FD_LIMIT_LOW})",
        fix,
        required=False,
        value=soft,
    )


# --------------------------------------------------------------------------- optional tools


def check_uv() -> Check:
    from kameo import envs

    found = envs._find_uv()
    if found is None:
        return Check(
            "uv",
            False,
            "not found: kameo.PythonEnv makes environments with venv + pip (slower)",
            "pip install 'kameo[envs]' (or put uv on PATH)",
            required=False,
        )
    return Check("uv", True, f"{found} (kameo.PythonEnv uses it)", required=False, value=found)


#: (distribution, what kameo uses it for, how to install it)
EXTRAS = (
    (
        "tqdm",
        "progress bars: map(progress=True), kameo map --progress",
        "pip install 'kameo[progress]'",
    ),
    ("cloudpickle", "allow_pickle=True for lambdas and closures", "pip install 'kameo[pickle]'"),
    ("orjson", "faster JSON in kameo map's workers", "pip install 'kameo[json]'"),
    ("opentelemetry-api", "OpenTelemetry traces and metrics", "pip install 'kameo[otel]'"),
)


def check_extra(dist: str, use: str, fix: str) -> Check:
    name = f"extra.{dist}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return Check(name, False, f"not installed ({use})", fix, required=False, level=INFO)
    return Check(name, True, f"{version} ({use})", required=False, value=version)


# ---------------------------------------------------------------------------- a real pool


async def pool_checks(report: Callable[[Check], None]) -> list[Check]:
    """Start a 1-worker pool and time an ask, a stream, a callback from the worker to this
    process and a buffer through shared memory; then close it. Each step bounded."""
    import kameo
    from kameo._doctor_handlers import PING

    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        report(check)

    async def ping(data: Any) -> Any:
        return data

    callbacks = kameo.Callbacks()
    callbacks.register(PING, ping)
    pool = kameo.Pool(
        f"{HANDLERS}:echo",
        size=1,
        name="doctor",  # ps: "kameo doctor w0"
        callbacks=callbacks,
        startup_timeout=START_TIMEOUT,
    )
    started = time.perf_counter()
    try:
        await asyncio.wait_for(pool.start(), START_TIMEOUT + 5.0)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(grace=0), CLOSE_TIMEOUT)
        why = (
            f"did not start within {START_TIMEOUT + 5.0:g} s"
            if type(exc) is TimeoutError
            else _error(exc)
        )
        add(
            Check(
                "pool.start",
                False,
                f"a 1-worker pool could not start: {why}",
                POOL_FIX_FDS if _low_fd_limit() else POOL_FIX,
            )
        )
        for rest in POOL_CHECKS[1:]:
            add(Check(rest, False, "not run: the pool did not start", None, skipped=True))
        return checks
    seconds = time.perf_counter() - started
    pid = pool.workers[0].pid if pool.workers else None
    add(
        Check(
            "pool.start",
            True,
            f"1 worker (pid {pid}) ready in {_ms(seconds)}",
            seconds=seconds,
            value=pid,
        )
    )
    try:
        add(await _step("pool.ask", _ask(pool)))
        add(await _step("pool.stream", _stream(pool)))
        add(await _step("pool.callback", _callback(pool)))
        add(await _step("pool.shm", _shm(pool)))
    finally:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(pool.close(grace=5.0), CLOSE_TIMEOUT)
        except Exception as exc:
            why = (
                f"not closed within {CLOSE_TIMEOUT:g} s"
                if type(exc) is TimeoutError
                else _error(exc)
            )
            add(
                Check(
                    "pool.close",
                    False,
                    why,
                    "a worker that does not stop: what it wrote to its stderr (on this "
                    "command's) may say why",
                )
            )
        else:
            seconds = time.perf_counter() - started
            add(Check("pool.close", True, f"closed in {_ms(seconds)}", seconds=seconds))
    return checks


async def _step(name: str, coro: Any) -> Check:
    """``await coro`` (a Check) within CALL_TIMEOUT, or a failed check."""
    fix = "read the error; what the worker wrote to its stderr (on this command's) may say more"
    try:
        check: Check = await asyncio.wait_for(coro, CALL_TIMEOUT)
    except Exception as exc:
        why = f"no answer within {CALL_TIMEOUT:g} s" if type(exc) is TimeoutError else _error(exc)
        return Check(name, False, why, fix)
    check.name = name
    return check


async def _ask(pool: Any) -> Check:
    rtts = []
    for i in range(ROUNDS + 1):
        msg = {"n": i, "doctor": True}
        started = time.perf_counter()
        got = await pool.ask(msg, timeout=CALL_TIMEOUT)
        rtts.append(time.perf_counter() - started)
        if got != msg:
            return Check("", False, f"asked {msg!r}, answered {got!r}", "a kameo bug: report it")
    rtt = statistics.median(rtts[1:])
    return Check(
        "", True, f"round trip {_ms(rtt)} (median of {ROUNDS}; first {_ms(rtts[0])})", seconds=rtt
    )


async def _stream(pool: Any) -> Check:
    started = time.perf_counter()
    first = None
    items = []
    async for item in pool.call_stream(f"{HANDLERS}:count", STREAM_ITEMS):
        if first is None:
            first = time.perf_counter() - started
        items.append(item)
    seconds = time.perf_counter() - started
    if items != list(range(STREAM_ITEMS)):
        return Check(
            "",
            False,
            f"streamed {len(items)} items, not 0..{STREAM_ITEMS - 1}",
            "a kameo bug: report it",
        )
    assert first is not None
    return Check(
        "",
        True,
        f"{STREAM_ITEMS} items in {_ms(seconds)} (first after {_ms(first)})",
        seconds=seconds,
    )


async def _callback(pool: Any) -> Check:
    started = time.perf_counter()
    rtts = await pool.call(f"{HANDLERS}:call_parent", ROUNDS + 1)
    total = time.perf_counter() - started
    rtt = statistics.median(rtts[1:])
    return Check(
        "",
        True,
        f"worker to parent and back {_ms(rtt)} (median of {ROUNDS}; the call {_ms(total)})",
        seconds=rtt,
    )


async def _shm(pool: Any) -> Check:
    data = bytes(range(256)) * (SHM_BYTES // 256)
    started = time.perf_counter()
    got = await pool.ask(data, timeout=CALL_TIMEOUT)
    seconds = time.perf_counter() - started
    if got != data:
        return Check(
            "",
            False,
            f"sent {len(data)} bytes, got back {len(got)} that differ",
            "a kameo bug: report it",
        )
    return Check(
        "",
        True,
        f"{SHM_BYTES >> 20} MiB there and back through shared memory in {_ms(seconds)}",
        seconds=seconds,
    )


# ---------------------------------------------------------------------------- run, print


SYSTEM_CHECKS: tuple[tuple[str, Callable[[], Check]], ...] = (
    ("kameo", check_kameo),
    ("protocol", check_protocol),
    ("python", check_python),
    ("platform", check_platform),
    ("free-threading", check_free_threading),
    ("memfd", check_memfd),
    ("memfd-recycle", check_memfd_recycle),
    ("scm-rights", check_scm_rights),
    ("pidfd", check_pidfd),
    ("pdeathsig", check_pdeathsig),
    ("fd-limit", check_fd_limit),
    ("uv", check_uv),
)

#: The names of every check, in the order they run.
NAMES = (
    *(name for name, _ in SYSTEM_CHECKS),
    *(f"extra.{dist}" for dist, _, _ in EXTRAS),
    *POOL_CHECKS,
)

#: System checks whose failure is a warning: kameo works without them, with less.
OPTIONAL = frozenset({"free-threading", "memfd-recycle", "pidfd", "fd-limit", "uv"})


def run(report: Callable[[Check], None] = lambda check: None) -> list[Check]:
    """Run every check in order, calling ``report`` with each as it finishes."""
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        report(check)

    for name, fn in SYSTEM_CHECKS:
        check = _guard(name, fn)
        if name in OPTIONAL:
            check.required = False
        add(check)
    for dist, use, fix in EXTRAS:
        check = _guard(f"extra.{dist}", functools.partial(check_extra, dist, use, fix), fix)
        check.required, check.level = False, INFO
        add(check)
    try:
        asyncio.run(pool_checks(add))
    except Exception as exc:  # no event loop (no descriptors left for it, say)
        done = {c.name for c in checks}
        for name in POOL_CHECKS:
            if name in done:
                continue
            if name == "pool.start" or not done & set(POOL_CHECKS):
                fix = POOL_FIX_FDS if _low_fd_limit() else POOL_FIX
                add(Check(name, False, f"the pool checks raised: {_error(exc)}", fix))
            else:
                add(Check(name, False, "not run: the pool checks raised", None, skipped=True))
            done.add(name)
    return checks


def _colors(stream: IO[str]) -> dict[str, str]:
    """ANSI colours by status on a terminal (not with NO_COLOR or TERM=dumb), else none."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return {}
    return {OK: "\033[32m", FAIL: "\033[1;31m", WARN: "\033[33m", INFO: "\033[2m", SKIP: "\033[2m"}


LABELS = {OK: "ok", FAIL: "FAIL", WARN: "warn", INFO: "info", SKIP: "skip"}
WIDTH = max(len(n) for n in NAMES)


def printer(stream: IO[str]) -> Callable[[Check], None]:
    """A ``report`` writing each check as one aligned line (and its fix under it when it did
    not pass) to ``stream``."""
    colors = _colors(stream)
    reset = "\033[0m" if colors else ""

    def report(check: Check) -> None:
        status = check.status
        label = f"{LABELS[status]:<4}"
        color = colors.get(status, "")
        line = f"  {color}{label}{reset}  {check.name:<{WIDTH}}  {check.detail}"
        print(line.rstrip(), file=stream)
        if not check.ok and check.fix:
            print(f"  {'':<4}  {'':<{WIDTH}}  fix: {check.fix}", file=stream)
        stream.flush()

    return report


def summary(checks: Sequence[Check]) -> str:
    bad = [c for c in failed(checks) if not c.skipped]
    if bad:
        names = ", ".join(c.name for c in bad)
        many = "check" if len(bad) == 1 else "checks"
        skipped = sum(c.skipped for c in checks)
        tail = f" ({skipped} not run)" if skipped else ""
        return f"kameo doctor: {len(bad)} required {many} failed: {names}{tail}"
    warned = [c for c in checks if c.status == WARN]
    tail = f" ({len(warned)} warning{'s' if len(warned) != 1 else ''})" if warned else ""
    return f"kameo doctor: all required checks passed{tail}"


def main(as_json_output: bool = False, stream: IO[str] | None = None) -> int:
    """``kameo doctor``: run the checks, print them (as JSON with ``as_json_output``); 1 if a
    required one failed, else 0."""
    out = sys.stdout if stream is None else stream
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:  # "µs" on an ASCII stdout: an escape, not a UnicodeEncodeError
        with contextlib.suppress(Exception):
            reconfigure(errors="backslashreplace")
    if as_json_output:
        checks = run()
        json.dump(as_json(checks), out, indent=2)
        out.write("\n")
        out.flush()
    else:
        print("kameo doctor", file=out)
        checks = run(printer(out))
        print(summary(checks), file=out)
    return 1 if failed(checks) else 0
