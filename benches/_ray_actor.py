"""The Ray side of W9 (``bench_remote.py --ray``): run by the side venv's python, never by
kameo's, and imports nothing from kameo.

    <side venv>/bin/python benches/_ray_actor.py --msg JSON --n N --total T --repeats R

Starts a local Ray (two CPUs, no dashboard, a small object store), creates actors whose
``echo(self, msg)`` returns msg, warms up, then measures:

* p50 latency of sequential ``ray.get(actor.echo.remote(msg))`` on one actor;
* throughput of ``ray.get([actor.echo.remote(msg) for _ in range(T)])`` on one actor, and the
  same spread round-robin over two actors (kameo's pool has two workers).

Ray's startup and the warm-up are outside every timing. One JSON object per line on stdout, each
with ``"ray": true`` (Ray's own chatter goes to stderr or is dropped); ``ray.shutdown()`` runs
whatever happens.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network

import ray

clock = time.perf_counter_ns


def out(impl: str, metric: str, value: object, unit: object, **extra: object) -> None:
    rec = {"ray": True, "impl": impl, "metric": metric, "value": value, "unit": unit}
    rec.update(extra)
    print(json.dumps(rec), flush=True)


@ray.remote
class EchoActor:
    def echo(self, msg):
        return msg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--msg", required=True, help="the message, as JSON")
    ap.add_argument("--n", type=int, required=True, help="sequential calls timed")
    ap.add_argument("--total", type=int, required=True, help="calls per throughput batch")
    ap.add_argument("--repeats", type=int, required=True, help="throughput batches")
    args = ap.parse_args()
    msg = json.loads(args.msg)

    t0 = clock()
    ctx = ray.init(
        address="local",  # a new local instance, never one already running
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    session_dir = ctx.address_info.get("session_dir")
    try:
        actors = [EchoActor.remote() for _ in range(2)]
        ray.get([a.echo.remote(msg) for a in actors])  # both actors up
        out(
            "startup",
            "time",
            round((clock() - t0) / 1e9, 2),
            "s",
            ray_version=ray.__version__,
            session_dir=session_dir,  # its logs, removed after a clean shutdown
        )
        one = actors[0]
        for _ in range(200):
            ray.get(one.echo.remote(msg))
        assert ray.get(one.echo.remote(msg)) == msg

        lat = [0] * args.n
        for i in range(args.n):
            t = clock()
            ray.get(one.echo.remote(msg))
            lat[i] = clock() - t
        out("actor_method", "p50", round(statistics.median(lat) / 1000, 2), "us", n=args.n)

        for name, pool in (("concurrent_1actor", actors[:1]), ("concurrent_2actors", actors)):
            ray.get([pool[i % len(pool)].echo.remote(msg) for i in range(1000)])  # warm-up
            rates = []
            for _ in range(args.repeats):
                gc.collect()
                t = clock()
                ray.get([pool[i % len(pool)].echo.remote(msg) for i in range(args.total)])
                rates.append(args.total / ((clock() - t) / 1e9))
            out(
                name,
                "rate",
                round(statistics.median(rates)),
                "msg/s",
                n=args.total,
                actors=len(pool),
            )
    finally:
        ray.shutdown()
    if session_dir and os.path.isdir(session_dir):
        shutil.rmtree(session_dir, ignore_errors=True)  # its logs: a few MB per run
    out("done", "done", None, None)


if __name__ == "__main__":
    sys.exit(main())
