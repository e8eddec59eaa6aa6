"""W9: dynamic calls and remote objects against an ask on the same pool (issue 13's targets).

    python benches/bench_remote.py [--quick] [--ray]

One pool of two workers serving ``bench_handlers:echo``; in interleaved rounds:

* p50 latency of ``pool.ask(msg)`` (the anchor), ``pool.call("bench_handlers:echo", msg)``
  (target: <= 1.2x) and a Ref method call ``ref.echo(msg)`` (target: <= 1.3x);
* p50 of a 10-step pipeline of calls (target: <= 2x);
* throughput of ``asyncio.gather`` over 20,000 calls against 20,000 asks (target: >= 0.8x).

With ``--ray``, the same actor-method workload on Ray 2.60.0 too (target: Ray's p50 >= 20x
kameo's ``ref.echo``). Ray is never installed into the project's venv nor used by the tests: the
bench makes a side venv, ``.bench-venvs/ray-2.60.0/`` at the repo root (gitignored), with
``python -m venv`` from the running interpreter and ``pip install ray==2.60.0``, and reuses it
while ``import ray`` works there (a failed install emits a ``skipped`` record with pip's last
lines, and the kameo figures stand). After the kameo rounds, ``_ray_actor.py`` runs in that
venv's python, in a subprocess with a bounded timeout: a local Ray with ``num_cpus=2`` and no
dashboard, two ``echo(self, msg)`` actors, the same ``MSG``; it measures the p50 of sequential
``ray.get(actor.echo.remote(MSG))`` on one actor and the rate of ``ray.get([...])`` over the
same number of calls as the gathers, on one actor and round-robin over two. Ray's startup is
outside the timings; its processes are checked for (and ended, by pid) once it has exited.
The kameo side adds a gather over ``ref.echo`` (one object, so one worker). Summaries: Ray's
p50 / kameo's ref-method p50, kameo's ref-method gather / Ray's one-actor rate, and kameo's
``pool.call`` gather (two workers) / Ray's two-actor rate.

One JSON object per line, as the other benches (``_report``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kameo  # noqa: E402
from _report import emit, emit_env  # noqa: E402

MSG = {"id": 1, "payload": "x" * 64}
clock = time.perf_counter_ns


async def latencies(fn, n):
    out = [0] * n
    for i in range(n):
        t0 = clock()
        await fn(MSG)
        out[i] = clock() - t0
    return out


async def run(n, rounds, total, repeats, ref_gather=False):
    async with kameo.Pool("bench_handlers:echo", size=2) as pool:
        ref = await pool.new("bench_handlers:Echo")

        def pipeline10(m):
            p = pool.pipeline()
            for _ in range(10):
                p.call("bench_handlers:echo", m)
            return p.run()

        kinds = {
            "ask": pool.ask,
            "call": lambda m: pool.call("bench_handlers:echo", m),
            "ref_method": ref.echo,
            "pipeline10": pipeline10,
        }
        for fn in kinds.values():
            await latencies(fn, 200)
        samples = {k: [] for k in kinds}
        for _ in range(rounds):
            for k, fn in kinds.items():
                samples[k] += await latencies(fn, n // rounds)
        p50 = {k: statistics.median(v) / 1000 for k, v in samples.items()}
        for k, v in p50.items():
            emit("W9", k, "p50", round(v, 2), "us", n=len(samples[k]))
        tput = {"ask": [], "call": []}
        if ref_gather:
            tput["ref_method"] = []
        for _ in range(repeats):
            for k in tput:
                gc.collect()
                t0 = clock()
                if k == "ask":
                    await asyncio.gather(*(pool.ask(MSG) for _ in range(total)))
                elif k == "call":
                    await asyncio.gather(
                        *(pool.call("bench_handlers:echo", MSG) for _ in range(total))
                    )
                else:
                    await asyncio.gather(*(ref.echo(MSG) for _ in range(total)))
                tput[k].append(total / ((clock() - t0) / 1e9))
        rate = {k: statistics.median(v) for k, v in tput.items()}
        for k, v in rate.items():
            emit("W9", f"gather_{k}", "rate", round(v), "msg/s", n=total)
    for name, value, target, ok in (
        ("call_p50/ask_p50", p50["call"] / p50["ask"], "<= 1.2", lambda x: x <= 1.2),
        ("ref_method_p50/ask_p50", p50["ref_method"] / p50["ask"], "<= 1.3", lambda x: x <= 1.3),
        ("pipeline10_p50/ask_p50", p50["pipeline10"] / p50["ask"], "<= 2", lambda x: x <= 2),
        ("gather_call/gather_ask", rate["call"] / rate["ask"], ">= 0.8", lambda x: x >= 0.8),
    ):
        emit("W9", "summary", name, round(value, 3), "ratio", target=target, passed=ok(value))
    return p50, rate


# ------------------------------------------------------------------------------ Ray (--ray)

RAY_VERSION = "2.60.0"
RAY_VENV = os.path.join(os.path.dirname(HERE), ".bench-venvs", f"ray-{RAY_VERSION}")
RAY_PY = os.path.join(RAY_VENV, "bin", "python")
PIP_TIMEOUT = 1200  # s: a first install downloads ~100 MB of wheels
RAY_TIMEOUT = {True: 300, False: 900}  # s, for the whole Ray run (startup included), by --quick


def tail(text, lines=10):
    return "\n".join((text or "").strip().splitlines()[-lines:])


def dir_mb(path):
    size = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(root, f)).st_size
    return round(size / 2**20)


def ray_importable():
    if not os.path.exists(RAY_PY):
        return False
    try:
        r = subprocess.run(
            [RAY_PY, "-c", "import ray; print(ray.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0 and r.stdout.strip() == RAY_VERSION


def ensure_ray_venv():
    """The side venv's python, or None after a ``skipped`` record saying why."""
    if ray_importable():
        emit(
            "W9", "ray_venv", "setup", 0, "s", reused=True, path=RAY_VENV, size_mb=dir_mb(RAY_VENV)
        )
        return RAY_PY
    t0 = time.monotonic()
    for what, cmd, timeout in (
        ("venv", [sys.executable, "-m", "venv", RAY_VENV], 300),
        (
            "pip",
            [
                RAY_PY,
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                f"ray=={RAY_VERSION}",
            ],
            PIP_TIMEOUT,
        ),
    ):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            failed = r.returncode != 0 and f"exit {r.returncode}"
            output = r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            failed = f"timed out after {timeout} s"
            output = b"".join(x for x in (e.stdout, e.stderr) if x).decode(errors="replace")
        except OSError as e:
            failed, output = str(e), ""
        if failed or (what == "pip" and not ray_importable()):
            emit(
                "W9",
                "ray_actor_method",
                "skipped",
                None,
                None,
                reason=f"{what} failed ({failed or 'ray does not import after install'})",
                output=tail(output),
                venv=RAY_VENV,
            )
            return None
    emit(
        "W9",
        "ray_venv",
        "setup",
        round(time.monotonic() - t0, 1),
        "s",
        reused=False,
        path=RAY_VENV,
        size_mb=dir_mb(RAY_VENV),
    )
    return RAY_PY


def ray_leftovers(sid):
    """Pids of processes left by the Ray run: in its session, or run from the side venv."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and (int(fields[3]) == sid or RAY_VENV in cmd):
            found.append((int(d), cmd.strip()[:120]))
    return found


def end_leftovers(sid):
    left = ray_leftovers(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _cmd in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ray_leftovers(sid):
            time.sleep(0.2)
        if not ray_leftovers(sid):
            break
    return left


def run_ray(py, n, total, repeats, quick):
    """Ray's figures (``metric -> record``) from ``_ray_actor.py`` in the side venv, re-emitted."""
    cmd = [
        py,
        os.path.join(HERE, "_ray_actor.py"),
        "--msg",
        json.dumps(MSG),
        "--n",
        str(n),
        "--total",
        str(total),
        "--repeats",
        str(repeats),
    ]
    timeout = RAY_TIMEOUT[quick]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its session id finds whatever Ray leaves behind
    )
    failed = None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failed = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        failed = f"timed out after {timeout} s"
    left = end_leftovers(proc.pid)
    emit(
        "W9",
        "ray_processes",
        "left_after_exit",
        len(left),
        "processes",
        ended=[f"{pid} {cmd}" for pid, cmd in left],
    )
    recs = {}  # impl -> record, as _ray_actor.py printed them
    for line in stdout.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.pop("ray", False):
                    recs[rec["impl"]] = rec
    for impl, rec in recs.items():
        if impl != "done":
            rec = {k: v for k, v in rec.items() if k not in ("impl", "session_dir")}
            emit("W9", f"ray_{impl}", rec.pop("metric"), rec.pop("value"), rec.pop("unit"), **rec)
    if failed or "done" not in recs:
        emit(
            "W9",
            "ray_actor_method",
            "failed" if recs else "skipped",
            None,
            None,
            reason=f"the Ray run failed ({failed or 'it printed no done record'})",
            stderr=tail(stderr, 15),
            ray_logs=recs.get("startup", {}).get("session_dir"),
        )
    return recs


def ray_summaries(p50, rate, ray):
    """Kameo against Ray, both measured in this run (a missing figure: no record)."""

    def value(impl):
        return ray.get(impl, {}).get("value")

    one, two = value("concurrent_1actor"), value("concurrent_2actors")
    for name, num, den, target in (
        ("ray_actor_method_p50/ref_method_p50", value("actor_method"), p50["ref_method"], 20),
        ("gather_ref_method/ray_concurrent_1actor", rate["ref_method"], one, None),
        ("gather_call/ray_concurrent_2actors", rate["call"], two, None),
    ):
        if num and den:
            x = num / den
            ok = None if target is None else x >= target
            tgt = None if target is None else f">= {target}"
            emit("W9", "summary", name, round(x, 2), "ratio", target=tgt, passed=ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    ap.add_argument(
        "--ray",
        action="store_true",
        help=f"also Ray {RAY_VERSION}'s actor method call (installs it in a side venv, "
        ".bench-venvs/, on first use)",
    )
    args = ap.parse_args()
    emit_env(kameo, quick=args.quick, ray=args.ray)
    n, rounds, total, repeats = (2000, 4, 5000, 2) if args.quick else (10000, 10, 20000, 5)
    ray_py = ensure_ray_venv() if args.ray else None
    p50, rate = asyncio.run(run(n, rounds, total, repeats, ref_gather=args.ray))
    if ray_py:
        ray_summaries(p50, rate, run_ray(ray_py, n, total, repeats, args.quick))


if __name__ == "__main__":
    main()
