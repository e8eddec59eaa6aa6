#!/usr/bin/env python3
"""Resilience benchmarks: kameo under worker SIGKILLs, versus the stdlib and loky pools.

Usage::

    python benches/bench_resilience.py [--quick] [--only chaos,detection,recovery,peers]

Every result is one JSON object per line with at least ``workload``, ``impl``, ``metric``,
``value`` and ``unit``; after the workloads, ``summary`` lines give each target and whether it
was met.

Workloads:

* chaos: ``n`` asks (all issued at once) on ``Pool(size=4)`` whose handler appends the request id
  to a ledger file (O_APPEND), sleeps 0.2 ms and returns ``msg * 2``, while a background task
  SIGKILLs a random live worker every 100 ms. Run once with ``idempotent=True`` (every answer
  must be correct) and once without (each request either answers correctly or raises
  WorkerCrashed, and no id may appear twice in the ledger: no duplicate execution). Both runs
  check that after ``close()`` no worker process survives (no child of this process is left, not
  even a zombie) and that no file descriptor leaked (``/proc/self/fd`` before and after). A run
  without kills gives the undisturbed time (info).
* detection: the time from a worker's death to the caller's WorkerCrashed (a fresh
  ``Pool(size=1)`` each time). ``self_kill``: the handler writes CLOCK_MONOTONIC to a file, then
  SIGKILLs itself. ``parent_kill`` (info): the parent reads the running handler's pid, takes
  the time, then SIGKILLs it. ``kernel_floor`` (info): SIGKILL of a bare Python child that
  imported kameo until its pidfd is readable (tearing down a Python process takes ~1 ms).
* recovery: after a SIGKILL of one worker of a 4-worker pool, the time until ``pool.workers``
  shows 4 ready workers again, versus the start time of ``Pool(size=1)`` measured in the same
  run (interleaved). Once with an idle pool (the target), once while a loop of sequential asks
  runs (info): its p50/p99 latency in the recovery window versus the 300 ms before the kill.
* peers: one task is SIGKILLed mid-run while 7 short tasks are in flight on 4 workers:
  kameo, ``concurrent.futures.ProcessPoolExecutor`` and, if importable, loky. What the victim's
  caller sees, whether the other tasks succeed, what the next submit does, whether the pool
  recovers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import importlib
import multiprocessing
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from _report import emit, emit_env

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# Worker processes inherit the parent's sys.path, so this makes "bench_handlers:chaos" importable.
sys.path.insert(0, BENCH_DIR)

WORKLOADS = ("chaos", "detection", "recovery", "peers")
KILL_EVERY_S = 0.1
RECOVERY_BEFORE_S = 0.3  # the "before" latency window
POLL_S = 0.001
BOUND_S = 120.0  # upper bound on any single wait, so that a bug cannot hang the script
MSG = {"symbol": "AAPL", "qty": 100, "price": 187.25, "side": "buy", "tags": ["a", "b"]}

SIZES = {
    "full": {
        "chaos_n": 20000,
        "detection_reps": 20,
        "recovery_reps": 6,
        "peers_others": 7,
    },
    "quick": {
        "chaos_n": 5000,
        "detection_reps": 8,
        "recovery_reps": 3,
        "peers_others": 7,
    },
}

clock = time.perf_counter_ns


def mono_ns():
    """CLOCK_MONOTONIC, the same clock in every process of this machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def emit_summary(workload, name, value, unit, target, passed, **extra):
    emit(workload, "summary", name, value, unit, target=target, passed=passed, **extra)


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def ms(ns):
    return round(ns / 1e6, 3)


def exc_text(exc, limit=120):
    """``Type: first line of the message`` (cut to ``limit`` characters)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:limit]}"


# ---------------------------------------------------------------------------------------------
# Process and descriptor checks
# ---------------------------------------------------------------------------------------------


def fd_table():
    """{fd: what it points to} for this process."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own descriptor, closed by now
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def children():
    """{pid: (state, cmdline)} of every process whose parent is this one (zombies included;
    a zombie's cmdline is empty)."""
    me = os.getpid()
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != me:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            out[int(name)] = (fields[0], cmd)
        except (OSError, IndexError, ValueError):
            continue
    return out


def pid_alive(pid):
    """True if ``pid`` still exists and is a kameo worker (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"kameo._worker" in f.read()
    except OSError:
        return False


def live_workers(pool):
    return [w for w in pool.workers if w.state in ("ready", "busy")]


async def wait_ready(pool, count, exclude=(), bound=BOUND_S):
    """Poll ``pool.workers`` until ``count`` workers are ready (none of the pids in
    ``exclude``); returns the perf_counter_ns at which that was seen."""
    deadline = time.monotonic() + bound
    while True:
        ready = [w for w in live_workers(pool) if w.pid not in exclude]
        if len(ready) >= count:
            return clock()
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool did not get {count} ready workers within {bound}s")
        await asyncio.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# chaos
# ---------------------------------------------------------------------------------------------


async def chaos_run(kameo, n, idempotent, kill, tmpdir, seed=1):
    ledger = os.path.join(tmpdir, f"ledger-{'idem' if idempotent else 'once'}-{int(kill)}")
    fds_before = fd_table()
    kids_before = set(children())
    seen_pids = set()
    kills = []
    ticks_without_victim = 0
    pool = kameo.Pool("bench_handlers:chaos", size=4, env={"KAMEO_BENCH_LEDGER": ledger})
    await asyncio.wait_for(pool.start(), BOUND_S)
    seen_pids.update(w.pid for w in pool.workers)
    done = False
    rng = random.Random(seed)

    async def killer():
        nonlocal ticks_without_victim
        while not done:
            await asyncio.sleep(KILL_EVERY_S)
            if done:
                break
            workers = pool.workers
            seen_pids.update(w.pid for w in workers if w.pid)
            live = [w.pid for w in workers if w.state in ("ready", "busy")]
            if not live:
                ticks_without_victim += 1
                continue
            pid = rng.choice(live)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills.append(pid)

    try:
        task = asyncio.get_running_loop().create_task(killer()) if kill else None
        t0 = clock()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(pool.ask(i, idempotent=idempotent) for i in range(n)), return_exceptions=True
            ),
            BOUND_S * 5,
        )
        elapsed = clock() - t0
        done = True
        if task is not None:
            await task
        stats = pool.stats()
        workers_at_end = [(w.slot, w.state, w.restarts, w.last_exit) for w in pool.workers]
        seen_pids.update(w.pid for w in pool.workers if w.pid)
    finally:
        done = True
        t_close = clock()
        await asyncio.wait_for(pool.close(), BOUND_S)
        close_ns = clock() - t_close
    await asyncio.sleep(0)
    fds_after = fd_table()
    kids = {pid: v for pid, v in children().items() if pid not in kids_before}
    survivors = sorted(p for p in seen_pids if pid_alive(p))

    correct = wrong = 0
    failures = collections.Counter()
    failure_example = {}
    answered = set()
    crashed_ids = set()
    for i, r in enumerate(results):
        if isinstance(r, BaseException):
            name = type(r).__name__
            failures[name] += 1
            failure_example.setdefault(name, exc_text(r))
            if isinstance(r, kameo.WorkerCrashed):
                crashed_ids.add(i)
        elif r == 2 * i:
            correct += 1
            answered.add(i)
        else:
            wrong += 1
    with open(ledger) as f:
        runs = collections.Counter(int(line) for line in f if line.strip())
    duplicates = {i: c for i, c in runs.items() if c > 1}
    answered_not_run = len(answered - set(runs))
    new_fds = {fd: fds_after[fd] for fd in fds_after.keys() - fds_before.keys()}
    return {
        "elapsed_ns": elapsed,
        "kills": len(kills),
        "ticks_without_victim": ticks_without_victim,
        "correct": correct,
        "wrong": wrong,
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "failure_example": failure_example,
        "worker_crashed": len(crashed_ids),
        "executed_ids": len(runs),
        "executed_total": sum(runs.values()),
        "duplicate_ids": len(duplicates),
        "duplicate_examples": dict(list(duplicates.items())[:5]),
        "answered_but_not_in_ledger": answered_not_run,
        "crashed_ids_in_ledger": len(crashed_ids & set(runs)),
        "stats": stats,
        "workers_at_end": workers_at_end,
        "close_ms": ms(close_ns),
        "pids_seen": len(seen_pids),
        "survivors": survivors,
        "children_after_close": {str(k): v for k, v in kids.items()},
        "fds_before": len(fds_before),
        "fds_after": len(fds_after),
        "fds_new": {str(k): v for k, v in new_fds.items()},
    }


def emit_chaos(impl, n, res, idempotent, kill):
    st = res["stats"]
    return emit(
        "chaos",
        impl,
        "total_time",
        ms(res["elapsed_ns"]),
        "ms",
        n=n,
        idempotent=idempotent,
        kill_every_ms=int(KILL_EVERY_S * 1000) if kill else None,
        asks_per_s=round(n / (res["elapsed_ns"] / 1e9), 1),
        kills=res["kills"],
        ticks_without_live_worker=res["ticks_without_victim"],
        correct=res["correct"],
        wrong=res["wrong"],
        failed=res["failed"],
        failures=res["failures"],
        failure_example=res["failure_example"],
        executed_ids=res["executed_ids"],
        executed_total=res["executed_total"],
        duplicate_ids=res["duplicate_ids"],
        duplicate_examples=res["duplicate_examples"],
        answered_but_not_in_ledger=res["answered_but_not_in_ledger"],
        crashed_ids_in_ledger=res["crashed_ids_in_ledger"],
        stats_retries=st.retries,
        stats_crashes=st.crashes,
        stats_asks=st.asks,
        stats_completed=st.completed,
        stats_errors=st.errors,
        workers_at_end=res["workers_at_end"],
        close_ms=res["close_ms"],
        pids_seen=res["pids_seen"],
        survivors_after_close=res["survivors"],
        children_after_close=res["children_after_close"],
        fds_before=res["fds_before"],
        fds_after=res["fds_after"],
        fds_new=res["fds_new"],
    )


def bench_chaos(kameo, sz, tmpdir):
    n = sz["chaos_n"]
    out = {}

    async def run():
        base = await chaos_run(kameo, n, True, False, tmpdir)
        out["no_kills"] = emit_chaos("kameo_no_kills", n, base, True, False)
        idem = await chaos_run(kameo, n, True, True, tmpdir)
        out["idempotent"] = emit_chaos("kameo_idempotent", n, idem, True, True)
        once = await chaos_run(kameo, n, False, True, tmpdir, seed=2)
        out["non_idempotent"] = emit_chaos("kameo_non_idempotent", n, once, False, True)

    asyncio.run(run())
    return out


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------


async def detect_self_kill(kameo, reps, tmpdir):
    delays = []
    others = collections.Counter()
    # A fresh pool each time: one slot killed over and over would hit kameo's crash-loop
    # backoff (more than 3 crashes in 10 s), which is not what is measured here.
    for i in range(reps):
        async with kameo.Pool("bench_handlers:die_now", size=1) as pool:
            path = os.path.join(tmpdir, f"death-{i}")
            try:
                await asyncio.wait_for(pool.ask({"path": path}), BOUND_S)
            except kameo.WorkerCrashed:
                t_exc = mono_ns()
            except Exception as exc:
                others[exc_text(exc)] += 1
                continue
            else:
                others["no exception"] += 1
                continue
            with open(path) as f:
                delays.append(t_exc - int(f.read()))
    return delays, dict(others)


async def detect_parent_kill(kameo, reps, tmpdir):
    delays = []
    others = collections.Counter()
    for i in range(reps):
        async with kameo.Pool("bench_handlers:peer_task", size=1) as pool:
            path = os.path.join(tmpdir, f"victim-{i}")
            fut = pool.ask({"path": path, "sleep": 60})
            pid = await read_pid(path)
            t_kill = mono_ns()
            os.kill(pid, signal.SIGKILL)
            try:
                await asyncio.wait_for(fut, BOUND_S)
            except kameo.WorkerCrashed:
                delays.append(mono_ns() - t_kill)
            except Exception as exc:
                others[exc_text(exc)] += 1
            else:
                others["no exception"] += 1
    return delays, dict(others)


async def read_pid(path, bound=BOUND_S):
    deadline = time.monotonic() + bound
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {bound}s")
        await asyncio.sleep(POLL_S)
    with open(path) as f:
        return int(f.read())


def kernel_floor(reps):
    """SIGKILL of a bare ``python -c "import kameo; ..."`` child until its pidfd is readable:
    the kernel's share of any detection (a Python process takes ~1 ms to be torn down)."""
    delays = []
    for _ in range(reps):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import kameo, sys, time; sys.stdout.write('up\\n'); "
                "sys.stdout.flush(); time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            proc.stdout.readline()
            pidfd = os.pidfd_open(proc.pid)
            try:
                t0 = clock()
                os.kill(proc.pid, signal.SIGKILL)
                select.select([pidfd], [], [], BOUND_S)
                delays.append(clock() - t0)
            finally:
                os.close(pidfd)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    return delays


def emit_detection(impl, delays, others, note):
    if not delays:
        return emit("detection", impl, "error", None, None, error="no samples", others=others)
    return emit(
        "detection",
        impl,
        "death_to_exception_p50",
        ms(statistics.median(delays)),
        "ms",
        max_ms=ms(max(delays)),
        min_ms=ms(min(delays)),
        p90_ms=ms(pct(delays, 0.9)),
        samples_ms=[ms(d) for d in delays],
        n=len(delays),
        unexpected=others,
        note=note,
    )


def bench_detection(kameo, sz, tmpdir):
    reps = sz["detection_reps"]

    async def run():
        a = await detect_self_kill(kameo, reps, tmpdir)
        b = await detect_parent_kill(kameo, reps, tmpdir)
        return a, b

    (d1, o1), (d2, o2) = asyncio.run(run())
    floor = kernel_floor(reps)
    return {
        "kernel_floor": emit_detection(
            "kernel_floor",
            floor,
            {},
            "info: SIGKILL of a bare python child that imported kameo -> its pidfd is readable",
        ),
        "self_kill": emit_detection(
            "kameo_self_kill",
            d1,
            o1,
            "handler writes CLOCK_MONOTONIC then SIGKILLs itself; parent takes the time when "
            "WorkerCrashed is raised (Pool(size=1), idle parent)",
        ),
        "parent_kill": emit_detection(
            "kameo_parent_kill",
            d2,
            o2,
            "info: parent reads the running handler's pid, takes the time, os.kill(SIGKILL)",
        ),
    }


# ---------------------------------------------------------------------------------------------
# recovery
# ---------------------------------------------------------------------------------------------


async def ask_loop(pool, samples, state, errors):
    """Sequential asks until ``state["stop"]``; appends (start_ns, latency_ns) to ``samples``."""
    while not state["stop"]:
        t = clock()
        try:
            await pool.ask(MSG, idempotent=True)
        except Exception as exc:
            errors[exc_text(exc)] += 1
            continue
        samples.append((t, clock() - t))


async def recovery_run(kameo, reps, with_load):
    """Returns (recovery_ns list, single_start_ns list, latency dict or None, notes)."""
    recov, single = [], []
    before, during = [], []
    ask_errors = collections.Counter()
    retries = 0
    pool = kameo.Pool("bench_handlers:echo", size=4)
    await asyncio.wait_for(pool.start(), BOUND_S)
    try:
        for rep in range(reps):
            # One worker's start time, interleaved with the recoveries.
            t0 = clock()
            one = kameo.Pool("bench_handlers:echo", size=1)
            await asyncio.wait_for(one.start(), BOUND_S)
            single.append(clock() - t0)
            await one.close()
            await wait_ready(pool, 4)

            samples = []  # (start_ns, latency_ns)
            state = {"stop": False}
            task = None
            if with_load:
                task = asyncio.get_running_loop().create_task(
                    ask_loop(pool, samples, state, ask_errors)
                )
            await asyncio.sleep(RECOVERY_BEFORE_S if with_load else 0.05)
            # Rotate the victim's slot, so that no slot is killed often enough to back off.
            slot = rep % 4
            victim = next(w for w in pool.workers if w.slot == slot and w.state != "dead")
            t_kill = clock()
            os.kill(victim.pid, signal.SIGKILL)
            t_ok = await wait_ready(pool, 4, exclude={victim.pid})
            recov.append(t_ok - t_kill)
            state["stop"] = True
            if task is not None:
                await task
            before += [lat for t, lat in samples if t_kill - RECOVERY_BEFORE_S * 1e9 <= t < t_kill]
            during += [lat for t, lat in samples if t_kill <= t <= t_ok]
        retries = pool.stats().retries
        crashes = pool.stats().crashes
    finally:
        await pool.close()
    lat = None
    if with_load:
        lat = {"before": before, "during": during}
    return (
        recov,
        single,
        lat,
        {"ask_errors": dict(ask_errors), "retries": retries, "crashes": crashes},
    )


def lat_stats(samples):
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "p50_us": round(statistics.median(samples) / 1e3, 1),
        "p99_us": round(pct(samples, 0.99) / 1e3, 1),
        "max_us": round(max(samples) / 1e3, 1),
    }


def bench_recovery(kameo, sz):
    reps = sz["recovery_reps"]
    out = {}

    async def run():
        return await recovery_run(kameo, reps, False), await recovery_run(kameo, reps, True)

    idle, loaded = asyncio.run(run())
    for impl, (recov, single, lat, notes) in (
        ("kameo_idle", idle),
        ("kameo_under_load", loaded),
    ):
        extra = {}
        if lat is not None:
            b, d = lat_stats(lat["before"]), lat_stats(lat["during"])
            extra = {"latency_before": b, "latency_during_recovery": d}
            if b.get("p99_us") and d.get("p99_us"):
                extra["p99_during_over_before"] = round(d["p99_us"] / b["p99_us"], 2)
        out[impl] = emit(
            "recovery",
            impl,
            "recovery_median",
            ms(statistics.median(recov)),
            "ms",
            recovery_ms=[ms(x) for x in recov],
            single_worker_start_median_ms=ms(statistics.median(single)),
            single_worker_start_ms=[ms(x) for x in single],
            ratio=round(statistics.median(recov) / statistics.median(single), 3),
            reps=len(recov),
            **notes,
            **extra,
            note="SIGKILL one worker of Pool(size=4) -> 4 ready in pool.workers (polled every "
            "1 ms), vs Pool(size=1) construct + start() interleaved"
            + ("; a loop of sequential idempotent asks runs meanwhile" if lat else ""),
        )
    return out


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------


def wait_file(path, bound=BOUND_S):
    deadline = time.monotonic() + bound
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {bound}s")
        time.sleep(POLL_S)
    with open(path) as f:
        return int(f.read())


def outcome(fut, timeout):
    """("ok", value) or ("error", "Type: message head")."""
    try:
        return "ok", fut.result(timeout=timeout)
    except Exception as exc:
        return "error", exc_text(exc)


def peer_executor(make, name, sz, tmpdir, again=None):
    """The kill-mid-task scenario on a concurrent.futures-style executor."""
    handlers = importlib.import_module("bench_handlers")
    task = handlers.peer_task
    ex = make()
    rec = {}
    try:
        # Warm every worker so that the kill hits a running pool, not one still starting.
        list(ex.map(task, [{"x": i, "sleep": 0.01} for i in range(8)]))
        path = os.path.join(tmpdir, f"peer-{name}")
        victim = ex.submit(task, {"path": path, "sleep": 60})
        others = [ex.submit(task, {"x": i, "sleep": 0.05}) for i in range(sz["peers_others"])]
        pid = wait_file(path)
        t_kill = clock()
        os.kill(pid, signal.SIGKILL)
        kind, value = outcome(victim, BOUND_S)
        rec["victim_detect_ms"] = ms(clock() - t_kill)
        rec["victim"] = value if kind == "error" else f"returned {value!r}"
        res = [outcome(f, BOUND_S) for f in others]
        rec["others_ok"] = sum(1 for k, v in res if k == "ok")
        rec["others_failed"] = dict(collections.Counter(v for k, v in res if k == "error"))
        try:
            nxt = ex.submit(task, {"x": 100, "sleep": 0.01})
            kind, value = outcome(nxt, BOUND_S)
            rec["next_submit"] = f"{kind}: {value}"
            rec["next_ok"] = kind == "ok" and value == 200
        except Exception as exc:
            rec["next_submit"] = f"submit raised {exc_text(exc)}"
            rec["next_ok"] = False
        if again is not None:
            try:
                ex2 = again()
                kind, value = outcome(ex2.submit(task, {"x": 7, "sleep": 0.01}), BOUND_S)
                rec["recreated_executor"] = f"{kind}: {value}"
                rec["recovers_via_recreate"] = kind == "ok" and value == 14
                if ex2 is not ex:
                    ex2.shutdown(wait=True, kill_workers=True)
            except Exception as exc:
                rec["recreated_executor"] = f"raised {exc_text(exc)}"
                rec["recovers_via_recreate"] = False
    finally:
        try:
            ex.shutdown(wait=True, cancel_futures=True)
        except TypeError:  # loky's shutdown(wait, kill_workers)
            ex.shutdown(wait=True, kill_workers=True)
    return rec


async def peer_kameo_async(kameo, sz, tmpdir):
    rec = {}
    async with kameo.Pool("bench_handlers:peer_task", size=4) as pool:
        await asyncio.gather(*(pool.ask({"x": i, "sleep": 0.01}) for i in range(8)))
        path = os.path.join(tmpdir, "peer-kameo")
        victim = pool.ask({"path": path, "sleep": 60})
        others = [pool.ask({"x": i, "sleep": 0.05}) for i in range(sz["peers_others"])]
        pid = await read_pid(path)
        t_kill = clock()
        os.kill(pid, signal.SIGKILL)
        try:
            value = await asyncio.wait_for(victim, BOUND_S)
            rec["victim"] = f"returned {value!r}"
        except Exception as exc:
            rec["victim"] = exc_text(exc)
        rec["victim_detect_ms"] = ms(clock() - t_kill)
        res = await asyncio.gather(*others, return_exceptions=True)
        rec["others_ok"] = sum(1 for i, r in enumerate(res) if r == 2 * i)
        rec["others_failed"] = dict(
            collections.Counter(exc_text(r) for r in res if isinstance(r, BaseException))
        )
        try:
            value = await asyncio.wait_for(pool.ask({"x": 100, "sleep": 0.01}), BOUND_S)
            rec["next_submit"] = f"ok: {value}"
            rec["next_ok"] = value == 200
        except Exception as exc:
            rec["next_submit"] = f"error: {exc_text(exc)}"
            rec["next_ok"] = False
        await wait_ready(pool, 4, exclude={pid})
        rec["ready_workers_after"] = len(live_workers(pool))
        rec["stats_crashes"] = pool.stats().crashes
    return rec


def bench_peers(kameo, sz, tmpdir):
    out = {}

    def report(impl, fn, *args, **extra):
        try:
            rec = fn(*args)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            emit("peers", impl, "error", None, None, error=exc_text(exc, 300))
            return
        out[impl] = emit(
            "peers",
            impl,
            "later_tasks_succeed",
            bool(rec.get("next_ok")) or bool(rec.get("recovers_via_recreate")),
            "bool",
            **rec,
            **extra,
        )

    # The stdlib pool forks: run it before anything else of this workload starts.
    report(
        "ProcessPoolExecutor",
        peer_executor,
        lambda: concurrent.futures.ProcessPoolExecutor(max_workers=4),
        "ppe",
        sz,
        tmpdir,
        start_method=multiprocessing.get_start_method(),
    )
    try:
        loky = importlib.import_module("loky")
    except ImportError as exc:
        emit("peers", "loky", "skipped", None, None, reason=f"loky not importable: {exc}")
    else:
        report(
            "loky",
            peer_executor,
            lambda: loky.get_reusable_executor(max_workers=4),
            "loky",
            sz,
            tmpdir,
            lambda: loky.get_reusable_executor(max_workers=4),
            version=loky.__version__,
            note="next_submit: same executor object; recreated_executor: "
            "get_reusable_executor() called again",
        )
    report("kameo", lambda: asyncio.run(peer_kameo_async(kameo, sz, tmpdir)))
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    args = ap.parse_args(argv)
    only = {w.strip().lower() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {sorted(unknown)}")
    sz = SIZES["quick" if args.quick else "full"]
    try:
        kameo = importlib.import_module("kameo")
    except Exception as exc:
        print(f"bench_resilience: kameo not importable: {exc}", file=sys.stderr)
        return 1
    emit_env(
        kameo,
        quick=args.quick,
        only=sorted(only),
        sizes=sz,
    )
    t_start = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="kameo-resilience-")
    results = {}

    def run(name, fn, *fargs):
        if name not in only:
            return
        try:
            results[name] = fn(*fargs)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            emit(name, "kameo", "error", None, None, error=exc_text(exc, 300))

    try:
        run("chaos", bench_chaos, kameo, sz, tmpdir)
        run("detection", bench_detection, kameo, sz, tmpdir)
        run("recovery", bench_recovery, kameo, sz)
        # peers last: loky leaves helper processes behind (its resource tracker), which the
        # chaos checks would otherwise have to tell apart from kameo workers. The stdlib pool
        # forks, which is fine: every kameo pool is closed by then.
        run("peers", bench_peers, kameo, sz, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    summarize(results)
    emit("total", "bench_resilience", "wall_time", round(time.monotonic() - t_start, 2), "s")
    return 0


def summarize(results):
    chaos = results.get("chaos")
    if chaos:
        idem = chaos.get("idempotent")
        if idem:
            emit_summary(
                "chaos",
                "idempotent_all_correct",
                idem["correct"],
                "answers",
                f"== {idem['n']} (wrong 0, failed 0)",
                idem["correct"] == idem["n"] and idem["wrong"] == 0,
                kills=idem["kills"],
                retries=idem["stats_retries"],
                crashes=idem["stats_crashes"],
            )
        once = chaos.get("non_idempotent")
        if once:
            ok = (
                once["duplicate_ids"] == 0
                and once["wrong"] == 0
                and once["correct"] + once["failures"].get("WorkerCrashed", 0) == once["n"]
            )
            emit_summary(
                "chaos",
                "non_idempotent_no_duplicate_execution",
                once["duplicate_ids"],
                "duplicated ids",
                "0 duplicates; every ask answered correctly or WorkerCrashed",
                ok,
                answered=once["correct"],
                worker_crashed=once["failures"].get("WorkerCrashed", 0),
                kills=once["kills"],
            )
        for key in ("idempotent", "non_idempotent", "no_kills"):
            rec = chaos.get(key)
            if rec:
                clean = (
                    not rec["survivors_after_close"]
                    and not rec["children_after_close"]
                    and not rec["fds_new"]
                )
                emit_summary(
                    "chaos",
                    f"{key}_clean_after_close",
                    len(rec["fds_new"]),
                    "leaked fds",
                    "no surviving worker, no child left, no new fd",
                    clean,
                    survivors=rec["survivors_after_close"],
                    children=rec["children_after_close"],
                )
        base, idem = chaos.get("no_kills"), chaos.get("idempotent")
        if base and idem:
            emit_summary(
                "chaos",
                "time_with_kills/time_without",
                round(idem["value"] / base["value"], 3),
                "ratio",
                "info",
                True,
            )
    det = results.get("detection")
    if det:
        rec = det.get("self_kill")
        if rec and rec["value"] is not None:
            emit_summary(
                "detection", "self_kill_p50", rec["value"], "ms", "<= 20", rec["value"] <= 20
            )
            emit_summary(
                "detection", "self_kill_max", rec["max_ms"], "ms", "<= 20", rec["max_ms"] <= 20
            )
        floor = det.get("kernel_floor")
        if rec and floor and rec["value"] is not None and floor["value"]:
            emit_summary(
                "detection",
                "self_kill_p50/kernel_floor_p50",
                round(rec["value"] / floor["value"], 3),
                "ratio",
                "info",
                True,
            )
        rec = det.get("parent_kill")
        if rec and rec["value"] is not None:
            emit_summary(
                "detection",
                "parent_kill_p50",
                rec["value"],
                "ms",
                "<= 20 (info)",
                rec["value"] <= 20,
                max_ms=rec["max_ms"],
            )
    rec_ = results.get("recovery")
    if rec_:
        idle = rec_.get("kameo_idle")
        if idle:
            emit_summary(
                "recovery",
                "recovery/single_worker_start",
                idle["ratio"],
                "ratio",
                "<= 1.5",
                idle["ratio"] <= 1.5,
            )
        loaded = rec_.get("kameo_under_load")
        if loaded:
            emit_summary(
                "recovery",
                "under_load: recovery/single_worker_start",
                loaded["ratio"],
                "ratio",
                "info",
                True,
            )
            emit_summary(
                "recovery",
                "under_load: p99_during/p99_before",
                loaded.get("p99_during_over_before"),
                "ratio",
                "info",
                True,
            )
    peers = results.get("peers")
    if peers:
        for impl, rec in peers.items():
            emit_summary(
                "peers",
                f"{impl}: later tasks succeed",
                rec["value"],
                "bool",
                "info (kameo: true)",
                rec["value"],
                victim=rec.get("victim"),
                others_ok=rec.get("others_ok"),
                next_submit=rec.get("next_submit"),
            )


if __name__ == "__main__":
    sys.exit(main())
