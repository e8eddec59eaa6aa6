#!/usr/bin/env python3
"""Codec and large-payload benchmarks: kameo.encode/decode versus peer codecs, and one worker
echoing 16 MiB payloads versus the raw socket floor and numpy.copy.

Usage::

    python benches/bench_codec.py [--quick] [--only codec|w3]

Every result is one JSON line (``workload``, ``impl``, ``metric``, ``value``, ``unit`` and
extras), all measured in one run. ``summary`` lines give the ratio, the target and
``target_met``.

Codec micro-benchmarks (``--only codec``): kameo.encode/decode versus pickle protocol 5 and,
when importable, ormsgpack, msgpack and orjson (a codec that does not import gets a ``missing``
note in the ``env`` line). Per codec and payload: encode, decode and encode+decode time per
operation, best of several timeit repeats (the median is given too). Payloads:

* ``dict_100B``: a ~100-byte dict of str, int, float and a short list.
* ``list_1000x100B``: a list of 1,000 such dicts sharing their key objects and their ``tags``
  list (as dicts built with ``dict(MSG, id=i)`` do): pickle memoizes both; kameo sends the
  shared list once and refers to it (tags 0x1D/0x1E).
* ``list_1000x100B_distinct_keys``: the same data with every key a distinct str object.
* ``ext_types``: datetime with tzinfo, Decimal, UUID, set and (when numpy imports) a small
  numpy array: only kameo and pickle can carry these, so only they run. Where kameo cannot
  encode them yet, the kameo line is ``skipped`` with the error and the types it refused.

Targets, on encode+decode time: kameo at least 1.5x the speed of pickle (time ratio <= 0.667)
and at least as fast as ormsgpack (time ratio <= 1.0), for each of the first three payloads.
The ``ext_types`` ratio is info.

W3 large payloads (``--only w3``): one worker (``bench_handlers:echo``) echoes (a) a 16 MiB
``bytes`` object and (b) a 16 MiB float64 numpy array (2**21 elements) with ``pool.ask``.
Throughput = payload bytes x 2 directions / round-trip time, best and median over 20 round trips
(5 with ``--quick``) after warm-up. The pool has ``max_frame_bytes`` = 256 MiB, so the payloads
fit inline too. Where ``kameo.Pool`` accepts ``shm_threshold``, W3 runs twice: ``kameo`` (the
default, shared memory for large payloads) and ``kameo_shm_off`` (``shm_threshold=None``: every
byte through the socket). References measured in the same run:

* ``raw_socketpair``: two processes echoing the same 16 MiB over a Unix socketpair in pure
  Python (sendall, then recv_into a preallocated bytearray; the child is a tiny inline script
  started with subprocess): the socket floor, with no codec and no framing.
* ``numpy.copy``: one in-process copy of the array (GB/s = bytes / time), and the ratio of W3
  numpy throughput to it.

Targets: bytes >= 2 GB/s, numpy >= 5 GB/s (best round trip, default pool settings).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import decimal
import gc
import importlib
import os
import pickle
import socket
import statistics
import subprocess
import sys
import time
import timeit
import traceback
import uuid

from _report import emit, emit_env

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# Worker processes inherit the parent's sys.path, so this makes "bench_handlers:echo" importable.
sys.path.insert(0, BENCH_DIR)

clock = time.perf_counter_ns

SIZES = {
    # codec: timeit min time per measurement (s) and repeats; w3: timed round trips, warm-up.
    "full": {"min_time": 0.05, "repeat": 5, "w3_rounds": 20, "w3_warmup": 3},
    "quick": {"min_time": 0.02, "repeat": 3, "w3_rounds": 5, "w3_warmup": 1},
}
SECTIONS = ("codec", "w3")

# ---------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------

MSG = {
    "symbol": "AAPL",
    "qty": 100,
    "price": 187.25,
    "side": "buy",
    "tags": ["a", "b"],
    "id": 123456,
}
LIST = [dict(MSG, id=i) for i in range(1000)]
PAYLOADS = {
    "dict_100B": MSG,
    # The dicts share their key objects (as dicts built from literals do): pickle memoizes them.
    "list_1000x100B": LIST,
    # Same data, but every key a distinct str object: no memo hits for pickle.
    "list_1000x100B_distinct_keys": [{"".join(list(k)): v for k, v in d.items()} for d in LIST],
}


def ext_payload(np):
    """Values only kameo and pickle can carry (numpy array only when numpy imports)."""
    p = {
        "ts": datetime.datetime(2024, 5, 17, 14, 30, 5, 123456, tzinfo=datetime.UTC),
        "ts_offset": datetime.datetime(
            2024, 5, 17, 9, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))
        ),
        "amount": decimal.Decimal("187.2500"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "tags": {"a", "b", "c"},
    }
    if np is not None:
        p["arr"] = np.arange(16, dtype=np.float64)
    return p


W3_BYTES = 16 * 1024 * 1024  # 16 MiB; the numpy payload is 2**21 float64, the same size
MAX_FRAME_BYTES = 256 * 1024 * 1024
W3_TARGET = "bench_handlers:echo"
W3_TIMEOUT_S = 120.0
W3_TARGETS = {"bytes_16MiB": 2.0, "numpy_16MiB": 5.0}  # GB/s, default pool settings

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def load_module(name):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken extension module
        return None, f"{type(exc).__name__}: {exc}"


def same(a, b):
    """Equal values of the same types, recursively (numpy arrays: dtype, shape and contents)."""
    if type(a) is not type(b):
        return False
    if type(a).__module__ == "numpy" and hasattr(a, "dtype"):
        return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, datetime.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    return a == b


def err(exc):
    return f"{type(exc).__name__}: {exc}"


def ratio(num, den):
    if num is None or den is None or not den:
        return None
    return round(num / den, 3)


# ---------------------------------------------------------------------------------------------
# Codec micro-benchmarks
# ---------------------------------------------------------------------------------------------


def load_codecs(kameo, kameo_err):
    """{name: (encode, decode)} for every codec that imports; plus {name: reason} for the rest."""
    codecs = {"pickle5": (lambda obj: pickle.dumps(obj, protocol=5), pickle.loads)}
    missing = {}
    if kameo is not None:
        codecs["kameo"] = (kameo.encode, kameo.decode)
    else:
        missing["kameo"] = kameo_err
    optional = {
        "ormsgpack": ("packb", "unpackb"),
        "msgpack": ("packb", "unpackb"),
        "orjson": ("dumps", "loads"),
    }
    for name, (enc, dec) in optional.items():
        mod, reason = load_module(name)
        if mod is None:
            missing[name] = reason
            continue
        codecs[name] = (getattr(mod, enc), getattr(mod, dec))
    return codecs, missing


def time_per_op(fn, min_time, repeat):
    """(best, median) seconds per call of fn(); calls per repeat doubled until >= min_time."""
    timer = timeit.Timer(fn)
    number = 1
    while timer.timeit(number) < min_time:
        number *= 2
    runs = [t / number for t in timer.repeat(repeat=repeat, number=number)]
    return min(runs), statistics.median(runs)


def bench_codec(encode, decode, payload, min_time, repeat):
    data = encode(payload)
    if not same(decode(data), payload):
        raise AssertionError("round trip changed the payload")
    enc = time_per_op(lambda: encode(payload), min_time, repeat)
    dec = time_per_op(lambda: decode(data), min_time, repeat)
    rt = time_per_op(lambda: decode(encode(payload)), min_time, repeat)
    return len(data), enc, dec, rt


def unsupported_fields(encode, decode, payload):
    """{key: error} for the payload's values that do not round-trip through encode/decode."""
    out = {}
    for k, v in payload.items():
        try:
            if not same(decode(encode(v)), v):
                out[k] = "round trip changed the value"
        except Exception as exc:
            out[k] = err(exc)
    return out


def emit_codec_summary(pname, results, ref, target_speed, target_text):
    """Speed ratio (ref time / kameo time) for encode+decode, with encode and decode alone."""
    k, r = results.get("kameo"), results.get(ref)
    if k is None or r is None:
        emit(
            pname,
            "summary",
            f"kameo_vs_{ref}_speed",
            None,
            "x",
            target=target_text,
            target_met=None,
            note=f"no result for {'kameo' if k is None else ref}",
        )
        return
    speed = round(r["rt"] / k["rt"], 3)
    emit(
        pname,
        "summary",
        f"kameo_vs_{ref}_speed",
        speed,
        "x",
        time_ratio=round(k["rt"] / r["rt"], 3),
        encode_speed=round(r["enc"] / k["enc"], 3),
        decode_speed=round(r["dec"] / k["dec"], 3),
        target=target_text,
        target_met=None if target_speed is None else speed >= target_speed,
        note=f"encode+decode, best of repeats: {ref} time / kameo time, > 1 means kameo is faster",
    )


def run_codec(kameo, kameo_err, np, sz):
    codecs, missing = load_codecs(kameo, kameo_err)
    emit("codec", "env", "codecs", sorted(codecs), None, missing=missing)
    payloads = dict(PAYLOADS)
    payloads["ext_types"] = ext_payload(np)
    for pname, payload in payloads.items():
        ext = pname == "ext_types"
        results = {}
        for cname, (encode, decode) in codecs.items():
            if ext and cname not in ("kameo", "pickle5"):
                continue
            try:
                size, enc, dec, rt = bench_codec(
                    encode, decode, payload, sz["min_time"], sz["repeat"]
                )
            except Exception as exc:
                if ext and cname == "kameo":
                    emit(
                        pname,
                        cname,
                        "skipped",
                        None,
                        None,
                        error=err(exc),
                        unsupported=unsupported_fields(encode, decode, payload),
                    )
                else:
                    traceback.print_exc(file=sys.stderr)
                    emit(pname, cname, "error", None, None, error=err(exc))
                continue
            results[cname] = {"rt": rt[0], "enc": enc[0], "dec": dec[0]}
            emit(
                pname,
                cname,
                "encode_decode",
                round(rt[0] * 1e9, 1),
                "ns/op",
                encode_ns=round(enc[0] * 1e9, 1),
                decode_ns=round(dec[0] * 1e9, 1),
                encode_decode_median_ns=round(rt[1] * 1e9, 1),
                encode_median_ns=round(enc[1] * 1e9, 1),
                decode_median_ns=round(dec[1] * 1e9, 1),
                size_bytes=size,
                stat="best of repeats",
            )
        if ext:
            emit_codec_summary(pname, results, "pickle5", None, "info")
            continue
        emit_codec_summary(pname, results, "pickle5", 1.5, ">= 1.5 (time ratio <= 0.667)")
        emit_codec_summary(pname, results, "ormsgpack", 1.0, ">= 1.0")


# ---------------------------------------------------------------------------------------------
# W3: large payloads through one worker
# ---------------------------------------------------------------------------------------------

# The raw reference child: echo fixed-size messages back until EOF.
RAW_ECHO_CHILD = """\
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
size = int(sys.argv[2])
buf = bytearray(size)
view = memoryview(buf)
while True:
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            sys.exit(0)
        got += n
    sock.sendall(view)
"""


def throughput_record(workload, impl, samples_ns, nbytes, directions, **extra):
    """GB/s = nbytes * directions / time, best (the value) and median over samples."""
    best, med = min(samples_ns), statistics.median(samples_ns)
    return emit(
        workload,
        impl,
        "throughput",
        round(nbytes * directions / best, 3),  # bytes per ns == GB/s
        "GB/s",
        median_gbps=round(nbytes * directions / med, 3),
        best_ms=round(best / 1e6, 3),
        median_ms=round(med / 1e6, 3),
        n=len(samples_ns),
        payload_bytes=nbytes,
        **extra,
    )


def w3_raw(payload, sz):
    """Round-trip times (ns) of the pure-Python socketpair echo of ``payload``."""
    size = len(payload)
    parent, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = child_sock.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-c", RAW_ECHO_CHILD, str(fd), str(size)], pass_fds=(fd,)
    )
    child_sock.close()
    buf = bytearray(size)
    view = memoryview(buf)

    def roundtrip():
        t0 = clock()
        parent.sendall(payload)
        got = 0
        while got < size:
            n = parent.recv_into(view[got:])
            if not n:
                raise ConnectionError("raw echo child closed the socket")
            got += n
        return clock() - t0

    try:
        for _ in range(sz["w3_warmup"]):
            roundtrip()
        gc.collect()
        samples = [roundtrip() for _ in range(sz["w3_rounds"])]
        if buf != payload:
            raise AssertionError("raw echo changed the payload")
    finally:
        parent.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return samples


def w3_numpy_copy(np, arr, sz):
    """Times (ns) of np.copy(arr)."""
    for _ in range(sz["w3_warmup"]):
        np.copy(arr)
    gc.collect()
    samples = []
    for _ in range(sz["w3_rounds"]):
        t0 = clock()
        np.copy(arr)
        samples.append(clock() - t0)
    return samples


def check_echo(reply, payload):
    if not same(reply, payload):
        raise AssertionError(f"echo changed the payload (got {type(reply).__name__})")


async def w3_kameo_pool(pool, payloads, sz):
    """{payload name: round-trip samples (ns) or the exception} for one started pool."""
    out = {}
    for name, payload in payloads.items():
        try:
            for _ in range(sz["w3_warmup"]):
                check_echo(await pool.ask(payload, timeout=W3_TIMEOUT_S), payload)
            gc.collect()
            samples = []
            for _ in range(sz["w3_rounds"]):
                t0 = clock()
                reply = await pool.ask(payload, timeout=W3_TIMEOUT_S)
                samples.append(clock() - t0)
                check_echo(reply, payload)  # outside the timed region
                del reply
            out[name] = samples
        except Exception as exc:
            out[name] = exc
    return out


def make_pools(kameo):
    """[(impl, pool, note)]: the default pool, plus shm_threshold=None where it exists."""
    pools = [
        (
            "kameo",
            kameo.Pool(W3_TARGET, size=1, max_frame_bytes=MAX_FRAME_BYTES),
            "default settings",
        )
    ]
    try:
        pool = kameo.Pool(W3_TARGET, size=1, max_frame_bytes=MAX_FRAME_BYTES, shm_threshold=None)
    except TypeError as exc:
        reason = f"Pool(shm_threshold=None): {exc}"
        emit("W3", "kameo_shm_off", "skipped", None, None, reason=reason)
    else:
        pools.append(("kameo_shm_off", pool, "shm_threshold=None: payload through the socket"))
    return pools


def run_w3(kameo, kameo_err, np, np_err, sz):
    payloads = {"bytes_16MiB": os.urandom(W3_BYTES)}
    if np is not None:
        arr = np.random.default_rng(0).random(W3_BYTES // 8)  # 2**21 float64
        assert arr.nbytes == W3_BYTES
        payloads["numpy_16MiB"] = arr
    else:
        emit("W3_numpy_16MiB", "all", "skipped", None, None, reason=f"numpy: {np_err}")
    res = {}

    # Raw socket floor (bytes; the numpy workload moves the same number of bytes).
    try:
        samples = w3_raw(payloads["bytes_16MiB"], sz)
        res["raw_socketpair"] = throughput_record(
            "W3_raw_16MiB",
            "raw_socketpair",
            samples,
            W3_BYTES,
            2,
            note="pure-Python socketpair echo between two processes: sendall + recv_into",
        )
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        emit("W3_raw_16MiB", "raw_socketpair", "error", None, None, error=err(exc))

    if np is not None:
        res["numpy.copy"] = throughput_record(
            "W3_numpy_16MiB",
            "numpy.copy",
            w3_numpy_copy(np, payloads["numpy_16MiB"], sz),
            W3_BYTES,
            1,
            note="np.copy(arr) in-process, GB/s = bytes / time",
        )

    if kameo is None:
        for name in payloads:
            emit(f"W3_{name}", "kameo", "skipped", None, None, reason=f"import kameo: {kameo_err}")
        return res

    async def run():
        out = {}
        for impl, pool, note in make_pools(kameo):
            try:
                await asyncio.wait_for(pool.start(), 60)
                out[impl] = (note, await w3_kameo_pool(pool, payloads, sz))
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                out[impl] = (note, dict.fromkeys(payloads, exc))
            finally:
                await pool.close()
        return out

    for impl, (note, per_payload) in asyncio.run(run()).items():
        for name, samples in per_payload.items():
            wl = f"W3_{name}"
            if isinstance(samples, Exception):
                # A value kameo cannot encode (SerializationError is a TypeError): skipped.
                metric = "skipped" if isinstance(samples, TypeError) else "error"
                emit(wl, impl, metric, None, None, error=err(samples), note=note)
                continue
            res[(impl, name)] = throughput_record(
                wl,
                impl,
                samples,
                W3_BYTES,
                2,
                note=f"{note}; 1 worker echo, GB/s = 2 x bytes / round trip",
                max_frame_bytes=MAX_FRAME_BYTES,
            )

    def value(key):
        rec = res.get(key)
        return None if rec is None else rec["value"]

    for name, target in W3_TARGETS.items():
        for impl in ("kameo", "kameo_shm_off"):
            v = value((impl, name))
            if v is None and impl == "kameo_shm_off":
                continue
            emit(
                f"W3_{name}",
                "summary",
                f"{impl}_throughput",
                v,
                "GB/s",
                target=f">= {target} GB/s" if impl == "kameo" else "info",
                target_met=None if v is None or impl != "kameo" else v >= target,
                vs_raw_socketpair=ratio(v, value("raw_socketpair")),
                note="best round trip",
            )
            if name == "numpy_16MiB":
                emit(
                    f"W3_{name}",
                    "summary",
                    f"{impl}/numpy.copy",
                    ratio(v, value("numpy.copy")),
                    "ratio",
                    target="info",
                    note="W3 numpy throughput / numpy.copy throughput (best of each)",
                )
    return res


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s)")
    ap.add_argument("--only", choices=SECTIONS, default=None, help="run one section")
    args = ap.parse_args(argv)
    sz = SIZES["quick" if args.quick else "full"]
    only = (args.only,) if args.only else SECTIONS

    kameo, kameo_err = load_module("kameo")
    np, np_err = load_module("numpy")
    emit_env(
        kameo,
        kameo_error=kameo_err,
        numpy=getattr(np, "__version__", None),
        quick=args.quick,
        only=list(only),
        sizes=sz,
    )
    if kameo is None:
        print(f"bench_codec: kameo not importable ({kameo_err})", file=sys.stderr)

    t_start = time.monotonic()
    if "codec" in only:
        run_codec(kameo, kameo_err, np, sz)
    if "w3" in only:
        run_w3(kameo, kameo_err, np, np_err, sz)
    emit("total", "bench_codec", "wall_time", round(time.monotonic() - t_start, 2), "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
