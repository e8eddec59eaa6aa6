"""Worker environments: :class:`PythonEnv`, and how a pool's workers are launched.

``PythonEnv(packages=[...])`` is a virtual environment made for a pool's workers with ``uv``
(extra ``kameo[envs]``, or a ``uv`` on ``PATH``), or without it with ``python -m venv`` and pip:
slower, same result. Its directory is named by a hash of what it is made of (the interpreter,
the packages, the index options and kameo's version) under the user cache dir
(``$KAMEO_CACHE_DIR``, else ``$XDG_CACHE_HOME/kameo``, else ``~/.cache/kameo``: ``envs/``), or
is the ``path=`` given. It is built aside (``.<name>.build-*`` next to it) and renamed into
place, under an ``fcntl.flock`` on ``<name>.lock``, so processes creating the same env at once
wait for one another and find it made; a failed build is removed and raises
:class:`~kameo.EnvError` with the installer's last lines. A marker file (``kameo-env.json``)
written before the rename says the env is complete: a second ``ensure()`` reads it and runs
nothing.

Workers in a ``PythonEnv`` are hermetic: ``python -s -m kameo._worker`` (no user site, and
``PYTHONNOUSERSITE=1`` for what they start), none of the parent's ``sys.path`` or
``PYTHONPATH``: their path is their ``cwd``, the pool's ``pythonpath=[...]``, this kameo, then
the env's own. "This kameo" is the package the parent imported, given to the workers as a
directory holding nothing but a ``kameo`` symlink to it (``<cache>/links/<hash>/kameo``): the
directory the parent's kameo sits in may be a site-packages with everything else the parent
has. The env's interpreter must be able to import it: a ``_native`` extension built for its ABI
must be there, else :class:`~kameo.EnvError` says why.

``Pool(python="/path/to/python")`` (not a ``PythonEnv``) is as before, a worker started with
that interpreter and the parent's environment variables, except that it gets the parent's
``sys.path`` only when it runs in the same environment as the parent: the same ``sys.prefix``
(found by running it once; the result is kept for the process's life), not the same binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from kameo.errors import EnvError, ExtraMissing

__all__ = ["Launch", "PythonEnv", "cache_root", "launch"]

#: Default bound on ``ensure()``: waiting for another process's lock, making the venv and
#: installing the packages (seconds).
DEFAULT_TIMEOUT = 900.0
#: Bound on running an interpreter to ask it about itself, and on ``missing()``.
PROBE_TIMEOUT = 60.0
MARKER = "kameo-env.json"
#: How many of the installer's last lines an EnvError quotes.
LAST_LINES = 25
#: The directory of the kameo package this process imported.
KAMEO_DIR = os.path.dirname(os.path.realpath(__file__))
#: Environment variables a child interpreter of ours must not inherit: they would put the
#: parent's paths (or another Python's) into it.
_FOREIGN_VARS = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONEXECUTABLE",
    "PYTHONUSERBASE",
    "__PYVENV_LAUNCHER__",
    "VIRTUAL_ENV",
)
Installer = Literal["auto", "uv", "pip"]

# What an interpreter says about itself: run with ``python -I -c`` (plus a print), or exec'd
# here for this process.
_PROBE = """
import importlib.machinery, sys, sysconfig
info = {
    "executable": sys.executable,
    "base_executable": getattr(sys, "_base_executable", None) or sys.executable,
    "prefix": sys.prefix,
    "version": "%d.%d.%d" % sys.version_info[:3],
    "full_version": sys.version,
    "version_info": list(sys.version_info[:2]),
    "implementation": sys.implementation.name,
    "cache_tag": sys.implementation.cache_tag,
    "gil_disabled": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    "ext_suffixes": list(importlib.machinery.EXTENSION_SUFFIXES),
}
"""
_PROBE_CMD = _PROBE + "import json\nprint(json.dumps(info))\n"

# The installed distributions of an env and its PEP 508 marker variables, for missing().
_DISTS_CMD = """
import json, os, platform, re, sys
from importlib import metadata
def version(info):
    v = "%d.%d.%d" % tuple(info[:3])
    if info.releaselevel != "final":
        v += info.releaselevel[0] + str(info.serial)
    return v
dists = {}
for d in metadata.distributions():
    name = d.metadata["Name"]
    if name:
        dists.setdefault(re.sub(r"[-_.]+", "-", name).lower(), d.version)
markers = {
    "implementation_name": sys.implementation.name,
    "implementation_version": version(sys.implementation.version),
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
    "extra": "",
}
print(json.dumps({"dists": dists, "markers": markers}))
"""

_probed: dict[str, dict[str, Any]] = {}  # interpreter path as given -> its probe
_prefixes: dict[str, str | None] = {}  # for launch(): interpreter -> sys.prefix (None: failed)


class _Cancelled(Exception):
    """ensure() was cancelled: the thread doing the work stops."""


def cache_root() -> str:
    """kameo's cache directory: ``$KAMEO_CACHE_DIR``, else ``$XDG_CACHE_HOME/kameo``, else
    ``~/.cache/kameo``."""
    root = os.environ.get("KAMEO_CACHE_DIR")
    if root:
        return os.path.abspath(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "kameo")


def _child_env() -> dict[str, str]:
    """The environment for an installer or probe: ours, without the parent's Python paths."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_VARS}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _tail(text: str, n: int = LAST_LINES) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _run(cmd: list[str], *, deadline: float, cancel: threading.Event, what: str) -> tuple[int, str]:
    """Run ``cmd`` (stdout and stderr together), killed at ``deadline`` or when ``cancel`` is
    set; returns (exit code, output). A command that cannot start raises EnvError."""
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            text=True,
            errors="replace",
            start_new_session=True,  # its own children go with it when it is killed
        )
    except OSError as exc:
        raise EnvError(f"cannot run {cmd[0]!r} to {what}: {exc}") from None
    while True:
        try:
            out, _ = proc.communicate(timeout=0.1)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            late = time.monotonic() >= deadline
            if not (late or cancel.is_set()):
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
            if not late:
                raise _Cancelled() from None
            raise EnvError(
                f"{what} did not finish within the timeout (killed): {' '.join(cmd)}\n"
                f"{_tail(out or '')}"
            ) from None


def _probe_sync(python: str, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """What interpreter ``python`` is (cached for the process's life)."""
    info = _probed.get(python)
    if info is not None:
        return info
    import json

    code, out = _run(
        [python, "-I", "-c", _PROBE_CMD],
        deadline=time.monotonic() + timeout,
        cancel=threading.Event(),
        what=f"ask the interpreter {python!r} what it is",
    )
    try:
        if code != 0:
            raise ValueError(f"exit code {code}")
        info = json.loads(out.strip().splitlines()[-1])
        if not isinstance(info, dict) or "ext_suffixes" not in info:
            raise ValueError("not the answer of a Python interpreter")
    except (ValueError, IndexError) as exc:
        raise EnvError(
            f"{python!r} is not a Python interpreter that runs ({exc}):\n{_tail(out)}"
        ) from None
    _probed[python] = info
    return info


def _self_info() -> dict[str, Any]:
    info = _probed.get("")
    if info is None:
        ns: dict[str, Any] = {}
        exec(_PROBE, ns)
        info = _probed[""] = ns["info"]
    return info


def _native_suffixes() -> list[str]:
    """The file suffixes of the ``_native`` extensions next to this kameo (one per ABI it was
    built for: an editable checkout may hold several)."""
    try:
        names = os.listdir(KAMEO_DIR)
    except OSError:
        return []
    return sorted(n[len("_native") :] for n in names if n.startswith("_native."))


def _check_kameo(python: str, info: dict[str, Any]) -> None:
    """EnvError unless ``python`` (described by ``info``) can import this kameo."""
    version = info["version"]
    impl = info["implementation"]
    name = {"cpython": "CPython", "pypy": "PyPy"}.get(impl, impl)
    label = f"{name} {version}" + (" (free-threaded)" * info["gil_disabled"])
    if tuple(info["version_info"]) < (3, 11) or impl != "cpython":
        raise EnvError(
            f"the env's interpreter {python!r} is {label}: kameo needs CPython 3.11 or newer"
        )
    have = [s for s in _native_suffixes() if s != ".pyi"]
    if not any(s in info["ext_suffixes"] for s in have):
        mine = _self_info()
        raise EnvError(
            f"the env's interpreter {python!r} is {label}, but the kameo this process runs "
            f"({KAMEO_DIR}, for CPython {mine['version']}) has its native "
            f"extension only for {', '.join(have) or 'no interpreter'}, and that interpreter "
            f"loads {', '.join(info['ext_suffixes'])}: make the env with python=None (this "
            "interpreter) or one of the same version and ABI, or run this program with "
            f"{label} and kameo installed for it"
        )


def kameo_link() -> str:
    """A directory holding only ``kameo``, a symlink to the kameo this process imported (for
    a hermetic worker's path: the directory kameo sits in may hold other packages)."""
    digest = hashlib.sha256(KAMEO_DIR.encode()).hexdigest()[:16]
    where = os.path.join(cache_root(), "links", digest)
    link = os.path.join(where, "kameo")
    with contextlib.suppress(OSError):
        if os.readlink(link) == KAMEO_DIR:
            return where
    try:
        os.makedirs(where, exist_ok=True)
        tmp = f"{link}.{os.getpid()}-{secrets.token_hex(4)}"
        os.symlink(KAMEO_DIR, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        raise EnvError(f"cannot link kameo for the env's workers at {link}: {exc}") from None
    return where


@contextlib.contextmanager
def _locked(path: str, deadline: float, cancel: threading.Event) -> Iterator[None]:
    """Hold ``fcntl.flock`` on ``path`` (created if needed), waiting until ``deadline``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancel.is_set():
                    raise _Cancelled() from None
                if time.monotonic() >= deadline:
                    raise EnvError(
                        f"another process has been making this env for longer than the "
                        f"timeout (it holds {path}): wait for it, or give ensure() a longer "
                        "timeout"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _find_uv() -> str | None:
    try:
        import uv  # type: ignore[import-not-found,unused-ignore]

        found: str = uv.find_uv_bin()
        return found
    except (ImportError, FileNotFoundError):
        pass
    import shutil

    return shutil.which("uv")


def _parent_pip() -> bool:
    """Whether this process's pip can install into another interpreter (``--python``, 22.3)."""
    import importlib.util

    if importlib.util.find_spec("pip") is None:
        return False
    from importlib import metadata

    try:
        parts = metadata.version("pip").split(".")
        return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) >= (22, 3)
    except (metadata.PackageNotFoundError, ValueError):
        return False


def _relocate(build: str, final: str) -> None:
    """Scripts and config of a venv built at ``build`` name it: make them name ``final``."""
    old, new = build.encode(), final.encode()
    bindir = os.path.join(build, "bin")
    paths = [os.path.join(build, "pyvenv.cfg")]
    with contextlib.suppress(OSError):
        paths += [os.path.join(bindir, n) for n in os.listdir(bindir)]
    for path in paths:
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        if old in data and b"\0" not in data[:8192]:
            with open(path, "wb") as f:
                f.write(data.replace(old, new))


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _str_list(value: Iterable[Any] | None, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a list of strings, not a single {type(value).__name__}")
    return [os.fspath(v) for v in value]


class PythonEnv:
    """A virtual environment for a pool's workers (``Pool(target, python=env)``).

    ``packages``: requirements to install (``"numpy>=2"``); ``python``: the interpreter to
    make it from (None: this process's); ``find_links``: directories (or URLs) of wheels;
    ``index_url``: the package index; ``offline``: no index at all (only ``find_links``, and
    uv's cache); ``path``: the env's directory (None: one in the cache named by a hash of the
    rest); ``installer``: ``"uv"``, ``"pip"`` or ``"auto"`` (uv if found, else venv + pip).
    """

    def __init__(
        self,
        packages: Iterable[str] = (),
        *,
        python: str | os.PathLike[str] | None = None,
        find_links: Iterable[str | os.PathLike[str]] | None = None,
        index_url: str | None = None,
        offline: bool = False,
        path: str | os.PathLike[str] | None = None,
        installer: Installer = "auto",
    ) -> None:
        pkgs = []
        for p in _str_list(packages, "packages"):
            p = p.strip()
            if p and p not in pkgs:
                pkgs.append(p)
        if installer not in ("auto", "uv", "pip"):
            raise ValueError(f'installer must be "auto", "uv" or "pip", got {installer!r}')
        self.packages: tuple[str, ...] = tuple(pkgs)
        self.base_python: str | None = os.fspath(python) if python is not None else None
        self.find_links: tuple[str, ...] = tuple(
            f if "://" in f else os.path.abspath(f) for f in _str_list(find_links, "find_links")
        )
        self.index_url = index_url
        self.offline = bool(offline)
        self.installer: Installer = installer
        self._path = os.path.abspath(os.fspath(path)) if path is not None else None
        self._python: str | None = None  # the env's interpreter, once ensured
        self._marker: dict[str, Any] | None = None

    def __repr__(self) -> str:
        state = "ensured" if self._python is not None else "not ensured"
        where = self._path or "(cache)"
        return f"<kameo.PythonEnv packages={list(self.packages)!r} path={where!r} {state}>"

    # ----------------------------------------------------------------- public API

    @property
    def python(self) -> str:
        """The env's interpreter (``<env>/bin/python``); EnvError before :meth:`ensure`."""
        if self._python is None:
            raise EnvError(f"{self!r} is not ensured yet: await env.ensure() (or ensure_sync())")
        return self._python

    @property
    def path(self) -> str:
        """The env's directory (it may not exist yet). Without ``path=``, finding it runs the
        base interpreter once when one was given."""
        return self._dir(self._base_info(time.monotonic() + PROBE_TIMEOUT))

    async def ensure(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Make the env if it does not exist, install what ``packages`` adds to an existing
        ``path=`` env, or find it made (then nothing runs): returns :attr:`python`. The work
        runs in a thread, off the event loop; cancelling stops the installer and removes what
        it built. Raises :class:`EnvError` (the installer's last lines when it failed, or
        ``timeout`` seconds passed)."""
        ready = self._ready_now()
        if ready is not None:
            return ready
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        cancel = threading.Event()

        def settle(result: str | None, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                assert result is not None
                fut.set_result(result)

        def work() -> None:
            result: str | None = None
            error: BaseException | None = None
            try:
                result = self._ensure(time.monotonic() + timeout, cancel)
            except _Cancelled:
                return
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name="kameo-env", daemon=True).start()
        try:
            return await fut
        except asyncio.CancelledError:
            cancel.set()
            raise

    def ensure_sync(self, *, timeout: float = DEFAULT_TIMEOUT) -> str:
        """:meth:`ensure`, blocking (for code without an event loop)."""
        ready = self._ready_now()
        if ready is not None:
            return ready
        return self._ensure(time.monotonic() + timeout, threading.Event())

    def missing(self, requirements: Iterable[str]) -> list[str]:
        """The requirements (``"numpy>=2"``, markers allowed) the env's installed distributions
        do not satisfy, as given, in their order. Needs the env made (EnvError otherwise) and
        ``packaging`` in this process (pip's copy will do; ExtraMissing without either)."""
        import json

        reqs = _str_list(requirements, "requirements")
        requirement_cls = _packaging()
        parsed = []
        for r in reqs:
            try:
                parsed.append((r, requirement_cls(r)))
            except Exception as exc:
                raise ValueError(f"invalid requirement {r!r}: {exc}") from None
        python = self._existing_python()
        code, out = _run(
            [python, "-I", "-c", _DISTS_CMD],
            deadline=time.monotonic() + PROBE_TIMEOUT,
            cancel=threading.Event(),
            what="list the env's distributions",
        )
        try:
            if code != 0:
                raise ValueError(f"exit code {code}")
            data = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise EnvError(
                f"cannot list the distributions of {self!r} ({exc}):\n{_tail(out)}"
            ) from None
        dists: dict[str, str] = data["dists"]
        markers: dict[str, str] = data["markers"]
        out_reqs = []
        for text, req in parsed:
            if req.marker is not None and not req.marker.evaluate(markers):
                continue
            have = dists.get(_normalize(req.name))
            if have is None or not req.specifier.contains(have, prereleases=True):
                out_reqs.append(text)
        return out_reqs

    # ----------------------------------------------------------------- internals

    def _ready_now(self) -> str | None:
        """The interpreter if this object ensured the env and it is still there."""
        python = self._python
        if python is None or self._marker is None:
            return None
        env_dir = os.path.dirname(os.path.dirname(python))
        return python if os.path.exists(os.path.join(env_dir, MARKER)) else None

    def _base_info(self, deadline: float) -> dict[str, Any]:
        if self.base_python is None:
            return _self_info()
        return _probe_sync(self.base_python, max(1.0, deadline - time.monotonic()))

    def _spec(self, info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(key, spec): what the env is made of, and its hash."""
        import json

        import kameo

        spec = {
            "kameo": kameo.__version__,
            "python": {
                "executable": os.path.realpath(info["base_executable"]),
                "version": info["full_version"],
                "cache_tag": info["cache_tag"],
                "gil_disabled": info["gil_disabled"],
            },
            "packages": sorted(self.packages),
            "find_links": list(self.find_links),
            "index_url": self.index_url,
            "offline": self.offline,
        }
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        return key, spec

    def _dir(self, info: dict[str, Any]) -> str:
        if self._path is not None:
            return self._path
        key, _ = self._spec(info)
        major, minor = info["version_info"]
        tag = f"{info['implementation']}{major}.{minor}{'t' if info['gil_disabled'] else ''}"
        return os.path.join(cache_root(), "envs", f"{tag}-{key[:20]}")

    def _existing_python(self) -> str:
        if self._python is not None:
            return self._python
        final = self.path
        if _read_marker(final) is None:
            raise EnvError(
                f"{self!r} does not exist yet at {final}: await env.ensure() (or "
                "env.ensure_sync()) first"
            )
        return os.path.join(final, "bin", "python")

    def _ensure(self, deadline: float, cancel: threading.Event) -> str:
        """ensure()'s work (in a thread for ensure(), blocking for ensure_sync())."""
        info = self._base_info(deadline)
        base = self.base_python or sys.executable
        _check_kameo(base, info)
        key, spec = self._spec(info)
        final = self._dir(info)
        marker = _read_marker(final)
        if marker is not None and marker.get("key") == key:
            return self._done(final, marker)
        parent, name = os.path.split(final)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise EnvError(f"cannot make the directory for {final}: {exc}") from None
        lock = os.path.join(parent, f".{name}.lock" if self._path else f"{name}.lock")
        with _locked(lock, deadline, cancel):
            marker = _read_marker(final)  # another process may have made it meanwhile
            if marker is not None and marker.get("key") == key:
                return self._done(final, marker)
            for entry in os.listdir(parent):  # left by a process that died while building
                if entry.startswith((f".{name}.build-", f".{name}.old-")):
                    _rmtree(os.path.join(parent, entry))
            same_python = marker is not None and marker["spec"]["python"] == spec["python"]
            adopt = marker is None and os.path.exists(os.path.join(final, "pyvenv.cfg"))
            if self._path is not None and (same_python or adopt):
                marker = self._update(final, base, key, spec, deadline, cancel)
                return self._done(final, marker)
            if os.path.lexists(final) and marker is None:
                if self._path is None:  # ours, but incomplete or meddled with
                    _rmtree(final)
                elif os.path.isdir(final) and not os.listdir(final):
                    os.rmdir(final)
                else:
                    raise EnvError(
                        f"{final} exists and is not a virtual environment: give PythonEnv "
                        "another path=, or remove it"
                    )
            build = self._build(final, base, key, spec, deadline, cancel)
            old = None
            if os.path.lexists(final):  # a path= env made from another interpreter
                old = os.path.join(parent, f".{name}.old-{secrets.token_hex(4)}")
                os.rename(final, old)
            os.rename(build, final)
            if old is not None:
                _rmtree(old)
            marker = _read_marker(final)
            assert marker is not None
            return self._done(final, marker)

    def _done(self, final: str, marker: dict[str, Any]) -> str:
        self._marker = marker
        self._python = os.path.join(final, "bin", "python")
        return self._python

    def _choose_installer(self) -> tuple[str, str | None]:
        """("uv", its path) or ("pip", None)."""
        if self.installer != "pip":
            uv = _find_uv()
            if uv is not None:
                return "uv", uv
            if self.installer == "uv":
                raise ExtraMissing(
                    "PythonEnv(installer='uv') needs uv, which is not installed: "
                    "pip install 'kameo[envs]' (or put uv on PATH)"
                )
        return "pip", None

    def _install_cmd(self, tool: str, uv: str | None, python: str, own_pip: bool) -> list[str]:
        if tool == "uv":
            assert uv is not None
            cmd = [uv, "pip", "install", "--python", python]
            if self.offline:
                cmd += ["--offline", "--no-index"]
        else:
            cmd = [python, "-m", "pip"] if own_pip else [sys.executable, "-m", "pip"]
            cmd += [] if own_pip else ["--python", python]
            cmd += ["install", "--no-input", "--disable-pip-version-check"]
            cmd += ["--progress-bar", "off"]
            if self.offline:
                cmd.append("--no-index")
        for link in self.find_links:
            cmd += ["--find-links", link]
        if self.index_url is not None and not self.offline:
            cmd += ["--index-url", self.index_url]
        return [*cmd, *self.packages]

    def _install(
        self,
        tool: str,
        uv: str | None,
        python: str,
        own_pip: bool,
        deadline: float,
        cancel: threading.Event,
    ) -> None:
        if not self.packages:
            return
        cmd = self._install_cmd(tool, uv, python, own_pip)
        what = f"install {', '.join(self.packages)} with {tool}"
        code, out = _run(cmd, deadline=deadline, cancel=cancel, what=what)
        if code != 0:
            raise EnvError(
                f"could not {what} (exit code {code}): the installer said:\n{_tail(out)}"
            )

    def _build(
        self,
        final: str,
        base: str,
        key: str,
        spec: dict[str, Any],
        deadline: float,
        cancel: threading.Event,
    ) -> str:
        """Make the env aside (complete with its marker) and return where."""
        import tempfile

        parent, name = os.path.split(final)
        build = tempfile.mkdtemp(prefix=f".{name}.build-", dir=parent)
        try:
            tool, uv = self._choose_installer()
            own_pip = tool == "pip" and not _parent_pip()
            if tool == "uv":
                assert uv is not None
                cmd = [uv, "venv", "--python", base, "--prompt", name, build]
                cmd += ["--offline"] if self.offline else []
            else:
                cmd = [base, "-m", "venv", "--prompt", name, build]
                cmd += [] if own_pip else ["--without-pip"]
            code, out = _run(cmd, deadline=deadline, cancel=cancel, what="make a virtual env")
            if code != 0:
                raise EnvError(
                    f"could not make a virtual env with {tool} from {base!r} (exit code "
                    f"{code}):\n{_tail(out)}"
                )
            python = os.path.join(build, "bin", "python")
            self._install(tool, uv, python, own_pip, deadline, cancel)
            _relocate(build, final)
            _write_marker(build, key, spec, tool)
            os.chmod(build, 0o755)  # mkdtemp made it 0700
        except BaseException:
            _rmtree(build)
            raise
        return build

    def _update(
        self,
        final: str,
        base: str,
        key: str,
        spec: dict[str, Any],
        deadline: float,
        cancel: threading.Event,
    ) -> dict[str, Any]:
        """Install ``packages`` into the existing env at ``final`` (a ``path=`` env made with
        other packages or options, or a venv made elsewhere)."""
        python = os.path.join(final, "bin", "python")
        tool, uv = self._choose_installer()
        own_pip = False
        if tool == "pip" and not _parent_pip():
            own_pip = True
            code, out = _run(
                [python, "-m", "ensurepip", "--default-pip"],
                deadline=deadline,
                cancel=cancel,
                what="give the env pip",
            )
            if code != 0:
                raise EnvError(f"could not give {final} pip (exit code {code}):\n{_tail(out)}")
        self._install(tool, uv, python, own_pip, deadline, cancel)
        _write_marker(final, key, spec, tool)
        marker = _read_marker(final)
        assert marker is not None
        return marker


def _write_marker(env_dir: str, key: str, spec: dict[str, Any], tool: str) -> None:
    import json

    body = {"key": key, "spec": spec, "installer": tool, "created": time.time()}
    path = os.path.join(env_dir, MARKER)
    tmp = f"{path}.{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _read_marker(env_dir: str) -> dict[str, Any] | None:
    import json

    try:
        with open(os.path.join(env_dir, MARKER)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "key" in data and "spec" in data else None


def _normalize(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging() -> Callable[[str], Any]:
    """packaging's Requirement class: the installed packaging's, or pip's copy."""
    try:
        from packaging.requirements import Requirement

        return Requirement
    except ImportError:
        pass
    try:
        from pip._vendor.packaging.requirements import (  # type: ignore[import-not-found,unused-ignore]
            Requirement as PipRequirement,
        )

        return PipRequirement  # type: ignore[no-any-return,unused-ignore]
    except ImportError:
        raise ExtraMissing(
            "PythonEnv.missing() needs packaging, which is not installed: "
            "pip install 'kameo[envs]' (or pip install packaging)"
        ) from None


# --------------------------------------------------------------------- worker launch


class Launch:
    """How a pool starts its workers: ``[python, *flags, "-c", WORKER_CODE]`` with the
    parent's environment less ``unset``, plus ``env``; ``sys_path`` goes in WELCOME (the
    worker puts it first on its ``sys.path``). A plain class: no dataclass to build at
    ``import kameo``."""

    __slots__ = ("env", "flags", "python", "sys_path", "unset")

    def __init__(
        self,
        python: str,
        flags: tuple[str, ...],
        env: dict[str, str],
        unset: tuple[str, ...],
        sys_path: list[str] | None,
    ) -> None:
        self.python = python
        self.flags = flags
        self.env = env
        self.unset = unset
        self.sys_path = sys_path


async def launch(
    python: str | PythonEnv | None,
    pythonpath: list[str],
    env: dict[str, str],
    timeout: float,
) -> Launch:
    """The launch of a pool's workers (``Pool.start``): a PythonEnv's hermetic workers (the
    env ensured first), or workers of another interpreter (its own ``sys.path``, plus
    ``pythonpath``), or of this environment (the parent's ``sys.path`` after ``pythonpath``)."""
    if isinstance(python, PythonEnv):
        interpreter = await python.ensure()
        prefix = os.path.dirname(os.path.dirname(interpreter))
        paths = [kameo_link(), *pythonpath]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        search = env.get("PATH", os.environ.get("PATH", os.defpath))
        hermetic = {
            **env,
            "PYTHONPATH": os.pathsep.join(paths),
            "PYTHONNOUSERSITE": "1",
            "VIRTUAL_ENV": prefix,
            "PATH": os.pathsep.join([os.path.join(prefix, "bin"), search]),
        }
        return Launch(interpreter, ("-s",), hermetic, _FOREIGN_VARS, None)
    interpreter = python or sys.executable
    if await _same_environment(interpreter, timeout):
        cwd = os.getcwd()
        parent_path = [p if os.path.isabs(p) else os.path.join(cwd, p) for p in sys.path]
        return Launch(interpreter, (), env, (), [*pythonpath, *parent_path])
    return Launch(interpreter, (), env, (), list(pythonpath) or None)


async def _same_environment(python: str, timeout: float) -> bool:
    """Whether ``python`` runs in this process's environment: the same ``sys.prefix`` (two
    venvs of one base interpreter share a binary, not an environment)."""
    if python == sys.executable or os.path.abspath(python) == sys.executable:
        return True
    if python not in _prefixes:
        _prefixes[python] = await _prefix_of(python, timeout)
    prefix = _prefixes[python]
    return prefix is not None and os.path.realpath(prefix) == os.path.realpath(sys.prefix)


async def _prefix_of(python: str, timeout: float) -> str | None:
    """``sys.prefix`` of interpreter ``python``, or None if it does not answer (a missing or
    broken interpreter: the worker's start then fails and says so)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            python,
            "-I",
            "-c",
            "import sys; print(sys.prefix)",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=_child_env(),
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException as exc:  # the timeout, or the caller's cancellation
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        if isinstance(exc, TimeoutError):
            return None
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else None
