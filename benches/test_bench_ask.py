"""pytest-benchmark cases: kameo ask latency (sync and async handler) and the codec.

Not collected by ``make test`` (testpaths is ``tests``); run explicitly::

    pytest benches/test_bench_ask.py --benchmark-only

Each pool is created once per module on a dedicated event loop; the benchmarked function is
synchronous and drives one ask with ``loop.run_until_complete``, so every timed call includes
one event-loop turn around the round trip. The raw socketpair ping-pong from bench_pool.py is
included as the floor in the same table.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys

import pytest

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# Worker processes inherit the parent's sys.path: this makes "bench_handlers:echo" importable.
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

kameo = pytest.importorskip("kameo")
pytest.importorskip("pytest_benchmark")

import bench_pool  # noqa: E402

MSG = bench_pool.MSG
MSG_LIST = [dict(MSG, id=i) for i in range(1000)]
WARMUP_ASKS = 200


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _start_pool(loop, target):
    pool = kameo.Pool(target, size=1)
    loop.run_until_complete(asyncio.wait_for(pool.start(), 60))
    for _ in range(WARMUP_ASKS):
        loop.run_until_complete(pool.ask(MSG))
    return pool


@pytest.fixture(scope="module")
def echo_pool(loop):
    pool = _start_pool(loop, "bench_handlers:echo")
    yield pool
    loop.run_until_complete(asyncio.wait_for(pool.close(), 30))


@pytest.fixture(scope="module")
def aecho_pool(loop):
    pool = _start_pool(loop, "bench_handlers:aecho")
    yield pool
    loop.run_until_complete(asyncio.wait_for(pool.close(), 30))


@pytest.fixture(scope="module")
def raw_child():
    child = bench_pool.RawChild()
    bench_pool.raw_pingpong(child.sock, MSG, 200)
    yield child
    child.close()


@pytest.mark.benchmark(group="ask-latency-100B")
def test_ask_sync_handler(benchmark, loop, echo_pool):
    run = loop.run_until_complete
    ask = echo_pool.ask
    reply = benchmark(lambda: run(ask(MSG)))
    assert reply == MSG


@pytest.mark.benchmark(group="ask-latency-100B")
def test_ask_async_handler(benchmark, loop, aecho_pool):
    run = loop.run_until_complete
    ask = aecho_pool.ask
    reply = benchmark(lambda: run(ask(MSG)))
    assert reply == MSG


@pytest.mark.benchmark(group="ask-latency-100B")
def test_raw_socketpair_pingpong(benchmark, raw_child):
    pingpong = bench_pool.raw_pingpong
    sock = raw_child.sock
    _, reply = benchmark(pingpong, sock, MSG, 1)
    assert reply == MSG


CODECS = {
    "kameo": (kameo.encode, kameo.decode),
    "pickle5": (lambda obj: pickle.dumps(obj, 5), pickle.loads),
}


@pytest.mark.benchmark(group="codec-roundtrip-100B")
@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_roundtrip_dict(benchmark, codec):
    encode, decode = CODECS[codec]
    assert decode(encode(MSG)) == MSG
    assert benchmark(lambda: decode(encode(MSG))) == MSG


@pytest.mark.benchmark(group="codec-encode-100B")
@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_encode_dict(benchmark, codec):
    encode, _ = CODECS[codec]
    benchmark(encode, MSG)


@pytest.mark.benchmark(group="codec-decode-100B")
@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_decode_dict(benchmark, codec):
    encode, decode = CODECS[codec]
    data = encode(MSG)
    assert benchmark(decode, data) == MSG


@pytest.mark.benchmark(group="codec-roundtrip-1000x100B")
@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_roundtrip_list(benchmark, codec):
    encode, decode = CODECS[codec]
    assert decode(encode(MSG_LIST)) == MSG_LIST
    benchmark(lambda: decode(encode(MSG_LIST)))
