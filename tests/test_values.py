"""Exact round-trips of every supported value type, in-process and through a worker."""

from __future__ import annotations

import asyncio
import math

import kameo
import pytest
from conftest import BackgroundPool, assert_identical
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SAMPLES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    -(2**63) - 1,
    2**200,
    -(2**200),
    0.0,
    -0.0,
    1.5,
    -2.25,
    1e308,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "ascii",
    "héllo wörld",
    "日本語テキスト",
    "emoji 😀🎉👩‍👩‍👧",
    "nul\x00inside",
    b"",
    b"\x00\x01\xff" * 10,
    [],
    (),
    {},
    [1, "two", 3.0, None, True],
    (1, "two", (3, (4,)), []),
    [(), [()], ((),)],
    {"str": 1, 2: "int", (1, "t"): "tuple", None: "none", b"k": "bytes", -5: [1]},
    {1: True, 0: False, "n": None},
    {"nested": {"deeper": {"list": [1, (2, 3), {"x": b"y"}]}}},
    [True, 1, 1.0, "1", b"1", (1,), [1]],
]


@pytest.mark.parametrize("value", SAMPLES, ids=[repr(v)[:40] for v in SAMPLES])
def test_encode_decode_round_trip(value):
    data = kameo.encode(value)
    assert isinstance(data, bytes)
    assert_identical(kameo.decode(data), value)


async def test_pool_round_trip_all_samples():
    async with kameo.Pool("handlers.basic:echo", size=2) as pool:
        replies = await asyncio.gather(*(pool.ask(v, timeout=10.0) for v in SAMPLES))
        for got, expected in zip(replies, SAMPLES, strict=True):
            assert_identical(got, expected)


async def test_pool_round_trip_all_samples_async_handler():
    async with kameo.Pool("handlers.basic:aecho", size=1) as pool:
        for v in SAMPLES:
            assert_identical(await pool.ask(v, timeout=10.0), v)


async def test_bool_is_not_int_after_round_trip():
    async with kameo.Pool("handlers.basic:echo", size=1) as pool:
        got = await pool.ask([True, 1, False, 0], timeout=5.0)
        assert [type(x) for x in got] == [bool, int, bool, int]
        got_t = await pool.ask((1, 2), timeout=5.0)
        assert type(got_t) is tuple


# --------------------------------------------------------------------------- hypothesis

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
)
hashable_keys = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
    lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3).map(tuple),
    max_leaves=6,
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(hashable_keys, inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_encode_decode_property(value):
    assert_identical(kameo.decode(kameo.encode(value)), value)


@pytest.fixture(scope="module")
def background_echo_pool():
    bp = BackgroundPool("handlers.basic:echo", size=1)
    try:
        yield bp
    finally:
        bp.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(values)
def test_pool_echo_property(background_echo_pool, value):
    assert_identical(background_echo_pool.ask(value), value)
