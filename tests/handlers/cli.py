"""Targets of the command-line tests (tests/test_cli.py): ``kameo map handlers.cli:<name>``."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import enum
import functools
import os
import sys
import time
import uuid
from typing import Any

NOT_CALLABLE = 3


def double(record: dict[str, Any]) -> dict[str, Any]:
    return {"i": record["i"], "y": record["i"] * 2}


def uneven(record: dict[str, Any]) -> dict[str, Any]:
    """Early lines take longer than later ones: answers finish out of input order."""
    i = record["i"]
    time.sleep(0.03 if i % 5 == 0 else 0.0)
    return {"i": i}


def fail_on(record: dict[str, Any]) -> dict[str, Any]:
    """Raises ValueError for a record with ``"fail": true``."""
    if record.get("fail"):
        raise ValueError(f"refused record {record['i']}")
    return {"i": record["i"]}


def unserializable(record: dict[str, Any]) -> Any:
    """A set (JSON cannot encode it) for ``"bad": true``."""
    if record.get("bad"):
        return {1, 2}
    return record


def slow(record: dict[str, Any]) -> dict[str, Any]:
    """Sleeps ``sleep`` seconds (default 0.05); says which worker ran it."""
    time.sleep(record.get("sleep", 0.05))
    return {"i": record["i"], "pid": os.getpid()}


def crash_on(record: dict[str, Any]) -> dict[str, Any]:
    """The worker dies on a record with ``"crash": true``."""
    if record.get("crash"):
        os._exit(7)
    return {"i": record["i"]}


def noisy(record: Any) -> Any:
    """Prints to its stdout and to fd 1 (the worker inherits the command's stdout)."""
    print("noise from print")
    sys.stdout.flush()
    os.write(1, b"noise on fd 1\n")
    return record


async def async_double(record: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"i": record["i"], "y": record["i"] * 2}


def generator(record: Any) -> Any:
    yield record


def same(record: Any) -> Any:
    return record


def json_path(record: Any) -> Any:
    """Which JSON path the worker's ``kameo map`` takes ("orjson" or "stdlib")."""
    from kameo import _jsonl

    return {"path": _jsonl.JSON_PATH}


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 2


@dataclasses.dataclass
class Point:
    x: int = 1


class Tag(str):
    pass


def tricky(record: Any) -> Any:
    """For ``{"k": name}`` a result that orjson and json write differently (or only one of them
    writes at all); anything else comes back as it is."""
    name = record.get("k") if isinstance(record, dict) else None
    if name is None:
        return record
    results: dict[str, Any] = {
        "uuid": uuid.UUID(int=1),
        "enum": Colour.RED,
        "intenum": {"level": Level.HIGH},
        "dataclass": Point(),
        "date": datetime.date(2020, 1, 2),
        "ordered": collections.OrderedDict(b=1, a=2),
        "strsub": [Tag("t")],
        "set": {1},
        "nan": float("nan"),
        "inf": [float("inf"), float("-inf")],
        "floats": [1.5e-05, 1e-07, 2.5e-10, 1e16, 1e22, 0.1, -0.0, 5e-324, 1.7976931348623157e308],
        "bigint": {"n": 2**70, "m": -(2**63) - 1},
        "keys": {1: "a", 2.5: "b", False: "c", None: "d"},
        "tuple": (1, (2, "x"), []),
        "surrogate": "a\ud800b",
        "bytes": b"x",
        "namedtuple": collections.namedtuple("Pair", "a b")(1, 2),
        "deep": functools.reduce(lambda acc, _: [acc], range(300), []),
    }
    return results[name]


_SHARED: dict[str, Any] = {}


def shared(record: dict[str, Any]) -> dict[str, Any]:
    """One dict, changed for each line: ``i``, and ``x`` a float json writes as 1e-05 on odd
    lines (the dict is plain on the last line, not on all)."""
    i = record["i"]
    _SHARED["i"] = i
    _SHARED["x"] = i * 1e-05 if i % 2 else i
    return _SHARED
