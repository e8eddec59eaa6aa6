"""``kameo doctor`` (``python -m kameo doctor [--json]``), run as a real subprocess: every check
against this machine's kernel and a real 1-worker pool; a run under a file-descriptor limit too
low for any pool, which must fail (exit status 1) naming the check and its fix."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import resource
import subprocess
import sys
from typing import Any

import kameo
from conftest import TESTS_DIR

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(kameo.__file__)))
RUN_BOUND = 120.0
#: Every check, in order (kameo._doctor.NAMES, written out: the test says what the doctor shows).
NAMES = [
    "kameo",
    "protocol",
    "python",
    "platform",
    "free-threading",
    "memfd",
    "memfd-recycle",
    "scm-rights",
    "pidfd",
    "pdeathsig",
    "fd-limit",
    "uv",
    "extra.tqdm",
    "extra.cloudpickle",
    "extra.orjson",
    "extra.opentelemetry-api",
    "pool.start",
    "pool.ask",
    "pool.stream",
    "pool.callback",
    "pool.shm",
    "pool.close",
]
POOL = [n for n in NAMES if n.startswith("pool.")]
KEYS = {"name", "status", "ok", "required", "detail", "fix", "value", "seconds"}
#: The file-descriptor limit of the failing run. A pool needs more at once whatever else
#: changes: stdin/stdout/stderr, the event loop's epoll and self-pipe, then for its worker a
#: socketpair, a stderr pipe and the progress page (11), before the process is even spawned.
TINY_FD_LIMIT = 8
#: Sets the limit, then becomes `python -m kameo ...` (no preexec_fn: the test process has
#: threads, and forking a threaded process to run Python code in the child is not safe).
UNDER_LIMIT = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'kameo', *sys.argv[2:]])\n"
)


def env() -> dict[str, str]:
    """This environment, with the kameo under test importable."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_DIR, e.get("PYTHONPATH")) if p)
    e.pop("NO_COLOR", None)
    return e


def doctor(*args: str, fd_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    if fd_limit is None:
        cmd = [sys.executable, "-m", "kameo", "doctor", *args]
    else:
        cmd = [sys.executable, "-c", UNDER_LIMIT, str(fd_limit), "doctor", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env(), timeout=RUN_BOUND, cwd=TESTS_DIR
    )


def checks_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert set(report) == {"ok", "checks"}
    assert [c["name"] for c in report["checks"]] == NAMES
    for c in report["checks"]:
        assert set(c) == KEYS, c
        assert isinstance(c["ok"], bool) and isinstance(c["required"], bool)
        assert isinstance(c["detail"], str) and c["detail"]
        if c["status"] == "skip":  # not run, for an earlier check that failed (and has the fix)
            assert not c["ok"] and c["fix"] is None, c
            continue
        expected = ("ok",) if c["ok"] else ("fail",) if c["required"] else ("warn", "info")
        assert c["status"] in expected, c
        # A fix is given exactly when the check did not pass.
        assert (c["fix"] is None) == c["ok"], c
    return {c["name"]: c for c in report["checks"]}


def test_json_every_check_passes_here() -> None:
    res = doctor("--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    checks = checks_of(report)
    assert report["ok"] is True
    for c in checks.values():
        assert c["ok"] or not c["required"], c
    for name in ("memfd", "scm-rights", "pdeathsig", *POOL):
        assert checks[name]["required"] and checks[name]["status"] == "ok", checks[name]
    # kameo falls back to EOF and waitpid without pidfds: a warning, not a failure.
    assert checks["pidfd"]["status"] == "ok" and not checks["pidfd"]["required"]
    extras = ("extra.tqdm", "extra.cloudpickle", "extra.orjson", "extra.opentelemetry-api")
    for name in ("uv", "fd-limit", *extras):
        assert checks[name]["required"] is False
    assert checks["kameo"]["value"] == kameo.__version__
    assert checks["protocol"]["value"] == kameo.PROTOCOL_VERSION
    assert checks["python"]["value"] == ".".join(map(str, sys.version_info[:3]))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert checks["fd-limit"]["value"] == soft
    assert checks["fd-limit"]["status"] == ("ok" if soft >= 4096 else "warn")
    # The extras say what is installed in this interpreter.
    for dist in ("tqdm", "cloudpickle", "orjson", "opentelemetry-api"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        c = checks[f"extra.{dist}"]
        assert c["ok"] == (version is not None) and c["value"] == version
        assert c["status"] == ("ok" if version else "info")
    # The pool's timings are numbers (seconds); the worker was a real other process.
    for name in POOL:
        seconds = checks[name]["seconds"]
        assert isinstance(seconds, float) and seconds > 0, checks[name]
    pid = checks["pool.start"]["value"]
    assert isinstance(pid, int) and pid != os.getpid()
    # What goes to stdout is the JSON object alone.
    assert res.stdout.lstrip().startswith("{") and res.stdout.rstrip().endswith("}")


def test_human_output_one_aligned_line_per_check() -> None:
    res = doctor()
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "kameo doctor"
    assert lines[-1].startswith("kameo doctor: all required checks passed")
    rows = [line for line in lines[1:-1] if not line.lstrip().startswith("fix: ")]
    assert [row.split()[1] for row in rows] == NAMES
    assert all(row.split()[0] in ("ok", "warn", "info") for row in rows), rows
    # Aligned: every detail starts in the same column.
    matches = [re.match(r"  (\S+) +(\S+) +(\S.*)$", row) for row in rows]
    assert all(matches), rows
    assert len({m.start(3) for m in matches if m}) == 1, rows
    assert "\033[" not in res.stdout  # no colours: stdout is not a terminal
    fixes = [line for line in lines if line.lstrip().startswith("fix: ")]
    not_ok = [row for row in rows if row.split()[0] != "ok"]
    assert len(fixes) == len(not_ok)


def test_too_few_file_descriptors_fails_naming_the_check_and_its_fix() -> None:
    res = doctor("--json", fd_limit=TINY_FD_LIMIT)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    checks = checks_of(report)
    assert report["ok"] is False
    start = checks["pool.start"]
    assert start["status"] == "fail" and start["required"]
    assert "could not start" in start["detail"]
    assert "ulimit -n" in start["fix"]
    for name in POOL[1:]:
        assert checks[name]["status"] == "skip" and not checks[name]["ok"]
    limit = checks["fd-limit"]
    assert limit["status"] == "warn" and limit["value"] == TINY_FD_LIMIT
    assert "ulimit -n" in limit["fix"]
    # The checks that do not need descriptors still pass.
    for name in ("kameo", "protocol", "python", "platform"):
        assert checks[name]["ok"], checks[name]

    res = doctor(fd_limit=TINY_FD_LIMIT)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.split()[1:2] == ["pool.start"]]
    assert lines[i].split()[0] == "FAIL"
    assert lines[i + 1].lstrip().startswith("fix: ") and "ulimit -n" in lines[i + 1]
    assert lines[-1].startswith("kameo doctor: ") and "failed: " in lines[-1]
    assert "pool.start" in lines[-1]


def test_help_and_a_bad_flag() -> None:
    res = doctor("--help")
    assert res.returncode == 0, res.stderr
    assert "--json" in res.stdout and "usage: kameo doctor" in res.stdout
    res = doctor("--bogus")
    assert res.returncode == 2
    assert "unrecognized arguments: --bogus" in res.stderr
    assert res.stdout == ""


def test_import_kameo_does_not_import_the_doctor() -> None:
    code = "import sys, kameo, kameo.cli; print(sorted(m for m in sys.modules if 'doctor' in m))"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
