#!/usr/bin/env python3
"""Codec comparison: kameo.encode/decode versus pickle protocol 5 and, when importable,
ormsgpack, msgpack and orjson.

Usage::

    python benches/compare_codec.py [--quick]

Payloads: (a) a ~100-byte dict, (b) a list of 1,000 such dicts (sharing their key objects, which
pickle memoizes), (c) the same list with distinct key objects. For each codec and payload the
script prints one JSON line with the encode, decode and encode+decode time per operation (best
of several timeit repeats; the median is given too), then a summary line per payload with the
ratio kameo / pickle (lower is better for kameo).
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import statistics
import sys
import timeit

from _report import emit

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


def load_codecs():
    """{name: (encode, decode)} for every codec that imports; plus {name: reason} for the rest."""
    codecs = {"pickle5": (lambda obj: pickle.dumps(obj, protocol=5), pickle.loads)}
    missing = {}
    try:
        kameo = importlib.import_module("kameo")
        codecs["kameo"] = (kameo.encode, kameo.decode)
    except Exception as exc:
        missing["kameo"] = f"{type(exc).__name__}: {exc}"
    optional = {
        "ormsgpack": ("packb", "unpackb"),
        "msgpack": ("packb", "unpackb"),
        "orjson": ("dumps", "loads"),
    }
    for name, (enc, dec) in optional.items():
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
            continue
        codecs[name] = (getattr(mod, enc), getattr(mod, dec))
    return codecs, missing


def time_per_op(fn, min_time, repeat):
    """(best, median) seconds per call of fn(); number of calls per repeat from autorange."""
    timer = timeit.Timer(fn)
    number = 1
    while True:
        if timer.timeit(number) >= min_time:
            break
        number *= 2
    runs = [t / number for t in timer.repeat(repeat=repeat, number=number)]
    return min(runs), statistics.median(runs)


def bench(encode, decode, payload, min_time, repeat):
    data = encode(payload)
    if decode(data) != payload:
        raise AssertionError("round trip changed the payload")
    enc = time_per_op(lambda: encode(payload), min_time, repeat)
    dec = time_per_op(lambda: decode(data), min_time, repeat)
    rt = time_per_op(lambda: decode(encode(payload)), min_time, repeat)
    return len(data), enc, dec, rt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = ap.parse_args(argv)
    min_time, repeat = (0.02, 3) if args.quick else (0.05, 5)

    codecs, missing = load_codecs()
    emit(
        "env",
        "python",
        "info",
        None,
        None,
        python=sys.version.split()[0],
        codecs=sorted(codecs),
        missing=missing,
        quick=args.quick,
    )
    if "kameo" in missing:
        print(f"compare_codec: kameo not importable ({missing['kameo']})", file=sys.stderr)

    for pname, payload in PAYLOADS.items():
        results = {}
        for cname, (encode, decode) in codecs.items():
            try:
                size, enc, dec, rt = bench(encode, decode, payload, min_time, repeat)
            except Exception as exc:
                emit(pname, cname, "error", None, None, error=f"{type(exc).__name__}: {exc}")
                continue
            results[cname] = rt[0]
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
        kameo_t, pickle_t = results.get("kameo"), results.get("pickle5")
        value = round(kameo_t / pickle_t, 3) if kameo_t and pickle_t else None
        emit(
            pname,
            "summary",
            "kameo/pickle5_encode_decode",
            value,
            "ratio",
            note="time ratio, < 1 means kameo is faster",
            fastest=min(results, key=results.get) if results else None,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
