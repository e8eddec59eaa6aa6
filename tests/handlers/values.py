"""Importable value classes and handlers for the codec and shared-memory tests.

The codec sends Enum members, dataclass and NamedTuple instances by reference to their
class (``handlers.values.Point``), so the classes used by tests/test_codec.py and
tests/test_shm.py live here, where both the test process and the workers can import them.
Importing it registers the subclasses below with kameo.register_type (nothing else happens at
import); numpy is imported lazily.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import os
import time
from datetime import timedelta, tzinfo
from typing import Any, NamedTuple

import kameo

# --------------------------------------------------------------------------- enums


class Color(enum.Enum):
    RED = 1
    GREEN = "green"
    BLUE = (3, "b")


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


class Mode(enum.StrEnum):
    FAST = "fast"
    SAFE = "safe"


# --------------------------------------------------------------------------- dataclasses


@dataclasses.dataclass
class Point:
    x: Any
    y: Any


@dataclasses.dataclass(frozen=True)
class FrozenPoint:
    x: Any
    y: Any


@dataclasses.dataclass(slots=True)
class SlotPoint:
    x: Any
    y: Any


@dataclasses.dataclass
class Line:
    start: Point
    end: Point
    label: str = ""


@dataclasses.dataclass
class Bag:
    items: list[Any] = dataclasses.field(default_factory=list)
    name: str = "bag"


@dataclasses.dataclass
class Order:
    """Carries a field the codec cannot encode, to check error paths through ``.field``."""

    symbol: str
    when: Any


# --------------------------------------------------------------------------- named tuples


class Pair(NamedTuple):
    left: Any
    right: Any


Coord = collections.namedtuple("Coord", ["lat", "lon"])


# --------------------------------------------------------------------------- registered subclasses
# Subclasses of built-ins keep their class only when registered (here at import, so that the
# workers that import this module register them too).


@kameo.register_type
class Tag(str):
    pass


@kameo.register_type
class Count(int):
    pass


@kameo.register_type
class Price(float):
    pass


@kameo.register_type
class Phase(complex):
    pass


@kameo.register_type
class Blob(bytes):
    pass


@kameo.register_type
class Buffer(bytearray):
    pass


@kameo.register_type
class Rows(list):  # type: ignore[type-arg]
    def __init__(self, *args: Any, required: int) -> None:  # never called by the decoder
        super().__init__(*args)
        self.required = required


@kameo.register_type
class Triple(tuple):  # type: ignore[type-arg]
    pass


@kameo.register_type
class Record(dict):  # type: ignore[type-arg]
    pass


@kameo.register_type
class Members(set):  # type: ignore[type-arg]
    pass


@kameo.register_type
class Frozen(frozenset):  # type: ignore[type-arg]
    pass


class Unregistered(str):
    pass


# --------------------------------------------------------------------------- not for the codec


class Foo:
    """A plain picklable class the codec does not know (only the pickle fallback carries it)."""

    def __init__(self, value: Any = 1) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is Foo and other.value == self.value

    def __hash__(self) -> int:
        return hash(("Foo", self.value))

    def __repr__(self) -> str:
        return f"Foo({self.value!r})"


class OddTZ(tzinfo):
    """A custom tzinfo class the codec has no encoding for."""

    def utcoffset(self, dt: Any) -> timedelta:
        return timedelta(hours=1)

    def dst(self, dt: Any) -> timedelta:
        return timedelta(0)

    def tzname(self, dt: Any) -> str:
        return "ODD"


# --------------------------------------------------------------------------- handlers


def hold(msg: dict) -> Any:
    """Receive a (big) value, keep it alive for ``msg["seconds"]``, then answer its size.

    Writes the worker's pid to ``msg["pidfile"]`` (if given) once the value has arrived, so a
    test knows the handler is holding it.
    """
    data = msg["data"]
    pidfile = msg.get("pidfile")
    if pidfile:
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidfile + ".tmp", pidfile)
    time.sleep(msg.get("seconds", 0.0))
    return len(data) if not hasattr(data, "nbytes") else int(data.nbytes)


_kept: dict[str, Any] = {}


def keep(msg: dict) -> Any:
    """``msg["op"]``: "echo" returns ``msg["data"]``, "nbytes" its size, "put" keeps it (and
    answers its size), "get" returns what "put" kept.

    For arrays: "echo_put" keeps ``msg["data"]`` and returns it too; "make" keeps a new
    ``np.arange(msg["n"], dtype=float)`` and returns it; "add" adds ``msg["value"]`` to the kept
    array in place and "sum" returns its sum (the kept array stays kept); "add_echo" adds 1 to
    ``msg["data"]`` in place and returns it, "set_echo" sets ``data[msg["i"]] = msg["value"]``
    and returns it."""
    op = msg["op"]
    if op == "get":
        return _kept.pop("data")
    if op == "make":
        import numpy as np

        _kept["data"] = np.arange(msg["n"], dtype=np.float64)
        return _kept["data"]
    if op == "add":
        _kept["data"] += msg["value"]
        return float(_kept["data"].sum())
    if op == "sum":
        return float(_kept["data"].sum())
    data = msg["data"]
    if op == "echo":
        return data
    if op == "add_echo":
        data += 1
        return data
    if op == "set_echo":
        data[msg["i"]] = msg["value"]
        return data
    if op == "echo_put":
        _kept["data"] = data
        return data
    if op == "put":
        _kept["data"] = data
    return int(data.nbytes)


def make_array(msg: dict) -> Any:
    """Build a fresh numpy array in the worker: ``np.arange(n, dtype=dtype)``."""
    import numpy as np

    return np.arange(msg["n"], dtype=msg.get("dtype", "float64"))


def describe(msg: Any) -> dict:
    """What the worker received: the type's qualified name and, for arrays, their flags."""
    out: dict[str, Any] = {"type": f"{type(msg).__module__}.{type(msg).__qualname__}"}
    flags = getattr(msg, "flags", None)
    if flags is not None:
        out["writeable"] = bool(flags.writeable)
        out["c_contiguous"] = bool(flags.c_contiguous)
        out["f_contiguous"] = bool(flags.f_contiguous)
        out["storage"] = type(storage(msg)).__name__
    return out


def storage(arr: Any) -> Any:
    """What an array's memory finally belongs to (a ShmView, a bytearray, ...)."""
    base = arr
    while getattr(base, "base", None) is not None and type(base).__name__ == "ndarray":
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def return_masked(msg: Any) -> Any:
    """Return a numpy masked array (the codec refuses it unless pickle is allowed)."""
    import numpy as np

    return {"result": [np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])]}


def aliases(msg: dict) -> dict:
    """Whether ``msg["a"]`` and ``msg["b"]`` arrived as one object; then append to ``a`` and
    send both back (one object again, if the codec keeps sharing)."""
    same = msg["a"] is msg["b"]
    msg["a"].append("added")
    return {"same": same, "b": msg["b"], "both": [msg["a"], msg["b"]]}


def return_foo(msg: Any) -> Any:
    """Return an object the codec cannot encode without pickle."""
    return {"wrapped": [Foo(msg)]}


def return_odd_tz(msg: Any) -> Any:
    """Return a datetime whose tzinfo the codec cannot encode."""
    from datetime import datetime

    return {"when": datetime(2024, 1, 1, tzinfo=OddTZ())}
