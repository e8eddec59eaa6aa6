#!/usr/bin/env python3
"""The Rust host (kameo-host) versus the Python parent (kameo.Pool), same workers, same run.

Usage::

    python benches/bench_host.py [--quick] [--rounds N] [--python PATH] [--criterion]

Both parents drive workers whose handler is ``benchw:echo`` (crates/kameo-host/benches/
benchw.py, ``def echo(x): return x``), on two workloads:

* round_trip: one worker, sequential asks of a 6-field dict (bench_pool.py's MSG; a serde
  struct of the same fields on the Rust side), each timed (p50 in µs).
* pipelined: two workers, 20,000 asks issued at once (``asyncio.gather`` / ``join_all``),
  asks/s (the median of the repeats).

The Rust side is ``crates/kameo-host/benches/host.rs`` built with ``cargo bench --no-run``
(the bench profile: release) and run with ``--json``: it measures on a multi-thread tokio
runtime (``rust_host``, the one the targets are for) and a current-thread one (info), each
workload as a task spawned on the runtime, as a tokio service runs its requests (a future run
by ``block_on`` on a thread outside the runtime pays a cross-thread wake-up per answer). The two
sides alternate in ``--rounds`` rounds, so the slow phases of a noisy machine hit both; the
figure of each side is the median over the rounds (of the per-round p50s, of all repeats).

Every result is a JSON line on stdout (benches/_report.py's format), then one ``summary``
line per target; the table (Rust host vs Python parent, ratio) goes to stderr. The
interpreter of the workers is this one (run it with the venv's python) for the Python parent,
and ``--python``, else ``KAMEO_PYTHON``, else this one for the Rust host. ``--criterion``
runs the criterion version of host.rs afterwards (its own report).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from _report import emit, emit_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHW_DIR = os.path.join(ROOT, "crates", "kameo-host", "benches")
TARGET = "benchw:echo"
MSG = {
    "symbol": "AAPL",
    "qty": 100,
    "price": 187.25,
    "side": "buy",
    "tags": ["a", "b"],
    "id": 123456,
}
PIPELINED = 20_000
SIZES = {
    "full": {"rt_warmup": 500, "rt_n": 5000, "tp_repeats": 5},
    "quick": {"rt_warmup": 100, "rt_n": 1000, "tp_repeats": 3},
}
# (workload, metric, what the ratio is, target, lower time is better)
TARGETS = {
    "round_trip": ("time Rust / Python", 1.0, "<="),
    "pipelined": ("asks/s Rust / Python", 1.5, ">="),
}

clock = time.perf_counter_ns


async def python_round(kameo, sz):
    """Both workloads with the Python parent: (p50 µs, [asks/s per repeat])."""
    async with kameo.Pool(TARGET, size=1, pythonpath=[BENCHW_DIR]) as pool:
        ask = pool.ask
        for _ in range(sz["rt_warmup"]):
            await ask(MSG)
        gc.collect()
        samples = [0] * sz["rt_n"]
        for i in range(sz["rt_n"]):
            t0 = clock()
            reply = await ask(MSG)
            samples[i] = clock() - t0
        assert reply == MSG, reply
    async with kameo.Pool(TARGET, size=2, pythonpath=[BENCHW_DIR]) as pool:
        await asyncio.gather(*(pool.ask(MSG) for _ in range(PIPELINED)))  # warm-up
        rates = []
        for _ in range(sz["tp_repeats"]):
            gc.collect()
            t0 = clock()
            replies = await asyncio.gather(*(pool.ask(MSG) for _ in range(PIPELINED)))
            rates.append(PIPELINED / ((clock() - t0) / 1e9))
            assert len(replies) == PIPELINED and replies[-1] == MSG
            del replies
    return statistics.median(samples) / 1000.0, rates


def build_rust():
    """Build benches/host.rs (bench profile); the path of its executable."""
    out = subprocess.run(
        [
            *("cargo", "bench", "-q", "-p", "kameo-host", "--bench", "host", "--no-run"),
            "--message-format=json",
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        target = msg.get("target") or {}
        if msg.get("executable") and target.get("name") == "host" and "bench" in target["kind"]:
            return msg["executable"]
    raise SystemExit("bench_host: cargo built no executable for the bench 'host'")


def rust_round(exe, python, quick):
    """Both workloads with the Rust host: {impl: (p50 µs, [asks/s per repeat])}."""
    args = [exe, "--json"] + (["--quick"] if quick else [])
    env = {**os.environ, "KAMEO_PYTHON": python}
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    res: dict[str, list] = {}
    for line in out.splitlines():
        rec = json.loads(line)
        r = res.setdefault(rec["impl"], [None, None])
        if rec["workload"] == "round_trip":
            r[0] = rec["value"]
        elif rec["workload"] == "pipelined":
            r[1] = rec["repeats"]
    return {impl: (p50, rates) for impl, (p50, rates) in res.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer asks and repeats")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--python", help="the Rust host's worker interpreter")
    ap.add_argument("--criterion", action="store_true", help="then run the criterion bench")
    a = ap.parse_args()
    python = a.python or os.environ.get("KAMEO_PYTHON") or sys.executable
    sz = SIZES["quick" if a.quick else "full"]

    import kameo

    emit_env(kameo, rust_python=python, rounds=a.rounds, **sz)
    exe = build_rust()
    p50s: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        p50, r = asyncio.run(python_round(kameo, sz))
        p50s.setdefault("python_parent", []).append(p50)
        rates.setdefault("python_parent", []).extend(r)
        for impl, (p50, r) in rust_round(exe, python, a.quick).items():
            p50s.setdefault(impl, []).append(p50)
            rates.setdefault(impl, []).extend(r)

    rt = {impl: statistics.median(v) for impl, v in p50s.items()}
    tp = {impl: statistics.median(v) for impl, v in rates.items()}
    for impl in rt:
        emit("round_trip", impl, "latency_p50", round(rt[impl], 2), "us", per_round=p50s[impl])
        emit(
            "pipelined",
            impl,
            "throughput",
            round(tp[impl]),
            "asks/s",
            n=PIPELINED,
            workers=2,
            repeats=[round(x) for x in rates[impl]],
        )

    rows = []
    for impl in [i for i in rt if i != "python_parent"]:
        for workload, rust, py, ratio in (
            ("round_trip", rt[impl], rt["python_parent"], rt[impl] / rt["python_parent"]),
            ("pipelined", tp[impl], tp["python_parent"], tp[impl] / tp["python_parent"]),
        ):
            what, target, op = TARGETS[workload]
            met = ratio <= target if op == "<=" else ratio >= target
            info = impl != "rust_host"
            emit(
                "summary",
                impl,
                f"{workload}_ratio",
                round(ratio, 3),
                what,
                target=f"{op} {target}",
                met=None if info else met,
                note="info" if info else "",
            )
            rows.append((workload, impl, rust, py, ratio, f"{op} {target}", met, info))

    unit = {"round_trip": "p50 µs", "pipelined": "asks/s"}
    print(file=sys.stderr)
    head = f"{'workload':<11} {'Rust host':<26} {'Rust':>10} {'Python':>10} {'unit':<7}"
    print(f"{head} {'ratio':>6}  target", file=sys.stderr)
    for workload, impl, rust, py, ratio, target, met, info in rows:
        fmt = "{:>10.2f}" if workload == "round_trip" else "{:>10,.0f}"
        verdict = "info" if info else ("met" if met else "MISSED")
        print(
            f"{workload:<11} {impl:<26} {fmt.format(rust)} {fmt.format(py)} "
            f"{unit[workload]:<7} {ratio:>5.2f}x  {target} ({verdict})",
            file=sys.stderr,
        )
    print(
        "(round_trip ratio: Rust time / Python time; pipelined: Rust / Python asks/s)",
        file=sys.stderr,
    )

    if a.criterion:
        env = {**os.environ, "KAMEO_PYTHON": python}
        subprocess.run(
            ["cargo", "bench", "-q", "-p", "kameo-host", "--bench", "host"],
            cwd=ROOT,
            check=True,
            env=env,
        )


if __name__ == "__main__":
    main()
