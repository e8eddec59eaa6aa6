#!/usr/bin/env python3
"""Start-up and respawn: exec'd workers versus a zygote (``Pool(start=...)``).

Usage::

    python benches/bench_start.py [--quick] [--only W6,W7,RSS]

JSON lines as the other scripts (``_report.py``), then a table and ``summary`` lines with each
target of the zygote issue and whether it was met. Every figure is a median over interleaved
repeats (machine noise hits each implementation alike).

* W7: time until a pool of 8 workers is ready and has answered one echo:
  ``kameo.Pool(size=8, start="exec")``, ``start="zygote"``, ``multiprocessing``'s fork pool
  (``Pool(8)`` + a ``map`` of 8 echoes, one per worker), and 8 bare ``python -c "pass"``
  started at once. Twice: with the plain echo handler, and with a handler module that imports
  numpy (``bench_numpy_handlers``; skipped without numpy).
* W6: after a worker SIGKILLs itself in ``Pool(size=1)``: the time from the caller's
  ``WorkerCrashed`` to the answer of the next echo (it waits for the replacement); and on
  ``Pool(size=4)`` under load (asks looping), the time from a SIGKILL until 4 workers are ready
  again, against the time of one fork (``os.fork`` + child exit + waitpid) measured in the
  same run.
* RSS: each worker's RSS and PSS (``/proc/<pid>/smaps_rollup``) in a ready ``Pool(size=4)``
  of the numpy handler, both modes (pages a zygote's children share count partly in PSS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)  # workers inherit sys.path: "bench_handlers:echo" imports

import kameo  # noqa: E402
from _report import emit, emit_env  # noqa: E402

MSG = {"symbol": "AAPL", "qty": 100, "price": 187.25, "side": "buy", "tags": ["a", "b"]}
BOUND_S = 60.0


def clock() -> float:
    return time.perf_counter()


def has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------- W7


def start_bare(size: int) -> float:
    t0 = clock()
    procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(size)]
    if any(p.wait() for p in procs):
        raise RuntimeError("python -c pass failed")
    return clock() - t0


def _mp_echo(x: object) -> object:
    return x


def start_mp_fork(size: int, module: str) -> float:
    ctx = multiprocessing.get_context("fork")
    t0 = clock()
    with ctx.Pool(size, initializer=__import__, initargs=(module,)) as pool:
        assert pool.map(_mp_echo, [MSG] * size, chunksize=1) == [MSG] * size
        elapsed = clock() - t0
    return elapsed


def start_kameo(size: int, start: str, module: str) -> float:
    async def run() -> float:
        t0 = clock()
        pool = kameo.Pool(f"{module}:echo", size=size, start=start)  # type: ignore[arg-type]
        await pool.start()
        try:
            assert await pool.ask(MSG) == MSG
            elapsed = clock() - t0
            if start == "zygote":
                sup = pool._supervisor
                assert sup is not None and sup.zygote is not None, sup and sup.zygote_fallback
        finally:
            await pool.close()
        return elapsed

    return asyncio.run(asyncio.wait_for(run(), BOUND_S))


def bench_w7(repeats: int, size: int) -> dict[str, float]:
    modules = ["bench_handlers"] + (["bench_numpy_handlers"] if has_numpy() else [])
    impls = {
        "bare_python_pass": lambda m: start_bare(size),
        "mp_fork": lambda m: start_mp_fork(size, m),
        "kameo_exec": lambda m: start_kameo(size, "exec", m),
        "kameo_zygote": lambda m: start_kameo(size, "zygote", m),
    }
    out = {}
    for module in modules:
        samples: dict[str, list[float]] = {k: [] for k in impls}
        for _ in range(repeats):
            for name, fn in impls.items():
                samples[name].append(fn(module))
        for name, xs in samples.items():
            med = statistics.median(xs) * 1000
            key = f"{name}{'_numpy' if 'numpy' in module else ''}"
            out[key] = med
            emit(
                "W7",
                key,
                "ready_median",
                round(med, 2),
                "ms",
                samples_ms=[round(x * 1000, 2) for x in xs],
                size=size,
                handler=f"{module}:echo",
            )
    return out


# ------------------------------------------------------------------------------------- W6


async def crash_then_echo(start: str, tmp: str) -> tuple[float, float]:
    """(ms from the death to WorkerCrashed, ms from WorkerCrashed to the next echo)."""
    path = os.path.join(tmp, "died")
    async with kameo.Pool("bench_handlers:echo", size=1, start=start) as pool:  # type: ignore[arg-type]
        assert await pool.ask(MSG) == MSG
        try:
            await pool.call("bench_handlers:die_now", {"path": path})
        except kameo.WorkerCrashed:
            crashed = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        else:
            raise RuntimeError("the worker did not die")
        assert await pool.ask(MSG) == MSG
        echoed = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        with open(path) as f:
            died = int(f.read())
    return (crashed - died) / 1e6, (echoed - crashed) / 1e6


async def recovery_under_load(start: str) -> float:
    """ms from a SIGKILL of one of 4 busy workers until 4 are ready again."""
    async with kameo.Pool("bench_handlers:echo", size=4, start=start) as pool:  # type: ignore[arg-type]
        stop = False

        async def load() -> None:
            while not stop:
                with contextlib.suppress(kameo.WorkerCrashed, kameo.PoolClosed):
                    await pool.ask(MSG)

        tasks = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(0.1)
        victim = pool.workers[0]
        t0 = clock()
        os.kill(victim.pid, signal.SIGKILL)
        deadline = t0 + BOUND_S
        while clock() < deadline:
            ws = pool.workers
            if len([w for w in ws if w.state in ("ready", "busy")]) == 4 and victim.pid not in {
                w.pid for w in ws
            }:
                break
            await asyncio.sleep(0.0005)
        elapsed = clock() - t0
        stop = True
        await asyncio.gather(*tasks)
    return elapsed * 1000


def one_fork() -> float:
    t0 = clock()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return (clock() - t0) * 1000


def bench_w6(repeats: int) -> dict[str, float]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        res: dict[str, list[tuple[float, float]]] = {"exec": [], "zygote": []}
        rec: dict[str, list[float]] = {"exec": [], "zygote": []}
        forks = []
        for _ in range(repeats):
            for start in ("exec", "zygote"):
                res[start].append(asyncio.run(crash_then_echo(start, tmp)))
                rec[start].append(asyncio.run(recovery_under_load(start)))
            forks.append(one_fork())
    fork_ms = statistics.median(forks)
    emit("W6", "one_fork", "fork_median", round(fork_ms, 3), "ms", samples_ms=forks)
    out["one_fork"] = fork_ms
    for start in ("exec", "zygote"):
        detect = statistics.median(d for d, _ in res[start])
        echo = statistics.median(e for _, e in res[start])
        back = statistics.median(rec[start])
        out[f"echo_after_crash_{start}"] = echo
        out[f"recovery_{start}"] = back
        emit("W6", f"kameo_{start}", "crash_detected_median", round(detect, 2), "ms")
        emit(
            "W6",
            f"kameo_{start}",
            "echo_after_crash_median",
            round(echo, 2),
            "ms",
            samples_ms=[round(e, 2) for _, e in res[start]],
            note="WorkerCrashed -> next echo answered (Pool(size=1))",
        )
        emit(
            "W6",
            f"kameo_{start}",
            "recovery_under_load_median",
            round(back, 2),
            "ms",
            samples_ms=[round(x, 2) for x in rec[start]],
            note="SIGKILL of 1 of 4 busy workers -> 4 ready",
        )
    return out


# ------------------------------------------------------------------------------------ RSS


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def bench_rss() -> None:
    module = "bench_numpy_handlers" if has_numpy() else "bench_handlers"

    async def run(start: str) -> None:
        async with kameo.Pool(f"{module}:echo", size=4, start=start) as pool:  # type: ignore[arg-type]
            assert await pool.ask(MSG) == MSG
            mems = [memory(w.pid) for w in pool.workers]
            emit(
                "RSS",
                f"kameo_{start}",
                "worker_pss_mean",
                round(statistics.mean(p for _, p in mems) / 1024, 1),
                "MiB",
                rss_mean_mib=round(statistics.mean(r for r, _ in mems) / 1024, 1),
                handler=f"{module}:echo",
                size=4,
            )

    for start in ("exec", "zygote"):
        asyncio.run(run(start))


# ---------------------------------------------------------------------------------- driver


def summary(name: str, value: float | None, target: str, met: bool | None) -> None:
    emit(
        "summary",
        "kameo_zygote",
        name,
        None if value is None else round(value, 3),
        "ratio",
        target=target,
        met=met,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--only", default="W6,W7,RSS")
    args = ap.parse_args()
    only = set(args.only.split(","))
    emit_env(kameo, numpy=has_numpy())
    w7 = bench_w7(3 if args.quick else 7, 8) if "W7" in only else {}
    w6 = bench_w6(3 if args.quick else 7) if "W6" in only else {}
    if "RSS" in only:
        bench_rss()
    rows = []
    if w7:
        z, mp, bare = w7["kameo_zygote"], w7["mp_fork"], w7["bare_python_pass"]
        summary("W7_zygote_vs_mp_fork", z / mp, "<= 1.5", z / mp <= 1.5)
        summary("W7_zygote_vs_bare_python", z / bare, "<= 1.0", z / bare <= 1.0)
        rows += [
            ("W7 zygote / mp fork pool", z / mp, "<= 1.5"),
            ("W7 zygote / 8 bare pythons", z / bare, "<= 1.0"),
            ("W7 exec / zygote", w7["kameo_exec"] / z, "info"),
        ]
        if "kameo_zygote_numpy" in w7:
            speedup = w7["kameo_exec_numpy"] / w7["kameo_zygote_numpy"]
            summary("W7_numpy_exec_vs_zygote", speedup, ">= 5", speedup >= 5)
            rows.append(("W7 numpy handler: exec / zygote", speedup, ">= 5"))
    if w6:
        e = w6["echo_after_crash_zygote"]
        emit(
            "summary",
            "kameo_zygote",
            "W6_echo_after_crash",
            round(e, 2),
            "ms",
            target="<= 10",
            met=e <= 10,
        )
        r = w6["recovery_zygote"] / w6["one_fork"]
        summary("W6_recovery_vs_one_fork", r, "<= 2", r <= 2)
        rows += [
            ("W6 echo after crash, zygote (ms)", e, "<= 10"),
            ("W6 echo after crash, exec (ms)", w6["echo_after_crash_exec"], "info"),
            ("W6 recovery zygote / one fork", r, "<= 2"),
            ("W6 recovery zygote (ms)", w6["recovery_zygote"], "info"),
            ("W6 recovery exec (ms)", w6["recovery_exec"], "info"),
        ]
    if rows:
        print()
        for what, v, target in rows:
            print(f"{what:40} {v:9.2f}  {target}")
        for k, v in {**w7, **w6}.items():
            print(f"  {k:32} {v:9.2f} ms")


if __name__ == "__main__":
    main()
