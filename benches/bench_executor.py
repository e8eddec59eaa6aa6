"""W10: kameo.Executor.map against ProcessPoolExecutor.map and mpire (issue 14's targets).

    python benches/bench_executor.py [--quick]

100,000 tiny tasks (``bench_handlers.tiny``), 2 workers, each executor started (and warmed
with one map) before timing. Measures items/s of:

* ``kameo.Executor.map`` (adaptive batches), and with ``chunksize=1``;
* ``ProcessPoolExecutor.map`` at ``chunksize=1`` and at its best of a few chunksizes;
* ``mpire.WorkerPool(n_jobs=2).map`` (if mpire is importable; ``make bench`` installs it).

Targets: kameo >= 3x PPE at chunksize=1, >= 1x PPE at its best chunksize, >= 2x mpire.
Rounds are interleaved; medians reported. Also the parent's RSS across ``Executor.map`` over
10 million generated items (target: flat within 10 %; with ``--quick`` 2 million).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_handlers  # noqa: E402
import kameo  # noqa: E402
from _report import emit, emit_env  # noqa: E402

WORKERS = 2


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def timed(run, n):
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    assert out == n, out
    return n / dt


def consume(it):
    k = 0
    for _ in it:
        k += 1
    return k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    args = ap.parse_args()
    emit_env(kameo, quick=args.quick)
    n = 20_000 if args.quick else 100_000
    rounds = 2 if args.quick else 3
    f = bench_handlers.tiny
    items = range(n)
    try:
        import mpire  # type: ignore[import-not-found]
    except ImportError as exc:
        mpire = None
        emit("W10", "mpire", "skipped", None, None, reason=f"mpire not importable: {exc}")

    kx = kameo.Executor(max_workers=WORKERS)
    ppe = cf.ProcessPoolExecutor(max_workers=WORKERS)
    mp = mpire.WorkerPool(n_jobs=WORKERS, keep_alive=True) if mpire else None
    chunks = (10, 100, 1000, max(1, n // (4 * WORKERS)))
    runs = {
        "kameo": lambda: consume(kx.map(f, items)),
        "kameo_chunksize1": lambda: consume(kx.map(f, items, chunksize=1)),
        "ppe_chunksize1": lambda: consume(ppe.map(f, items, chunksize=1)),
    }
    for c in chunks:
        runs[f"ppe_chunksize{c}"] = lambda c=c: consume(ppe.map(f, items, chunksize=c))
    if mp is not None:
        runs["mpire"] = lambda: len(mp.map(f, items, progress_bar=False))
    try:
        for run in runs.values():  # warm up: workers started, modules imported
            run()
        rates = {k: [] for k in runs}
        for _ in range(rounds):
            for k, run in runs.items():
                rates[k].append(timed(run, n))
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in med.items():
            emit("W10", k, "rate", round(v), "items/s", n=n, rounds=rounds)
        best_c = max(chunks, key=lambda c: med[f"ppe_chunksize{c}"])
        ppe_best = max(med[f"ppe_chunksize{c}"] for c in (1, *chunks) if f"ppe_chunksize{c}" in med)
        summary = [
            ("kameo/ppe_chunksize1", med["kameo"] / med["ppe_chunksize1"], ">= 3", 3),
            ("kameo/ppe_best", med["kameo"] / ppe_best, ">= 1", 1),
        ]
        if mp is not None:
            summary.append(("kameo/mpire", med["kameo"] / med["mpire"], ">= 2", 2))
        for name, value, target, low in summary:
            emit(
                "W10",
                "summary",
                name,
                round(value, 3),
                "ratio",
                target=target,
                passed=value >= low,
                ppe_best_chunksize=best_c,
            )
        # Memory: the parent's RSS across a map of many generated items.
        total = 2_000_000 if args.quick else 10_000_000
        gen = (i for i in range(total))
        it = kx.map(f, gen)
        before = None
        for i, _ in enumerate(it):
            if i == total // 10:
                before = rss_kib()
        after = rss_kib()
        assert before
        emit(
            "W10",
            "kameo",
            "rss_growth",
            round(after / before - 1, 4),
            "fraction",
            items=total,
            before_kib=before,
            after_kib=after,
            target="<= 0.10",
            passed=abs(after / before - 1) <= 0.10,
        )
    finally:
        kx.shutdown()
        ppe.shutdown()
        if mp is not None:
            mp.terminate()


if __name__ == "__main__":
    main()
