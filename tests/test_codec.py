"""The extended codec (issue 4): every supported type round-trips to the same type and value,
through ``kameo.encode``/``kameo.decode`` and through real workers; unsupported values fail with
a ``SerializationError`` naming the type and its path; malformed input never crashes the decoder;
pickle is an explicit opt-in on both ends.

Classes the codec sends by reference (Enum, dataclass, NamedTuple) live in
``tests/handlers/values.py`` so that the workers can import them as ``handlers.values.X``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import math
import uuid
import warnings
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import kameo
import pytest
from conftest import BackgroundPool
from handlers.values import (
    Bag,
    Blob,
    Buffer,
    Color,
    Coord,
    Count,
    Frozen,
    FrozenPoint,
    Level,
    Line,
    Members,
    Mode,
    OddTZ,
    Order,
    Pair,
    Perm,
    Phase,
    Point,
    Price,
    Record,
    Rows,
    SlotPoint,
    Tag,
    Triple,
    Unregistered,
)
from handlers.values import Foo as Opaque
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:  # numpy is optional: without it the array parts of the property tests are left out
    import numpy
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover - numpy is installed in the dev venv
    numpy = None  # type: ignore[assignment]
    hnp = None  # type: ignore[assignment]

BASIC = "handlers.basic"
VALUES = "handlers.values"

# --------------------------------------------------------------------------- comparison


def _same_float(got: float, exp: float, where: str) -> None:
    if math.isnan(exp):
        assert math.isnan(got), f"{where}: expected nan, got {got!r}"
    else:
        assert got == exp, f"{where}: got {got!r}, expected {exp!r}"
        assert math.copysign(1.0, got) == math.copysign(1.0, exp), f"{where}: sign of zero lost"


def _same_tz(got: tzinfo | None, exp: tzinfo | None, where: str) -> None:
    assert type(got) is type(exp), f"{where}.tzinfo: {got!r} is not like {exp!r}"
    if exp is None:
        return
    if isinstance(exp, ZoneInfo):
        assert got.key == exp.key, f"{where}.tzinfo: key {got.key!r} != {exp.key!r}"
    elif isinstance(exp, timezone):
        # timezone.__eq__ ignores the name: compare offset and name separately
        assert got.utcoffset(None) == exp.utcoffset(None), f"{where}.tzinfo: offset differs"
        assert got.tzname(None) == exp.tzname(None), f"{where}.tzinfo: name differs"
    else:
        assert got == exp, f"{where}.tzinfo: {got!r} != {exp!r}"


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def same(got: Any, exp: Any, where: str = "value") -> None:
    """Strict recursive equality: the same type at every level (no subclass slack), nan == nan,
    the sign of zero kept, dict order kept, tzinfo kept by offset+name or zone key, fold kept,
    Decimal by its string, Enum members by identity, numpy dtype/shape/bytes/order kept."""
    assert type(got) is type(exp), (
        f"{where}: got {type(got).__qualname__} {got!r:.200}, "
        f"expected {type(exp).__qualname__} {exp!r:.200}"
    )
    if numpy is not None and isinstance(exp, numpy.ndarray):
        assert got.dtype == exp.dtype, f"{where}: dtype {got.dtype} != {exp.dtype}"
        assert got.dtype.str == exp.dtype.str, f"{where}: dtype {got.dtype.str} != {exp.dtype.str}"
        assert got.shape == exp.shape, f"{where}: shape {got.shape} != {exp.shape}"
        assert got.tobytes() == exp.tobytes(), f"{where}: array contents differ"
        if exp.flags.c_contiguous:
            assert got.flags.c_contiguous, f"{where}: C order lost"
        elif exp.flags.f_contiguous:
            assert got.flags.f_contiguous, f"{where}: Fortran order lost"
        else:
            assert got.flags.c_contiguous or got.flags.f_contiguous, f"{where}: not contiguous"
    elif numpy is not None and isinstance(exp, numpy.generic):
        assert got.dtype == exp.dtype, f"{where}: dtype {got.dtype} != {exp.dtype}"
        assert got.tobytes() == exp.tobytes(), f"{where}: {got!r} != {exp!r}"
    elif isinstance(exp, enum.Enum):
        assert got is exp, f"{where}: {got!r} is not the member {exp!r}"
    elif isinstance(exp, float):
        _same_float(got, exp, where)
    elif isinstance(exp, complex):
        _same_float(got.real, exp.real, f"{where}.real")
        _same_float(got.imag, exp.imag, f"{where}.imag")
    elif isinstance(exp, Decimal):
        assert str(got) == str(exp), f"{where}: Decimal {str(got)!r} != {str(exp)!r}"
    elif isinstance(exp, (datetime, time)):
        assert got.replace(tzinfo=None) == exp.replace(tzinfo=None), f"{where}: {got!r} != {exp!r}"
        assert got.fold == exp.fold, f"{where}: fold {got.fold} != {exp.fold}"
        _same_tz(got.tzinfo, exp.tzinfo, where)
    elif dataclasses.is_dataclass(exp):
        for f in dataclasses.fields(exp):
            same(getattr(got, f.name), getattr(exp, f.name), f"{where}.{f.name}")
    elif _is_namedtuple(exp):
        for name in type(exp)._fields:
            same(getattr(got, name), getattr(exp, name), f"{where}.{name}")
    elif isinstance(exp, (list, tuple)):
        assert len(got) == len(exp), f"{where}: length {len(got)} != {len(exp)}"
        for i, (g, e) in enumerate(zip(got, exp, strict=True)):
            same(g, e, f"{where}[{i}]")
    elif isinstance(exp, dict):
        assert len(got) == len(exp), f"{where}: {len(got)} keys != {len(exp)}"
        for i, ((gk, gv), (ek, ev)) in enumerate(zip(got.items(), exp.items(), strict=True)):
            same(gk, ek, f"{where}<key #{i}>")
            same(gv, ev, f"{where}[{ek!r}]")
    elif isinstance(exp, (set, frozenset)):
        assert len(got) == len(exp), f"{where}: {len(got)} members != {len(exp)}"
        left = list(got)
        for e in exp:
            for j, g in enumerate(left):
                try:
                    same(g, e, where)
                except AssertionError:
                    continue
                del left[j]
                break
            else:
                raise AssertionError(f"{where}: member {e!r} missing from {got!r}")
    else:
        assert got == exp, f"{where}: got {got!r}, expected {exp!r}"


def round_trip(value: Any, **kw: Any) -> Any:
    data = kameo.encode(value, **kw)
    assert type(data) is bytes
    return kameo.decode(data, **kw)


# --------------------------------------------------------------------------- samples

# The JSON-like core that the current protocol already carries.
PLAIN = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**63,
    -(2**63) - 1,
    2**64,
    3**200,
    -(7**150),
    0.0,
    -0.0,
    1.5,
    5e-324,
    -1e308,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "héllo wörld",
    "日本語 😀🎉👩‍👩‍👧 \U0010ffff \x00 \ufeff \u200d",
    "".join(chr(c) for c in range(0x20, 0xD800, 97)),
    b"",
    bytes(range(256)),
    [],
    (),
    {},
    [1, "two", 3.0, None, True, b"x"],
    (1, (2, (3, ())), []),
    {"str": 1, 2: "int", (1, "t"): "tuple", None: "none", b"k": "bytes", -5: [1], 2.5: "f"},
    {"z": 1, "a": 2, "m": 3},
]

EXTENDED = [
    # complex
    1 + 2j,
    complex(-0.0, 0.0),
    complex(0.0, -0.0),
    complex(math.nan, math.inf),
    complex(-math.inf, math.nan),
    # bytearray
    bytearray(),
    bytearray(b"\x00mutable\xff"),
    # sets
    set(),
    frozenset(),
    {1, "a", (2, 3), None, b"b", 2.5},
    frozenset({frozenset({1}), frozenset(), "x"}),
    [set(), frozenset(), {frozenset({1, 2})}],
    # datetime and friends
    datetime(2024, 2, 29, 23, 59, 59, 999999),
    datetime(1, 1, 1),
    datetime.max,
    datetime(2024, 1, 1, 12, tzinfo=UTC),
    datetime(2024, 1, 1, 12, 30, 5, 17, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=-3), "BRT")),
    datetime(2024, 7, 14, 9, 0, tzinfo=ZoneInfo("Europe/Paris")),
    datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris")),
    datetime(2024, 10, 27, 2, 30, fold=0, tzinfo=ZoneInfo("Europe/Paris")),
    datetime(2024, 10, 27, 2, 30, fold=1),
    date(2024, 2, 29),
    date.min,
    date.max,
    time(),
    time(23, 59, 59, 999999),
    time(1, 2, 3, 4, tzinfo=UTC),
    time(1, 2, 3, 4, tzinfo=timezone(timedelta(hours=-9, minutes=-30), "X")),
    time(1, 2, fold=1),
    timedelta(),
    timedelta(days=-1, microseconds=1),
    timedelta(seconds=-1),
    timedelta(microseconds=123456),
    timedelta.max,
    timedelta.min,
    # Decimal
    Decimal("0"),
    Decimal("-0"),
    Decimal("-0.000"),
    Decimal("NaN"),
    Decimal("-NaN"),
    Decimal("sNaN"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    Decimal("3.14159265358979323846264338327950288419716939937510"),
    Decimal("-12345678901234567890123456789012345678901234567890"),
    Decimal("1E+400"),
    Decimal("1.500E-700"),
    Decimal("123.4500"),
    # UUID
    uuid.UUID(int=0),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    uuid.UUID(int=2**128 - 1),
    # Enum members
    Color.RED,
    Color.GREEN,
    Color.BLUE,
    Level.HIGH,
    Perm.R,
    Perm.R | Perm.W,
    Perm.R | Perm.W | Perm.X,
    Perm(0),
    Mode.SAFE,
    # dataclasses and named tuples
    Point(1, "y"),
    FrozenPoint(1.5, None),
    SlotPoint([1, 2], {"k": b"v"}),
    Line(Point(0, 0), Point(Decimal("1.5"), -0.0), "diag"),
    Bag([1, Point(2, 3), [Pair(4, 5)]], "nested"),
    Bag(),
    Pair("l", [Coord(1.0, 2.0)]),
    Coord(lat=-33.9, lon=Color.RED),
    # dict keys of every hashable kind, insertion order kept
    {
        3: "int",
        "s": "str",
        (1, (2,)): "tuple",
        frozenset({1, 2}): "frozenset",
        None: "none",
        b"b": "bytes",
        datetime(2024, 1, 1, tzinfo=UTC): "datetime",
        date(2024, 1, 2): "date",
        Color.GREEN: "enum",
        Level.LOW: "intenum",
        uuid.UUID(int=7): "uuid",
        Decimal("2.50"): "decimal",
        1 + 1j: "complex",
        FrozenPoint(1, 2): "frozen dataclass",
        Pair(1, "x"): "namedtuple",
        timedelta(days=2): "timedelta",
    },
    # everything nested together
    {
        "orders": [
            Order("AAPL", datetime(2024, 3, 1, 9, 30, tzinfo=ZoneInfo("America/New_York"))),
            Order("MSFT", date(2024, 3, 2)),
        ],
        "tags": {"a", "b"},
        "px": [Decimal("101.25"), 1 - 1j, bytearray(b"raw")],
        "mode": Mode.FAST,
    },
]

SAMPLE_IDS = [f"{type(v).__name__}:{v!r:.50}" for v in PLAIN + EXTENDED]


@pytest.mark.parametrize("value", PLAIN + EXTENDED, ids=SAMPLE_IDS)
def test_encode_decode_round_trip(value):
    same(round_trip(value), value)


@pytest.mark.parametrize("value", PLAIN + EXTENDED, ids=SAMPLE_IDS)
def test_encoding_is_deterministic_and_self_delimiting(value):
    """Every proper prefix and any trailing byte are refused with SerializationError."""
    data = kameo.encode(value)
    assert kameo.encode(value) == data
    for cut in sorted({*range(min(len(data), 40)), *range(max(0, len(data) - 40), len(data))}):
        with pytest.raises(kameo.SerializationError):
            kameo.decode(data[:cut])
    with pytest.raises(kameo.SerializationError):
        kameo.decode(data + b"\x00")


# --------------------------------------------------------------------------- background pools


@pytest.fixture(scope="module", params=["echo", "aecho"])
def echo_pool(request):
    bp = BackgroundPool(f"{BASIC}:{request.param}")
    try:
        yield bp
    finally:
        bp.close()


@pytest.fixture(scope="module")
def sync_echo_pool():
    bp = BackgroundPool(f"{BASIC}:echo")
    try:
        yield bp
    finally:
        bp.close()


@pytest.mark.parametrize("value", PLAIN + EXTENDED, ids=SAMPLE_IDS)
def test_pool_echo_round_trip(echo_pool, value):
    same(echo_pool.ask(value), value)


def test_worker_sees_the_same_types():
    """The worker side decodes to the same types too (not just the parent after a round trip)."""
    bp = BackgroundPool(f"{VALUES}:describe")
    try:
        cases = [
            (Point(1, 2), "handlers.values.Point"),
            (Color.RED, "handlers.values.Color"),
            (Pair(1, 2), "handlers.values.Pair"),
            (Decimal("1.5"), "decimal.Decimal"),
            (datetime(2024, 1, 1), "datetime.datetime"),
            ({1, 2}, "builtins.set"),
            (bytearray(b"x"), "builtins.bytearray"),
            (memoryview(b"abc"), "builtins.bytes"),
        ]
        for value, qualname in cases:
            assert bp.ask(value)["type"] == qualname, value
    finally:
        bp.close()


# --------------------------------------------------------------------------- specific rules


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (memoryview(b"abc"), b"abc"),
        (memoryview(b""), b""),
        (memoryview(bytearray(b"xyz")), b"xyz"),
        (memoryview(b"abcdef")[::2], b"ace"),
        (memoryview(b"abcdef")[::-1], b"fedcba"),
        (memoryview(b"0123456789")[2:5], b"234"),
    ],
    ids=["bytes", "empty", "bytearray", "step2", "reversed", "slice"],
)
def test_memoryview_arrives_as_bytes(sync_echo_pool, view, expected):
    same(round_trip(view), expected)
    same(round_trip({"mv": [view]}), {"mv": [expected]})
    same(sync_echo_pool.ask(view), expected)


class MyInt(int):
    pass


class MyStr(str):
    pass


class MyList(list):
    pass


class MyDict(dict):
    pass


def test_builtin_subclasses_arrive_as_base_type(sync_echo_pool):
    value = [MyInt(5), MyStr("s"), MyList([MyInt(1), 2]), MyDict({MyStr("k"): MyList()})]
    expected = [5, "s", [1, 2], {"k": []}]
    same(round_trip(value), expected)
    same(sync_echo_pool.ask(value), expected)


# Instances of subclasses registered with kameo.register_type (in handlers.values, which the
# workers import too), nested in each other.
REGISTERED = [
    Tag("t"),
    Count(-3),
    Count(2**70),
    Price(-0.0),
    Phase(1 - 2j),
    Blob(b"\x00b"),
    Buffer(b"buf"),
    Rows([1, Tag("x"), Rows([], required=0)], required=2),
    Triple((1, Count(2))),
    Record({Tag("k"): Record(), "n": [Count(1)]}),
    Members({1, Tag("m")}),
    Frozen({Frozen(), 2}),
]


@pytest.mark.parametrize("value", REGISTERED, ids=lambda v: type(v).__name__)
def test_registered_subclasses_keep_their_class(sync_echo_pool, value):
    same(round_trip(value), value)
    same(sync_echo_pool.ask(value), value)


def test_registered_subclass_carries_its_value_only():
    """Made by the base type: the class's __init__ does not run, instance attributes stay
    behind; an unregistered subclass still arrives as its base."""
    got = round_trip([Rows([1], required=5), Unregistered("u")])
    assert type(got[0]) is Rows and got[0] == [1]
    assert not hasattr(got[0], "required")
    assert type(got[1]) is str


def _wire_str(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 128
    return bytes([len(b)]) + b


def _subclass_bytes(qualname: str, value: Any) -> bytes:
    return b"\x1c" + _wire_str("handlers.values") + _wire_str(qualname) + kameo.encode(value)


def test_decoder_builds_only_registered_classes():
    assert type(kameo.decode(_subclass_bytes("Tag", "t"))) is Tag
    for qualname, value, why in [
        ("Unregistered", "u", "is not a class registered with kameo.register_type"),
        ("Point", "p", "is not a class registered with kameo.register_type"),
        ("Nothing", "x", "has no class Nothing"),
        ("Tag", 5, "derives from str, the value is of type int"),
        ("Rows", (1, 2), "derives from list, the value is of type tuple"),
        ("Tag", None, "cannot decode"),
    ]:
        with pytest.raises(kameo.SerializationError, match=why):
            kameo.decode(_subclass_bytes(qualname, value))


def test_register_type_refuses_what_it_cannot_carry():
    assert kameo.register_type(Tag) is Tag  # again: no change

    class Local(str):
        pass

    @dataclasses.dataclass
    class DataDict(dict):  # type: ignore[type-arg]
        x: int = 0

    for cls, exc, why in [
        (str, TypeError, "built-in type"),
        (bool, TypeError, "built-in type"),
        (5, TypeError, "takes a class"),
        (Opaque, TypeError, "subclasses of str, int"),
        (Level, TypeError, "enum members"),
        (Point, TypeError, "subclasses of str, int"),
        (DataDict, TypeError, "dataclass"),
        (Pair, TypeError, "NamedTuple"),
        (Local, ValueError, "inside a function"),
    ]:
        with pytest.raises(exc, match=why):
            kameo.register_type(cls)  # type: ignore[type-var]


def test_records_with_near_identical_keys():
    """Records whose keys and str values at the same position differ only a little (the
    decoder reuses the previous record's str objects when they match byte for byte)."""
    long = "k" * 40
    records = [
        {"id": 1, "qty": 2, "a": 3},
        {"id": 1, "qtz": 2, "b": 3},
        {"ie": 1, "qty": 2, "a": 3, "extra": 4},
        {"qty": 2, "id": 1},
        {"id": 1, 5: "five", "a": 3},
        {"id": 1, "qty\u00e9": 2, "a": 3},
        {"id": 1, "q": 2, "": 3},
        {long: 1, long[:-1] + "j": 2},
        {long: 1, long[:-1] + "j": 2},
        {"id": {"id": 1, "x": [{"id": 2, "y": 3}, {"id": 2, "z": 3}]}},
        {"id": 1, "qty": 2, "a": 3},
        {},
        {"id": Tag("id"), Tag("qty"): 2},
        {"s": "AAPL", "side": "buy"},
        {"s": "AAPM", "side": "buy"},
        {"s": "AAPL", "side": "bu"},
        {"s": 5, "side": b"buy"},
        {"s": "AAPL", "side": "s\u00e9ll"},
        {"s": Tag("AAPL"), "side": "buy"},
        {"s": "AAPL", "side": "buy"},
    ]
    got = round_trip(records)
    same(got, records)
    assert [list(r) for r in got] == [list(r) for r in records]


def test_intenum_is_not_encoded_as_int(sync_echo_pool):
    value = {Level.LOW: Level.HIGH, "l": [Level.LOW, 1]}
    for got in (round_trip(value), sync_echo_pool.ask(value)):
        (key,) = [k for k in got if k != "l"]
        assert key is Level.LOW
        assert got[Level.LOW] is Level.HIGH
        assert got["l"][0] is Level.LOW
        assert type(got["l"][1]) is int


def test_enum_members_arrive_identical(sync_echo_pool):
    members = [Color.RED, Color.BLUE, Level.LOW, Perm.W, Perm.R | Perm.X, Mode.FAST, Mode.SAFE]
    for got in (round_trip(members), sync_echo_pool.ask(members)):
        assert all(g is m for g, m in zip(got, members, strict=True)), got
    assert isinstance(round_trip(Mode.FAST), str)


def test_timezones_keep_their_identity(sync_echo_pool):
    brt = datetime(2024, 5, 1, 8, tzinfo=timezone(timedelta(hours=-3), "BRT"))
    paris = datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Paris"))
    utc = datetime(2024, 5, 1, tzinfo=UTC)
    for got in (round_trip([brt, paris, utc]), sync_echo_pool.ask([brt, paris, utc])):
        assert got[0].tzname() == "BRT"
        assert got[0].utcoffset() == timedelta(hours=-3)
        assert got[1].tzinfo.key == "Europe/Paris"
        assert got[1].fold == 1
        assert got[1].utcoffset() == timedelta(hours=1)  # the second 02:30: CET again
        assert got[2].tzinfo == UTC and got[2].tzname() == "UTC"


def test_dataclass_kinds(sync_echo_pool):
    fp = FrozenPoint(1, (2, 3))
    sp = SlotPoint(Decimal("-0"), [])
    line = Line(Point(1, 2), Point(3, [4]))
    for got in (round_trip([fp, sp, line]), sync_echo_pool.ask([fp, sp, line])):
        same(got, [fp, sp, line])
        with pytest.raises(dataclasses.FrozenInstanceError):
            got[0].x = 5  # type: ignore[misc]
        assert not hasattr(got[1], "__dict__")
        got[2].end.y.append(5)  # a real, mutable list inside a real dataclass
        assert got[2].end.y == [4, 5]


# --------------------------------------------------------------------------- numpy

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "U5",
    "S3",
    "datetime64[ns]",
    "timedelta64[s]",
    "structured",
]
SHAPES = [(), (0,), (5,), (3, 4), (2, 3, 4)]


def make_array(np: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    """Deterministic contents that exercise each dtype's edge values."""
    n = math.prod(shape)
    i = np.arange(n)
    if dtype == "structured":
        a = np.zeros(n, dtype=[("x", "<f8"), ("n", "<i4")])
        a["x"] = i * 1.5 - 2
        a["n"] = i - 3
    elif dtype == "bool":
        a = i % 3 == 0
    elif dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        a = (i * 37 % 200).astype(dtype)
        if dtype.startswith("int"):
            a = (a.astype("int64") - 100).astype(dtype)
        if n >= 2:
            a[0], a[-1] = info.min, info.max
    elif dtype.startswith("float"):
        a = (i * 0.5 - 1.25).astype(dtype)
        for k, special in enumerate([np.nan, np.inf, -np.inf, -0.0]):
            if k < n:
                a[k] = special
    elif dtype.startswith("complex"):
        a = (i * 0.5 - 1j * i).astype(dtype)
        if n >= 2:
            a[0], a[1] = complex(np.nan, -0.0), complex(-np.inf, 1)
    elif dtype == "U5":
        a = np.array([("ä😀" + str(k))[:5] for k in range(n)], dtype="U5")
    elif dtype == "S3":
        a = np.array([bytes([65 + k % 26, 0, 255])[: 1 + k % 3] for k in range(n)], dtype="S3")
    elif dtype == "datetime64[ns]":
        a = np.datetime64("2024-01-01T00:00:00", "ns") + i * np.timedelta64(1_000_000_007, "ns")
        if n >= 2:
            a[1] = np.datetime64("NaT")
    elif dtype == "timedelta64[s]":
        a = (i - 3).astype("timedelta64[s]")
    else:  # pragma: no cover
        raise AssertionError(dtype)
    return a.reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_array_round_trip(dtype, shape):
    np = pytest.importorskip("numpy")
    a = make_array(np, dtype, shape)
    got = round_trip(a)
    same(got, a)
    assert got.flags.writeable


async def test_numpy_arrays_through_workers():
    np = pytest.importorskip("numpy")
    arrays = [make_array(np, d, s) for d in DTYPES for s in SHAPES]
    async with kameo.Pool(f"{BASIC}:echo", size=2) as pool:
        replies = await asyncio.gather(*(pool.ask(a, timeout=10.0) for a in arrays))
    for got, a in zip(replies, arrays, strict=True):
        same(got, a, f"reply<{a.dtype}{a.shape}>")


def test_numpy_memory_order():
    np = pytest.importorskip("numpy")
    base = np.arange(30, dtype=np.float64).reshape(6, 5)
    f = np.asfortranarray(base)
    assert f.flags.f_contiguous and not f.flags.c_contiguous
    got = round_trip(f)
    same(got, f)
    assert got.flags.f_contiguous and not got.flags.c_contiguous

    f3 = np.asfortranarray(np.arange(24, dtype=np.int32).reshape(2, 3, 4))
    got3 = round_trip(f3)
    same(got3, f3)
    assert got3.flags.f_contiguous

    for view in (base[::2, 1:], base[:, ::-1], base.T[1:, ::3], base[1:3]):
        got = round_trip(view)
        same(got, view)
        assert got.flags.c_contiguous or got.flags.f_contiguous
        assert np.array_equal(got, view)


async def test_numpy_views_through_worker():
    np = pytest.importorskip("numpy")
    base = np.arange(60, dtype=np.int64).reshape(6, 10)
    values = [base[::2, 1:], np.asfortranarray(base), base.T, base[:, 3]]
    async with kameo.Pool(f"{BASIC}:aecho", size=1) as pool:
        for v in values:
            got = await pool.ask(v, timeout=10.0)
            same(got, v)


def test_decoded_array_is_writable_and_owns_its_data():
    np = pytest.importorskip("numpy")
    a = np.arange(100, dtype=np.float64).reshape(10, 10)
    data = kameo.encode(a)
    copy_of_data = bytes(data)
    got = kameo.decode(data)
    assert got.flags.writeable
    got[...] = -1.0
    assert data == copy_of_data, "writing to the decoded array changed the encoded bytes"
    assert a[3, 3] == 33.0


def test_numpy_scalars():
    np = pytest.importorskip("numpy")
    scalars = [
        np.float32(1.5),
        np.float32(np.nan),
        np.float16(-0.0),
        np.int64(-(2**63)),
        np.int8(-5),
        np.uint64(2**64 - 1),
        np.uint8(255),
        np.bool_(True),
        np.bool_(False),
        np.complex64(1 - 2j),
        np.datetime64("2024-01-01"),
        np.datetime64("2024-01-01T12:00:00.123456789", "ns"),
        np.timedelta64(-5, "s"),
    ]
    for s in scalars:
        same(round_trip(s), s, f"value<{s.dtype}>")
    same(round_trip({"xs": scalars}), {"xs": scalars})


async def test_numpy_scalars_through_worker():
    np = pytest.importorskip("numpy")
    scalars = [np.float32(1.5), np.int64(7), np.bool_(True), np.complex64(1j)]
    scalars.append(np.datetime64("2024-01-01"))
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        same(await pool.ask(scalars, timeout=10.0), scalars)


async def test_numpy_object_dtype_is_refused():
    np = pytest.importorskip("numpy")
    obj = np.array([1, "a", None], dtype=object)
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.encode({"arr": obj})
    assert_path(str(ei.value), "value", ["arr"])
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        with pytest.raises(kameo.SerializationError):
            await pool.ask([obj], timeout=10.0)
        assert await pool.ask("after", timeout=10.0) == "after"


if numpy is not None:

    class Tagged(numpy.ndarray):  # type: ignore[type-arg]
        """A user's ndarray subclass (its attributes and methods would not travel)."""


def _ndarray_subclasses(np: Any) -> list[tuple[Any, str, str]]:
    """(value, type text in the message, what the message says to do) for ndarray subclasses
    the codec cannot send exactly: the mask, matrix algebra, record fields, string methods
    or a subclass's own attributes would be lost."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        matrix = np.matrix([[1, 2], [3, 4]])
    return [
        (np.ma.masked_array([1.0, 2.0, 3.0], mask=[0, 1, 0]), "MaskedArray", ".mask"),
        (np.ma.masked_array(np.ones((2, 3)), mask=False), "MaskedArray", ".mask"),
        (np.ma.masked, "MaskedConstant", ".mask"),
        (matrix, "numpy.matrix", "numpy.asarray"),
        (np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]), "recarray", "numpy.asarray"),
        (np.char.array(["a", "bc"]), "chararray", "numpy.asarray"),
        (np.arange(4.0).view(Tagged), "Tagged", "numpy.asarray"),
    ]


def test_numpy_subclasses_are_refused_with_what_to_do():
    np = pytest.importorskip("numpy")
    for value, type_text, todo in _ndarray_subclasses(np):
        with pytest.raises(kameo.SerializationError) as ei:
            kameo.encode({"x": [1, value]})
        msg = str(ei.value)
        assert_path(msg, "value", ["x", Idx(1)])
        assert f"cannot encode {type(value).__module__}." in msg, msg
        assert type_text in msg and todo in msg and "allow_pickle=True" in msg, msg
        assert "reshape" not in msg, msg
        # Pickle, when allowed, carries them exactly.
        got = kameo.decode(kameo.encode(value, allow_pickle=True), allow_pickle=True)
        assert type(got) is type(value)
        if isinstance(value, np.ma.MaskedArray) and value is not np.ma.masked:
            assert np.array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(value))
            assert np.array_equal(got.data, value.data)


def test_numpy_exact_arrays_still_travel(tmp_path):
    """ndarray itself and np.memmap (only where its memory lives differs) arrive as ndarray."""
    np = pytest.importorskip("numpy")
    mm = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(3, 4))
    mm[:] = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = round_trip(mm)
    same(got, np.asarray(mm))
    masked = np.ma.masked_array([1.0, 2.0], mask=[0, 1])
    same(round_trip([masked.data, np.ma.getmaskarray(masked)]), [masked.data, masked.mask])


async def test_numpy_subclass_through_pool_is_refused_and_nothing_is_lost():
    np = pytest.importorskip("numpy")
    cases = _ndarray_subclasses(np)
    async with kameo.Pool(f"{BASIC}:aecho", size=1) as pool:
        pid = pool.workers[0].pid
        for value, type_text, todo in cases:
            others = [asyncio.ensure_future(pool.ask(i, timeout=10.0)) for i in range(5)]
            with pytest.raises(kameo.SerializationError) as ei:
                await pool.ask({"data": value}, timeout=10.0)
            msg = str(ei.value)
            assert_path(msg, "message", ["data"])
            assert type_text in msg and todo in msg and "allow_pickle=True" in msg, msg
            assert await asyncio.gather(*others) == list(range(5))
        assert pool.workers[0].pid == pid, "a refused message must not cost a worker"
    async with kameo.Pool(f"{VALUES}:return_masked", size=1) as pool:
        pid = pool.workers[0].pid
        with pytest.raises(kameo.SerializationError) as ei:
            await pool.ask(1, timeout=10.0)
        msg = str(ei.value)
        assert_path(msg, "reply", ["result", Idx(0)])
        assert "MaskedArray" in msg and ".mask" in msg, msg
        with pytest.raises(kameo.SerializationError):
            await pool.ask(2, timeout=10.0)
        assert pool.workers[0].pid == pid
    async with kameo.Pool(f"{VALUES}:return_masked", size=1, allow_pickle=True) as pool:
        got = (await pool.ask(1, timeout=10.0))["result"][0]
        assert type(got) is np.ma.MaskedArray and got.mask.tolist() == [False, True, False]


# --------------------------------------------------------------------------- errors


def path_variants(root: str, parts: list[Any]) -> list[str]:
    """The path text for ``parts`` (dict keys, ``int`` indices, or ``.field`` strings):
    ``[repr(key)]`` for keys; str keys are also accepted with double quotes."""
    variants = [root]
    for p in parts:
        if isinstance(p, Idx):
            variants = [v + f"[{p.i}]" for v in variants]
        elif isinstance(p, str) and p.startswith("."):
            variants = [v + p for v in variants]
        elif isinstance(p, str):
            variants = [v + f"[{p!r}]" for v in variants] + [v + f'["{p}"]' for v in variants]
        else:
            variants = [v + f"[{p!r}]" for v in variants]
    return variants


class Idx(NamedTuple):
    i: int


def assert_path(msg: str, root: str, parts: list[Any]) -> None:
    variants = path_variants(root, parts)
    assert any(v in msg for v in variants), f"none of {variants} in {msg!r}"


class NotMine:
    pass


ERROR_CASES = [
    # (value, path parts, text naming the type)
    ({"a": [1, object()]}, ["a", Idx(1)], "object"),
    ([1, (2, {"k": object()})], [Idx(1), Idx(1), "k"], "object"),
    ({5: object()}, [5], "object"),
    ({(1, "a"): [None, object()]}, [(1, "a"), Idx(1)], "object"),
    ({"orders": [0, 1, 2, Order("AAPL", Opaque())]}, ["orders", Idx(3), ".when"], "Foo"),
    ([Pair(1, NotMine())], [Idx(0), ".right"], "NotMine"),
    ({"line": Line(Point(0, 0), Point(1, object()))}, ["line", ".end", ".y"], "object"),
    ({"b": Bag([1, 2, [lambda: 0]])}, ["b", ".items", Idx(2), Idx(0)], "function"),
    ([Coord(0, Opaque())], [Idx(0), ".lon"], "Foo"),
]


@pytest.mark.parametrize(
    ("value", "parts", "type_text"),
    ERROR_CASES,
    ids=[str(i) for i in range(len(ERROR_CASES))],
)
def test_encode_error_names_type_and_path(value, parts, type_text):
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.encode(value)
    assert isinstance(ei.value, TypeError)
    msg = str(ei.value)
    assert_path(msg, "value", parts)
    assert "cannot encode object of type" in msg, msg
    assert type_text in msg, msg


def test_error_names_the_qualified_class():
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.encode({"orders": [0, 1, 2, Order("AAPL", Opaque())]})
    msg = str(ei.value)
    assert "cannot encode object of type handlers.values.Foo" in msg, msg
    assert_path(msg, "value", ["orders", Idx(3), ".when"])


async def test_pool_ask_error_paths_and_pool_survives():
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        pid = pool.workers[0].pid
        for value, parts, type_text in ERROR_CASES:
            with pytest.raises(kameo.SerializationError) as ei:
                await pool.ask(value, timeout=10.0)
            msg = str(ei.value)
            assert_path(msg, "message", parts)
            assert type_text in msg, msg
            assert await pool.ask("ok", timeout=10.0) == "ok"
        assert pool.workers[0].pid == pid, "a refused message must not cost a worker"


async def test_unencodable_reply_names_reply_root():
    async with kameo.Pool(f"{VALUES}:return_foo", size=1) as pool:
        with pytest.raises(kameo.SerializationError) as ei:
            await pool.ask(1, timeout=10.0)
        msg = str(ei.value)
        assert_path(msg, "reply", ["wrapped", Idx(0)])
        assert "handlers.values.Foo" in msg, msg
        with pytest.raises(kameo.SerializationError):
            await pool.ask(2, timeout=10.0)  # still answering, still refusing
    async with kameo.Pool(f"{VALUES}:return_odd_tz", size=1) as pool:
        with pytest.raises(kameo.SerializationError) as ei:
            await pool.ask(None, timeout=10.0)
        assert "reply" in str(ei.value) and "OddTZ" in str(ei.value), str(ei.value)
        with pytest.raises(kameo.SerializationError):
            await pool.ask(None, timeout=10.0)


def test_local_classes_are_not_importable():
    @dataclasses.dataclass
    class LocalPoint:
        x: int

    class LocalEnum(enum.Enum):
        A = 1

    class LocalPair(NamedTuple):
        a: int
        b: int

    for value, name in [
        (LocalPoint(1), "LocalPoint"),
        ([LocalEnum.A], "LocalEnum"),
        ({"p": LocalPair(1, 2)}, "LocalPair"),
    ]:
        with pytest.raises(kameo.SerializationError) as ei:
            kameo.encode(value)
        msg = str(ei.value)
        assert name in msg, msg
        assert "importable" in msg, msg


def test_lambda_and_object_are_refused():
    for value, type_text in [
        (lambda x: x, "function"),
        (object(), "object"),
        (NotMine(), "NotMine"),
    ]:
        with pytest.raises(kameo.SerializationError) as ei:
            kameo.encode(value)
        assert type_text in str(ei.value)
        assert str(ei.value).startswith("value"), str(ei.value)


def test_lone_surrogate_is_refused():
    for value, parts in [("\ud800", []), (["ok", "a\udfffb"], [Idx(1)]), ({"\ud800": 1}, [])]:
        with pytest.raises(kameo.SerializationError) as ei:
            kameo.encode(value)
        msg = str(ei.value)
        assert "surrogate" in msg, msg
        assert_path(msg, "value", parts)


def test_unsupported_tzinfo_is_refused():
    for value in [datetime(2024, 1, 1, tzinfo=OddTZ()), [time(1, tzinfo=OddTZ())]]:
        with pytest.raises(kameo.SerializationError) as ei:
            kameo.encode(value)
        assert "OddTZ" in str(ei.value), str(ei.value)


def test_shared_lists_and_dicts_stay_shared():
    """A list or dict held twice arrives as one object held twice (as with pickle)."""
    x = [1, 2]
    d = {"k": 1}
    value = {"a": x, "b": x, "t": (x, d), "d": [d, d], "n": [[1], [1]]}
    got = round_trip(value)
    same(got, value)
    assert got["a"] is got["b"] is got["t"][0]
    assert got["d"][0] is got["d"][1] is got["t"][1]
    assert got["n"][0] is not got["n"][1]  # equal, but two objects: stay two
    got["a"].append(3)
    assert got["t"][0] == [1, 2, 3]
    # One copy on the wire: 1,000 records sharing a list of 100 strs.
    tags = [f"tag{i}" for i in range(100)]
    shared = [{"id": i, "tags": tags} for i in range(1000)]
    own = [{"id": i, "tags": list(tags)} for i in range(1000)]
    assert len(kameo.encode(shared)) * 10 < len(kameo.encode(own))
    got = kameo.decode(kameo.encode(shared))
    assert got == shared and all(r["tags"] is got[0]["tags"] for r in got)
    assert all(r["tags"] is not got[0]["tags"] for r in kameo.decode(kameo.encode(own))[1:])


def test_shared_references_are_checked():
    # 0x08 list, 0x1D shared, 0x1E reference to shared index n, 0x00 None
    for bad in (
        b"\x1e\x00",  # a reference with nothing shared
        b"\x1d\x08\x01\x1e\x00",  # a list referring to itself: a cycle
        b"\x08\x02\x1d\x08\x00\x1e\x01",  # index 1 of one shared value
        b"\x1d\x00",  # only lists and dicts are shared
        b"\x1d\x1d\x08\x00",
        b"\x1d",
    ):
        with pytest.raises(kameo.SerializationError):
            kameo.decode(bad)
    got = kameo.decode(b"\x08\x02\x1d\x08\x00\x1e\x00")
    assert got == [[], []] and got[0] is got[1]


def test_worker_keeps_shared_values_shared():
    bp = BackgroundPool(f"{VALUES}:aliases")
    try:
        x = [1]
        got = bp.ask({"a": x, "b": x})
        assert got["same"] is True
        assert got["b"] == [1, "added"]
        assert got["both"][0] is got["both"][1]
    finally:
        bp.close()


def test_reference_cycles_are_refused():
    a: list[Any] = []
    a.append(a)
    d: dict[str, Any] = {}
    d["self"] = [d]
    p = Point(1, None)
    p.y = [p]
    for value in (a, d, p):
        with pytest.raises(kameo.SerializationError) as ei:
            kameo.encode(value)
        msg = str(ei.value)
        assert "cycle" in msg or "deeper than" in msg, msg[-300:]


def nested(depth: int) -> Any:
    v: Any = "leaf"
    for k in range(depth):
        v = [v] if k % 2 else {"k": v}
    return v


def test_nesting_limits():
    same(round_trip(nested(400)), nested(400))
    with pytest.raises(kameo.SerializationError):
        kameo.encode(nested(1000))
    # a hand-made 1000-deep list on the wire (tag 0x08 = list, varint 1 = one element)
    with pytest.raises(kameo.SerializationError):
        kameo.decode(b"\x08\x01" * 1000 + b"\x00")


async def test_errors_through_pool_leave_it_working():
    a: list[Any] = []
    a.append(a)
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        pid = pool.workers[0].pid
        same(await pool.ask(nested(400), timeout=10.0), nested(400))
        for bad in (nested(1000), a, "\ud800", lambda: 1, {"t": datetime.now(OddTZ())}):
            with pytest.raises(kameo.SerializationError):
                await pool.ask(bad, timeout=10.0)
            assert await pool.ask("next", timeout=10.0) == "next"
        assert pool.workers[0].pid == pid


# --------------------------------------------------------------------------- pickle opt-in


def test_pickle_fallback_is_opt_in():
    value = {"x": [Opaque(7)], "n": 1}
    with pytest.raises(kameo.SerializationError):
        kameo.encode(value)
    data = kameo.encode(value, allow_pickle=True)
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.decode(data)
    assert "allow_pickle" in str(ei.value), str(ei.value)
    got = kameo.decode(data, allow_pickle=True)
    assert got == value
    assert type(got["x"][0]) is Opaque


def test_pickle_is_not_used_for_known_types():
    """Data without unknown objects decodes without allow_pickle even if encoded with it."""
    value = [Point(1, 2), Color.RED, {1, 2}, Decimal("1.1"), datetime(2024, 1, 1)]
    same(kameo.decode(kameo.encode(value, allow_pickle=True)), value)


def test_pickle_failure_is_a_serialization_error():
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.encode({"f": lambda: 0}, allow_pickle=True)
    assert_path(str(ei.value), "value", ["f"])


async def test_pool_with_pickle():
    async with kameo.Pool(f"{BASIC}:echo", size=1, allow_pickle=True) as pool:
        got = await pool.ask({"o": Opaque([1, 2])}, timeout=10.0)
        assert got == {"o": Opaque([1, 2])}
        assert type(got["o"]) is Opaque
    async with kameo.Pool(f"{BASIC}:aecho", size=1, allow_pickle=True) as pool:
        assert await pool.ask(Opaque("a"), timeout=10.0) == Opaque("a")


async def test_default_pool_refuses_pickle():
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        with pytest.raises(kameo.SerializationError) as ei:
            await pool.ask({"o": Opaque()}, timeout=10.0)
        assert_path(str(ei.value), "message", ["o"])
        assert await pool.ask("fine", timeout=10.0) == "fine"
    async with kameo.Pool(f"{VALUES}:return_foo", size=1, allow_pickle=True) as pool:
        got = await pool.ask(3, timeout=10.0)
        assert got == {"wrapped": [Opaque(3)]}


# --------------------------------------------------------------------------- malformed input


def test_decode_rejects_garbage():
    bad = [b"", b"\xff", b"\x08\x05\x00", b"\x06\x03ab", b"\x06\x02\xff\xfe", b"\x00\x00"]
    bad += [b"\x08" + b"\xff" * 10 + b"\x01", b"\x07\xff\xff\xff\xff\xff\xff\xff\xff\x7f"]
    bad += [bytes([tag]) for tag in range(0x0B, 0x40)]  # every new tag with no payload
    bad += [bytes([tag]) + b"\x80" * 11 for tag in range(0x0B, 0x40)]  # overlong varint
    bad += [bytes([tag]) + b"\xff" * 17 for tag in range(0x0B, 0x40)]  # nothing fits 17 x 0xff
    for data in bad:
        with pytest.raises(kameo.SerializationError):
            kameo.decode(data)


def test_decode_checks_the_class_kind():
    """A dataclass reference naming a class that is not a dataclass is refused, not built."""
    data = kameo.encode(Point(1, 2))
    if data.count(b"Point") != 1:
        pytest.skip("the encoding does not carry the class name verbatim")
    forged = data.replace(b"Point", b"OddTZ")  # same length: no length prefix changes
    with pytest.raises(kameo.SerializationError):
        kameo.decode(forged)
    data = kameo.encode(Color.RED)
    if data.count(b"Color") == 1:
        with pytest.raises(kameo.SerializationError):
            kameo.decode(data.replace(b"Color", b"OddTZ"))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_decode_fuzz_random_bytes(data):
    with contextlib.suppress(kameo.SerializationError):
        kameo.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_fuzz_mutated_encodings(data):
    value = data.draw(st.sampled_from(PLAIN + EXTENDED))
    enc = bytearray(kameo.encode(value))
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(enc) - 1))
        enc[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(kameo.SerializationError):
        kameo.decode(bytes(enc))


# --------------------------------------------------------------------------- hypothesis

fixed_tz = st.builds(
    timezone, st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m))
) | st.builds(
    timezone,
    st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m)),
    st.text(min_size=1, max_size=8),
)
any_tz = st.none() | st.just(UTC) | fixed_tz | st.timezones()
datetimes = st.tuples(st.datetimes(timezones=any_tz), st.integers(0, 1)).map(
    lambda t: t[0].replace(fold=t[1])
)
times = st.tuples(st.times(timezones=st.none() | fixed_tz), st.integers(0, 1)).map(
    lambda t: t[0].replace(fold=t[1])
)
enum_members = st.sampled_from(
    [*Color, *Level, *Perm, Perm.R | Perm.W, Perm.R | Perm.W | Perm.X, Perm(0), *Mode]
)

hashable_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()
    | st.complex_numbers()
    | st.text()
    | st.binary()
    | datetimes
    | st.dates()
    | times
    | st.timedeltas()
    | st.decimals(allow_nan=False)
    | st.uuids()
    | enum_members
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: (
        st.lists(inner, max_size=3).map(tuple)
        | st.frozensets(inner, max_size=3)
        | st.builds(FrozenPoint, inner, inner)
        | st.builds(Pair, inner, inner)
        | st.builds(Coord, inner, inner)
    ),
    max_leaves=6,
)

if numpy is not None:
    np_dtypes = [numpy.dtype(d) for d in DTYPES if d != "structured"]
    np_dtypes.append(numpy.dtype([("x", "<f8"), ("n", "<i4")]))

    def _reorder(args: tuple[Any, int]) -> Any:
        a, how = args
        if how == 1:
            return numpy.asfortranarray(a)
        if how == 2 and a.ndim >= 1:
            return a[::2]
        if how == 3 and a.ndim >= 2:
            return a.T
        return a

    np_arrays = st.tuples(
        st.sampled_from(np_dtypes).flatmap(
            lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0))
        ),
        st.integers(0, 3),
    ).map(_reorder)
    np_scalars = st.sampled_from(
        ["float32", "float16", "int64", "int8", "uint64", "bool", "complex64", "M8[D]", "m8[s]"]
    ).flatmap(lambda d: hnp.from_dtype(numpy.dtype(d)))
    numpy_values = np_arrays | np_scalars
else:  # pragma: no cover
    numpy_values = st.nothing()

scalars = (
    hashable_scalars
    | st.decimals()  # NaN, sNaN, ±Infinity
    | st.binary().map(bytearray)
    | st.binary().map(memoryview)  # compared after mapping to bytes below
    | numpy_values
)


def expected_of(value: Any) -> Any:
    """What a value should arrive as: memoryviews as bytes, everything else unchanged."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, list):
        return [expected_of(v) for v in value]
    if isinstance(value, dict):
        return {k: expected_of(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return type(value)(
            **{f.name: expected_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    if _is_namedtuple(value):
        return type(value)(*(expected_of(v) for v in value))
    if isinstance(value, tuple):
        return tuple(expected_of(v) for v in value)
    return value


values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.builds(Point, inner, inner)
        | st.builds(SlotPoint, inner, inner)
        | st.builds(Bag, st.lists(inner, max_size=3))
        | st.builds(Pair, inner, inner)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_encode_decode_property(value):
    same(round_trip(value), expected_of(value))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(values)
def test_pool_echo_property(sync_echo_pool, value):
    same(sync_echo_pool.ask(value), expected_of(value))
