#!/usr/bin/env python3
"""Pool benchmarks: kameo versus raw pure-Python IPC floors and the stdlib process pools.

Usage::

    python benches/bench_pool.py [--quick] [--only W1,W2,W4,W5,W7] [--pin CPUS] [--listener]

Every result is printed as one JSON object per line with at least the keys ``workload``,
``impl``, ``metric``, ``value`` and ``unit``. After the workloads, one ``summary`` line per
target gives the ratio, the target and whether it was met.

Workloads:

* W1 latency: one worker, sequential echo round trips of a ~100-byte dict (p50/p90/p99 in µs).
  Raw, asyncio and kameo run in interleaved rounds. ``W1_samecpu`` repeats them with every
  process pinned to one CPU: on a small VM a cross-CPU wakeup costs tens of µs and the
  scheduler's placement changes from run to run, so the unpinned numbers are bimodal.
* W2 throughput: two workers, all messages issued at once (msgs/s); ``kameo_async_handler``
  (info) is the same with an ``async def`` handler (the worker's event-loop mode). With
  ``--listener``, ``kameo_listener`` (info) is W2 with an event listener registered
  (``kameo.add_listener``): the cost of timing every request and making its ``CallFinished``.
* W4 streaming: one request whose sync generator handler yields 20,000 small ints
  (``async for x in pool.stream({"n": 20000})``, items/s), versus the raw stream floor: a child
  writing 20,000 length-prefixed pickled ints to a socketpair, the parent decoding them all.
  An async-generator handler, and ray if it is importable, are info. Rounds are interleaved.
  ``W4_samecpu`` (info) repeats it on one CPU: unpinned, the raw floor gains from running
  producer and consumer on two CPUs when the scheduler places them so, and every cross-CPU
  wakeup is expensive on a small VM, so unpinned numbers move from run to run.
* W5 callbacks: a sync worker handler makes 2,000 sequential one-item callbacks into an async
  parent handler (callbacks/s, timed in the worker), versus the raw round-trip floor (the W1
  ping-pong with a small dict, round trips/s) and a forked child calling a
  ``multiprocessing.Manager().dict()`` proxy (calls/s). ``kameo_sync_parent_handler`` (info) is
  the same with a plain ``def`` parent handler (run in a handler thread); ``kameo_async_worker``
  the same from an ``async def`` worker handler (``async for x in kameo.bench.Echo(i)``), whose
  ratio to the raw floor has the same target. ``W5_samecpu`` repeats
  it on one CPU, for the same reason as ``W1_samecpu``.
* W7 startup: time until a pool of 8 workers is ready versus 8 bare ``python -c "import kameo"``.
* W8 threads: CPU-bound sync requests on one worker with ``max_concurrency=2`` (two handler
  threads) versus ``1``: the speed-up of threads in one worker (target >= 1.6 on a free-threaded
  interpreter; info with the GIL, where it stays about 1).

The raw references are the floor: a length-prefixed pickle (protocol 5) echo over a Unix
socketpair to a child started with ``subprocess``, written as tightly as plain Python allows.
Lines marked ``info`` are extra references: ``asyncio_socketpair`` (the same children driven by a
pure-Python asyncio BufferedProtocol) and ``asyncio_gather_floor`` (asyncio.gather of coroutines
awaiting already-resolved futures, no IPC: the ceiling of any ask() used through gather).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import gc
import importlib
import multiprocessing
import os
import pickle
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback

from _report import emit, emit_env

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# Worker processes inherit the parent's sys.path, so this makes "bench_handlers:echo" importable.
sys.path.insert(0, BENCH_DIR)

MSG = {
    "symbol": "AAPL",
    "qty": 100,
    "price": 187.25,
    "side": "buy",
    "tags": ["a", "b"],
    "id": 123456,
}

HDR = struct.Struct("<I")
HDR_SIZE = HDR.size
PROTO = 5
RECV_CHUNK = 1 << 16
KAMEO_TIMEOUT_S = 300.0

clock = time.perf_counter_ns

# Filled in by main() from --quick.
SIZES = {
    "full": {
        "w1_n": 5000,
        "w1_warmup": 500,
        "w1_rounds": 10,
        "w1_slow_n": 2000,  # the stdlib pools (much slower per round trip)
        "w1_slow_warmup": 200,
        "w2_total": 20000,
        "w2_slow_total": 20000,
        "w2_repeats": 5,  # W2 value = median msgs/s over the repeats
        "w2_slow_repeats": 2,
        "w7_repeats": 7,
        "w7_size": 8,
        "w4_n": 20000,
        "w4_rounds": 7,
        "w5_n": 2000,
        "w5_rounds": 10,
        "w5_warmup": 200,
        "w8_tasks": 16,
        "w8_spin": 400_000,
        "w8_rounds": 5,
    },
    "quick": {
        "w1_n": 1000,
        "w1_warmup": 100,
        "w1_rounds": 4,
        "w1_slow_n": 300,
        "w1_slow_warmup": 50,
        "w2_total": 5000,
        "w2_slow_total": 3000,
        "w2_repeats": 3,
        "w2_slow_repeats": 1,
        "w7_repeats": 3,
        "w7_size": 8,
        "w4_n": 20000,
        "w4_rounds": 3,
        "w5_n": 2000,
        "w5_rounds": 3,
        "w5_warmup": 100,
        "w8_tasks": 8,
        "w8_spin": 200_000,
        "w8_rounds": 3,
    },
}

WORKLOADS = ("W1", "W2", "W4", "W5", "W7", "W8")


def handlers():
    return importlib.import_module("bench_handlers")


def load_kameo():
    try:
        return importlib.import_module("kameo"), None
    except Exception as exc:  # ImportError, or a broken extension module
        return None, f"{type(exc).__name__}: {exc}"


def percentiles_us(samples_ns):
    s = sorted(samples_ns)
    n = len(s)

    def pct(p):
        return s[min(n - 1, int(p * n))] / 1000.0

    return {
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "min": s[0] / 1000.0,
        "mean": statistics.fmean(s) / 1000.0,
        "n": n,
    }


def emit_latency(workload, impl, samples_ns, **extra):
    st = percentiles_us(samples_ns)
    return emit(
        workload,
        impl,
        "latency_p50",
        round(st["p50"], 2),
        "us",
        p90_us=round(st["p90"], 2),
        p99_us=round(st["p99"], 2),
        min_us=round(st["min"], 2),
        mean_us=round(st["mean"], 2),
        n=st["n"],
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Raw socketpair reference: child side
# ---------------------------------------------------------------------------------------------


def raw_child_main(fd):
    """Echo loop of the raw reference child: length-prefixed pickle frames in, same out.

    Reads with recv_into into a preallocated buffer, handles any number of frames per read
    (pipelined parent) and answers everything decoded from one read with one sendall.
    """
    sock = socket.socket(fileno=fd)
    recv_into = sock.recv_into
    sendall = sock.sendall
    loads = pickle.loads
    dumps = pickle.dumps
    pack = HDR.pack
    unpack_from = HDR.unpack_from

    def echo(msg):
        return msg

    buf = bytearray(1 << 20)
    view = memoryview(buf)
    start = end = 0
    out = []
    while True:
        if len(buf) - end < RECV_CHUNK:
            # Move the pending partial frame to the front (growing if it cannot fit).
            pending = end - start
            if pending + RECV_CHUNK > len(buf):
                buf = bytearray(2 * (pending + RECV_CHUNK))
                new_view = memoryview(buf)
                new_view[:pending] = view[start:end]
                view = new_view
            else:
                view[:pending] = bytes(view[start:end])
            start, end = 0, pending
        n = recv_into(view[end:])
        if not n:
            break
        end += n
        while end - start >= HDR_SIZE:
            stop = start + HDR_SIZE + unpack_from(buf, start)[0]
            if stop > end:
                break
            payload = dumps(echo(loads(view[start + HDR_SIZE : stop])), PROTO)
            out.append(pack(len(payload)))
            out.append(payload)
            start = stop
        if out:
            sendall(b"".join(out))
            out.clear()
        if start == end:
            start = end = 0
    sock.close()


class RawChild:
    """A raw reference child process connected by a Unix socketpair."""

    def __init__(self, mode="--raw-child"):
        self.sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = child_sock.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), mode, str(fd)],
            pass_fds=(fd,),
        )
        child_sock.close()

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Raw socketpair reference: parent side
# ---------------------------------------------------------------------------------------------


def raw_pingpong(sock, msg, n):
    """Synchronous ping-pong: encode, sendall, read exactly one reply frame, decode."""
    buf = bytearray(RECV_CHUNK)
    view = memoryview(buf)
    dumps = pickle.dumps
    loads = pickle.loads
    pack = HDR.pack
    unpack_from = HDR.unpack_from
    sendall = sock.sendall
    recv_into = sock.recv_into
    samples = [0] * n
    reply = None
    for i in range(n):
        t0 = clock()
        payload = dumps(msg, PROTO)
        sendall(pack(len(payload)) + payload)
        got = recv_into(buf)
        while got < HDR_SIZE:
            r = recv_into(view[got:])
            if not r:
                raise ConnectionError("raw child closed the socket")
            got += r
        need = HDR_SIZE + unpack_from(buf)[0]
        while got < need:
            r = recv_into(view[got:])
            if not r:
                raise ConnectionError("raw child closed the socket")
            got += r
        reply = loads(view[HDR_SIZE:need])
        samples[i] = clock() - t0
    return samples, reply


class _PipeState:
    __slots__ = ("buf", "end", "out", "out_pos", "sock", "start", "to_send", "view", "writing")

    def __init__(self, sock, to_send):
        self.sock = sock
        self.to_send = to_send
        self.out = memoryview(b"")
        self.out_pos = 0
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.writing = True


def raw_pipelined(socks, msg, total, batch=512):
    """Pipelined echo over several sockets: non-blocking writes interleaved with reads.

    Messages are encoded lazily in batches of ``batch`` frames, so encoding, sending, the child's
    work and decoding replies overlap. Returns (elapsed_ns, last_reply).
    """
    dumps = pickle.dumps
    loads = pickle.loads
    pack = HDR.pack
    unpack_from = HDR.unpack_from
    sel = selectors.DefaultSelector()
    per = [total // len(socks) + (1 if i < total % len(socks) else 0) for i in range(len(socks))]
    received = 0
    reply = None
    t0 = clock()
    for s, count in zip(socks, per, strict=True):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, _PipeState(s, count))
    try:
        while received < total:
            for key, events in sel.select():
                st = key.data
                if events & selectors.EVENT_READ:
                    buf = st.buf
                    view = st.view
                    if len(buf) - st.end < RECV_CHUNK:
                        pending = st.end - st.start
                        view[:pending] = bytes(view[st.start : st.end])
                        st.start, st.end = 0, pending
                    try:
                        n = st.sock.recv_into(view[st.end :])
                    except BlockingIOError:
                        n = -1
                    if n == 0:
                        raise ConnectionError("raw child closed the socket")
                    if n > 0:
                        end = st.end + n
                        start = st.start
                        while end - start >= HDR_SIZE:
                            stop = start + HDR_SIZE + unpack_from(buf, start)[0]
                            if stop > end:
                                break
                            reply = loads(view[start + HDR_SIZE : stop])
                            received += 1
                            start = stop
                        if start == end:
                            start = end = 0
                        st.start, st.end = start, end
                if events & selectors.EVENT_WRITE and st.writing:
                    if st.out_pos == len(st.out):
                        k = min(batch, st.to_send)
                        if k == 0:
                            st.writing = False
                            sel.modify(st.sock, selectors.EVENT_READ, st)
                            continue
                        parts = []
                        for _ in range(k):
                            payload = dumps(msg, PROTO)
                            parts.append(pack(len(payload)))
                            parts.append(payload)
                        st.to_send -= k
                        st.out = memoryview(b"".join(parts))
                        st.out_pos = 0
                    # try/except rather than contextlib.suppress: this is the hot loop.
                    try:  # noqa: SIM105
                        st.out_pos += st.sock.send(st.out[st.out_pos :])
                    except BlockingIOError:
                        pass
    finally:
        sel.close()
        for s in socks:
            s.setblocking(True)
    return clock() - t0, reply


# ---------------------------------------------------------------------------------------------
# Pure-Python asyncio reference (same raw children): what an asyncio parent costs without kameo
# ---------------------------------------------------------------------------------------------


class _EchoProtocol(asyncio.BufferedProtocol):
    """Parent side of one raw child: replies come back in order, so a deque of futures will do
    (no request ids, no flow control: a lower bound for an asyncio-driven design). A
    BufferedProtocol, so the transport reads with recv_into into a preallocated buffer."""

    def __init__(self):
        self.waiters = collections.deque()
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if len(self.buf) - self.end < RECV_CHUNK:
            pending = self.end - self.start
            self.view[:pending] = bytes(self.view[self.start : self.end])
            self.start, self.end = 0, pending
        return self.view[self.end :]

    def buffer_updated(self, nbytes):
        buf = self.buf
        view = self.view
        loads = pickle.loads
        unpack_from = HDR.unpack_from
        popleft = self.waiters.popleft
        end = self.end + nbytes
        start = self.start
        while end - start >= HDR_SIZE:
            stop = start + HDR_SIZE + unpack_from(buf, start)[0]
            if stop > end:
                break
            fut = popleft()
            if not fut.done():
                fut.set_result(loads(view[start + HDR_SIZE : stop]))
            start = stop
        if start == end:
            start = end = 0
        self.start, self.end = start, end

    def connection_lost(self, exc):
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("raw child went away"))


class AsyncioSocketPool:
    """Round-robin over raw children with a pure-Python asyncio Protocol per connection."""

    def __init__(self, size):
        self.size = size
        self.children = []
        self.protocols = []
        self.next = 0
        self.loop = None

    async def start(self):
        self.loop = asyncio.get_running_loop()
        for _ in range(self.size):
            child = RawChild()
            self.children.append(child)
            _, proto = await self.loop.connect_accepted_socket(_EchoProtocol, child.sock)
            self.protocols.append(proto)

    async def ask(self, msg):
        proto = self.protocols[self.next]
        self.next = (self.next + 1) % self.size
        payload = pickle.dumps(msg, PROTO)
        proto.transport.write(HDR.pack(len(payload)) + payload)
        fut = self.loop.create_future()
        proto.waiters.append(fut)
        return await fut

    async def close(self):
        for proto in self.protocols:
            proto.transport.close()
        await asyncio.sleep(0)
        for child in self.children:
            child.close()


# ---------------------------------------------------------------------------------------------
# W1 latency
# ---------------------------------------------------------------------------------------------


def w1_ppe(sz):
    echo = handlers().echo

    async def run():
        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(max_workers=1) as ex:
            for _ in range(sz["w1_slow_warmup"]):
                await loop.run_in_executor(ex, echo, MSG)
            n = sz["w1_slow_n"]
            samples = [0] * n
            reply = None
            for i in range(n):
                t0 = clock()
                reply = await loop.run_in_executor(ex, echo, MSG)
                samples[i] = clock() - t0
        assert reply == MSG, reply
        return samples

    samples = asyncio.run(run())
    return emit_latency("W1", "ProcessPoolExecutor", samples, note="asyncio run_in_executor")


def w1_mp_pool(sz):
    echo = handlers().echo
    with multiprocessing.Pool(1) as pool:
        for _ in range(sz["w1_slow_warmup"]):
            pool.apply(echo, (MSG,))
        n = sz["w1_slow_n"]
        samples = [0] * n
        reply = None
        for i in range(n):
            t0 = clock()
            reply = pool.apply(echo, (MSG,))
            samples[i] = clock() - t0
    assert reply == MSG, reply
    return emit_latency(
        "W1",
        "multiprocessing.Pool",
        samples,
        note=f"Pool(1).apply, start method {multiprocessing.get_start_method()}",
    )


W1_KAMEO_IMPLS = (
    ("kameo", "bench_handlers:echo"),
    ("kameo_async_handler", "bench_handlers:aecho"),
)


async def kameo_pingpong(pool, msg, n):
    ask = pool.ask
    samples = [0] * n
    reply = None
    for i in range(n):
        t0 = clock()
        reply = await ask(msg)
        samples[i] = clock() - t0
    return samples, reply


def w1_interleaved(kameo, sz, kameo_err, workload="W1"):
    """Raw reference and kameo (sync and async handler), measured in interleaved rounds.

    The raw child and both kameo pools stay up for the whole workload; each round runs
    ``n / rounds`` round trips of every implementation back to back, so slow phases of a noisy
    machine hit them alike. Returns {impl: record}.
    """
    rounds = sz["w1_rounds"]
    per = max(1, sz["w1_n"] // rounds)
    errors = {}
    samples = {"raw_socketpair": []}

    async def run():
        child = RawChild()
        pools = {}
        try:
            apool = AsyncioSocketPool(1)
            await apool.start()
            await kameo_pingpong(apool, MSG, sz["w1_warmup"])
            pools["asyncio_socketpair"] = apool
            samples["asyncio_socketpair"] = []
            if kameo is not None:
                for impl, target in W1_KAMEO_IMPLS:
                    try:
                        pool = kameo.Pool(target, size=1)
                        await asyncio.wait_for(pool.start(), KAMEO_TIMEOUT_S)
                        await asyncio.wait_for(
                            kameo_pingpong(pool, MSG, sz["w1_warmup"]), KAMEO_TIMEOUT_S
                        )
                    except Exception as exc:
                        traceback.print_exc(file=sys.stderr)
                        errors[impl] = f"{type(exc).__name__}: {exc}"
                        continue
                    pools[impl] = pool
                    samples[impl] = []
            raw_pingpong(child.sock, MSG, sz["w1_warmup"])
            gc.collect()
            for _ in range(rounds):
                s, reply = raw_pingpong(child.sock, MSG, per)
                assert reply == MSG, reply
                samples["raw_socketpair"].extend(s)
                for impl, pool in list(pools.items()):
                    try:
                        s, reply = await asyncio.wait_for(
                            kameo_pingpong(pool, MSG, per), KAMEO_TIMEOUT_S
                        )
                        assert reply == MSG, reply
                    except Exception as exc:
                        traceback.print_exc(file=sys.stderr)
                        errors[impl] = f"{type(exc).__name__}: {exc}"
                        del pools[impl]
                        del samples[impl]
                        continue
                    samples[impl].extend(s)
        finally:
            for pool in pools.values():
                try:
                    await asyncio.wait_for(pool.close(), 30)
                except Exception:
                    traceback.print_exc(file=sys.stderr)
            child.close()

    asyncio.run(run())
    out = {}
    out["raw_socketpair"] = emit_latency(
        workload,
        "raw_socketpair",
        samples["raw_socketpair"],
        rounds=rounds,
        note="sync parent, subprocess child, <I + pickle p5",
    )
    if "asyncio_socketpair" in samples:
        out["asyncio_socketpair"] = emit_latency(
            workload,
            "asyncio_socketpair",
            samples["asyncio_socketpair"],
            rounds=rounds,
            note="info: pure-Python asyncio Protocol parent, same raw child",
        )
    else:
        err = errors.get("asyncio_socketpair")
        emit(workload, "asyncio_socketpair", "error", None, None, error=err)
    for impl, target in W1_KAMEO_IMPLS:
        if kameo is None:
            emit(workload, impl, "skipped", None, None, reason=f"import kameo failed: {kameo_err}")
        elif impl in errors:
            emit(workload, impl, "error", None, None, error=errors[impl], handler=target)
        else:
            out[impl] = emit_latency(workload, impl, samples[impl], rounds=rounds, handler=target)
    return out


# ---------------------------------------------------------------------------------------------
# W2 throughput
# ---------------------------------------------------------------------------------------------


def emit_throughput(impl, total, elapsed_ns, workers=2, **extra):
    """``elapsed_ns`` is a list of per-repeat times; the reported value is the median rate."""
    rates = sorted(total / (e / 1e9) for e in elapsed_ns)
    return emit(
        "W2",
        impl,
        "throughput",
        round(statistics.median(rates), 1),
        "msgs/s",
        best=round(rates[-1], 1),
        worst=round(rates[0], 1),
        repeats=len(rates),
        n=total,
        elapsed_ms=[round(e / 1e6, 2) for e in elapsed_ns],
        workers=workers,
        **extra,
    )


def w2_raw(sz):
    children = [RawChild(), RawChild()]
    try:
        socks = [c.sock for c in children]
        raw_pipelined(socks, MSG, 1000)  # warm-up
        elapsed = []
        for _ in range(sz["w2_repeats"]):
            gc.collect()  # no garbage from earlier rounds
            e, reply = raw_pipelined(socks, MSG, sz["w2_total"])
            assert reply == MSG, reply
            elapsed.append(e)
    finally:
        for c in children:
            c.close()
    return emit_throughput(
        "raw_socketpair",
        sz["w2_total"],
        elapsed,
        note="2 subprocess children, selectors non-blocking pipelined writes/reads, pickle p5",
    )


def w2_asyncio_socketpair(sz):
    total = sz["w2_total"]

    async def run():
        pool = AsyncioSocketPool(2)
        await pool.start()
        try:
            await asyncio.gather(*(pool.ask(MSG) for _ in range(1000)))
            elapsed = []
            for _ in range(sz["w2_repeats"]):
                gc.collect()  # no garbage from earlier rounds
                t0 = clock()
                replies = await asyncio.gather(*(pool.ask(MSG) for _ in range(total)))
                elapsed.append(clock() - t0)
                assert replies[-1] == MSG and len(replies) == total
                del replies  # keep the previous round's replies out of the next one's GC
        finally:
            await pool.close()
        return elapsed

    elapsed = asyncio.run(run())
    return emit_throughput(
        "asyncio_socketpair",
        total,
        elapsed,
        note="info: asyncio.gather over a pure-Python asyncio Protocol pool, same raw children",
    )


def w2_asyncio_floor(sz):
    """asyncio.gather of coroutines that each await a future resolved by call_soon: no IPC,
    no encoding. The ceiling of any ask() that is awaited through asyncio.gather."""
    total = sz["w2_total"]

    async def run():
        loop = asyncio.get_running_loop()

        async def ask(msg):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, msg)
            return await fut

        await asyncio.gather(*(ask(MSG) for _ in range(1000)))
        elapsed = []
        for _ in range(sz["w2_repeats"]):
            gc.collect()  # no garbage from earlier rounds
            t0 = clock()
            replies = await asyncio.gather(*(ask(MSG) for _ in range(total)))
            elapsed.append(clock() - t0)
            assert len(replies) == total
            del replies
        return elapsed

    elapsed = asyncio.run(run())
    return emit_throughput(
        "asyncio_gather_floor",
        total,
        elapsed,
        workers=0,
        note="info: gather of coroutines awaiting call_soon-resolved futures, no IPC at all",
    )


def w2_ppe(sz):
    echo = handlers().echo
    total = sz["w2_slow_total"]

    async def run():
        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(max_workers=2) as ex:
            await asyncio.gather(*(loop.run_in_executor(ex, echo, MSG) for _ in range(200)))
            elapsed = []
            for _ in range(sz["w2_slow_repeats"]):
                gc.collect()  # no garbage from earlier rounds
                t0 = clock()
                replies = await asyncio.gather(
                    *(loop.run_in_executor(ex, echo, MSG) for _ in range(total))
                )
                elapsed.append(clock() - t0)
                assert replies[-1] == MSG and len(replies) == total
                del replies  # keep the previous round's replies out of the next one's GC
        return elapsed

    elapsed = asyncio.run(run())
    return emit_throughput(
        "ProcessPoolExecutor", total, elapsed, note="asyncio.gather of run_in_executor"
    )


def w2_mp_pool(sz):
    echo = handlers().echo
    total = sz["w2_slow_total"]
    msgs = [MSG] * total
    with multiprocessing.Pool(2) as pool:
        pool.map(echo, msgs[:200], chunksize=1)
        elapsed = []
        for _ in range(sz["w2_slow_repeats"]):
            gc.collect()  # no garbage from earlier rounds
            t0 = clock()
            replies = pool.map(echo, msgs, chunksize=1)
            elapsed.append(clock() - t0)
            assert replies[-1] == MSG and len(replies) == total
            del replies  # keep the previous round's replies out of the next one's GC
    return emit_throughput(
        "multiprocessing.Pool",
        total,
        elapsed,
        note=f"Pool(2).map chunksize=1, start method {multiprocessing.get_start_method()}",
    )


def w2_kameo(kameo, sz, impl="kameo", target="bench_handlers:echo", listener=False):
    """``listener``: a global event listener that counts the events (kameo.add_listener), so
    every request records its timing and makes a CallFinished."""
    total = sz["w2_total"]
    events = [0]

    def count(event):
        events[0] += 1

    async def run():
        async with kameo.Pool(target, size=2) as pool:
            await asyncio.gather(*(pool.ask(MSG) for _ in range(1000)))
            elapsed = []
            for _ in range(sz["w2_repeats"]):
                gc.collect()  # no garbage from earlier rounds
                t0 = clock()
                replies = await asyncio.gather(*(pool.ask(MSG) for _ in range(total)))
                elapsed.append(clock() - t0)
                assert replies[-1] == MSG and len(replies) == total
                del replies  # keep the previous round's replies out of the next one's GC
        return elapsed

    if listener:
        kameo.add_listener(count)
    try:
        elapsed = asyncio.run(asyncio.wait_for(run(), KAMEO_TIMEOUT_S))
    finally:
        if listener:
            kameo.remove_listener(count)
    note = "asyncio.gather of pool.ask" + ("" if impl == "kameo" else f" ({target}, info)")
    extra = {"events": events[0]} if listener else {}
    return emit_throughput(impl, total, elapsed, note=note, **extra)


# ---------------------------------------------------------------------------------------------
# Shared by W4 and W5: a rate per round, reported as the median over interleaved rounds
# ---------------------------------------------------------------------------------------------


def emit_rate(workload, impl, count, elapsed_ns, unit, **extra):
    """``elapsed_ns``: one time per round for ``count`` operations; value = median rate."""
    rates = sorted(count / (e / 1e9) for e in elapsed_ns)
    med = statistics.median(rates)
    return emit(
        workload,
        impl,
        "rate",
        round(med, 1),
        unit,
        per_op_us=round(1e6 / med, 3),
        best=round(rates[-1], 1),
        worst=round(rates[0], 1),
        rounds=len(rates),
        n=count,
        elapsed_ms=[round(e / 1e6, 2) for e in elapsed_ns],
        **extra,
    )


def _recv_exact(sock, size):
    """``size`` bytes from a blocking socket, or None at EOF before the first byte."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        r = sock.recv_into(view[got:])
        if not r:
            if got == 0:
                return None
            raise ConnectionError("peer closed the socket mid-frame")
        got += r
    return buf


# ---------------------------------------------------------------------------------------------
# W4 streaming: one request, 20,000 small items back
# ---------------------------------------------------------------------------------------------

RAW_STREAM_BATCH = 512  # items per sendall in the raw stream child


def raw_stream_child_main(fd):
    """Raw stream floor child: for each request frame ``{"n": n}``, write ``n`` length-prefixed
    pickled ints as fast as plain Python can (encoded into one buffer, one sendall per
    ``RAW_STREAM_BATCH`` items, so encoding overlaps the parent's decoding)."""
    sock = socket.socket(fileno=fd)
    dumps = pickle.dumps
    pack = HDR.pack
    sendall = sock.sendall
    while True:
        hdr = _recv_exact(sock, HDR_SIZE)
        if hdr is None:
            break
        n = pickle.loads(_recv_exact(sock, HDR.unpack(hdr)[0]))["n"]
        parts = []
        append = parts.append
        for i in range(n):
            payload = dumps(i, PROTO)
            append(pack(len(payload)) + payload)
            if len(parts) == RAW_STREAM_BATCH:
                sendall(b"".join(parts))
                parts.clear()
        if parts:
            sendall(b"".join(parts))
    sock.close()


def raw_stream_read(sock, n):
    """Ask the raw stream child for ``n`` items and decode them all; returns (last, count)."""
    payload = pickle.dumps({"n": n}, PROTO)
    sock.sendall(HDR.pack(len(payload)) + payload)
    loads = pickle.loads
    unpack_from = HDR.unpack_from
    recv_into = sock.recv_into
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    start = end = count = 0
    last = None
    while count < n:
        if len(buf) - end < RECV_CHUNK:
            pending = end - start
            view[:pending] = bytes(view[start:end])
            start, end = 0, pending
        r = recv_into(view[end:])
        if not r:
            raise ConnectionError("raw stream child closed the socket")
        end += r
        while end - start >= HDR_SIZE:
            stop = start + HDR_SIZE + unpack_from(buf, start)[0]
            if stop > end:
                break
            last = loads(view[start + HDR_SIZE : stop])
            count += 1
            start = stop
        if start == end:
            start = end = 0
    return last, count


async def kameo_stream_read(pool, n):
    last = None
    count = 0
    async for x in pool.stream({"n": n}):
        last = x
        count += 1
    return last, count


# (impl, handler, stream_window): the default window is what W4 measures; the wide window shows
# how much of the gap is credit round trips (info).
W4_KAMEO_IMPLS = (
    ("kameo", "bench_handlers:gen", None),
    ("kameo_async_gen", "bench_handlers:agen", None),
    ("kameo_window4096", "bench_handlers:gen", 4096),
    ("kameo_async_gen_window4096", "bench_handlers:agen", 4096),
)


def w4_interleaved(kameo, sz, kameo_err, workload="W4"):
    """Raw stream floor and kameo (sync and async generator), in interleaved rounds: each round
    streams ``n`` items once with every implementation. Returns {impl: record}."""
    n = sz["w4_n"]
    rounds = sz["w4_rounds"]
    elapsed = {"raw_socketpair": []}
    errors = {}

    async def run():
        child = RawChild("--raw-stream-child")
        pools = {}
        try:
            if kameo is not None:
                for impl, target, window in W4_KAMEO_IMPLS:
                    try:
                        opts = {} if window is None else {"stream_window": window}
                        pool = kameo.Pool(target, size=1, **opts)
                        await asyncio.wait_for(pool.start(), KAMEO_TIMEOUT_S)
                        await asyncio.wait_for(kameo_stream_read(pool, n), KAMEO_TIMEOUT_S)
                    except Exception as exc:
                        traceback.print_exc(file=sys.stderr)
                        errors[impl] = f"{type(exc).__name__}: {exc}"
                        continue
                    pools[impl] = pool
                    elapsed[impl] = []
            raw_stream_read(child.sock, n)  # warm-up
            for _ in range(rounds):
                gc.collect()
                t0 = clock()
                last, count = raw_stream_read(child.sock, n)
                elapsed["raw_socketpair"].append(clock() - t0)
                assert (last, count) == (n - 1, n), (last, count)
                for impl, pool in list(pools.items()):
                    gc.collect()
                    try:
                        t0 = clock()
                        last, count = await asyncio.wait_for(
                            kameo_stream_read(pool, n), KAMEO_TIMEOUT_S
                        )
                        elapsed[impl].append(clock() - t0)
                        assert (last, count) == (n - 1, n), (last, count)
                    except Exception as exc:
                        traceback.print_exc(file=sys.stderr)
                        errors[impl] = f"{type(exc).__name__}: {exc}"
                        del pools[impl]
                        del elapsed[impl]
        finally:
            for pool in pools.values():
                try:
                    await asyncio.wait_for(pool.close(), 30)
                except Exception:
                    traceback.print_exc(file=sys.stderr)
            child.close()

    asyncio.run(run())
    out = {
        "raw_socketpair": emit_rate(
            workload,
            "raw_socketpair",
            n,
            elapsed["raw_socketpair"],
            "items/s",
            note=(
                f"subprocess child writes <I + pickle p5 ints, one sendall per "
                f"{RAW_STREAM_BATCH}; sync parent recv_into + loads of every item"
            ),
        )
    }
    for impl, target, window in W4_KAMEO_IMPLS:
        if kameo is None:
            emit(workload, impl, "skipped", None, None, reason=f"import kameo failed: {kameo_err}")
        elif impl in errors:
            emit(workload, impl, "error", None, None, error=errors[impl], handler=target)
        else:
            out[impl] = emit_rate(
                workload,
                impl,
                n,
                elapsed[impl],
                "items/s",
                handler=target,
                stream_window=window or "default",
                note="async for x in pool.stream({'n': n})"
                + ("" if impl == "kameo" else " (info)"),
            )
    return out


def w4_ray(sz):
    """Ray streaming generator, if ray is importable (it is not installed by this script)."""
    try:
        ray = importlib.import_module("ray")
    except ImportError as exc:
        emit("W4", "ray", "skipped", None, None, reason=f"ray not importable: {exc}")
        return None
    n = sz["w4_n"]

    def ray_gen(m):
        yield from range(m["n"])

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote_gen = ray.remote(num_returns="streaming")(ray_gen)

        def once():
            last = None
            count = 0
            for ref in remote_gen.remote({"n": n}):
                last = ray.get(ref)
                count += 1
            assert (last, count) == (n - 1, n), (last, count)

        once()  # warm-up
        elapsed = []
        for _ in range(sz["w4_rounds"]):
            gc.collect()
            t0 = clock()
            once()
            elapsed.append(clock() - t0)
    finally:
        ray.shutdown()
    return emit_rate(
        "W4",
        "ray",
        n,
        elapsed,
        "items/s",
        version=getattr(ray, "__version__", None),
        note='info: @ray.remote(num_returns="streaming") generator, ray.get of each ref',
    )


# ---------------------------------------------------------------------------------------------
# W5 callbacks: a worker makes sequential one-item calls into the parent
# ---------------------------------------------------------------------------------------------

PING = {"ok": True}


def manager_client_main(d, conn):
    """Child of the W5 Manager reference: for each command ``n``, call ``d.get("k")`` ``n``
    times through the proxy and send back the elapsed ns; ``None`` ends it."""
    get = d.get
    while True:
        n = conn.recv()
        if n is None:
            break
        t0 = clock()
        for _ in range(n):
            get("k")
        conn.send(clock() - t0)
    conn.close()


def w5_interleaved(kameo, sz, kameo_err, workload="W5"):
    """Raw round-trip floor, Manager proxy calls and kameo callbacks in interleaved rounds.

    * raw_socketpair: the sync ping-pong of W1 with a small dict (``{"ok": True}``): the parent
      sends, the raw child echoes; ``n`` round trips per round.
    * multiprocessing.Manager: a forked child calls ``d.get("k")`` on a ``Manager().dict()``
      proxy ``n`` times (the Manager's server is its own process, forked from this one).
    * kameo: a sync worker handler makes ``n`` sequential one-item callbacks
      (``for x in kameo.bench.Ping({})``) answered by an async parent handler; the rate is
      timed inside the worker (``outer_rate`` times the whole ask from the parent).
    * kameo_sync_parent_handler (info): the same, answered by a plain ``def`` parent handler.
    """
    n = sz["w5_n"]
    rounds = sz["w5_rounds"]
    warm = sz["w5_warmup"]
    elapsed = {"raw_socketpair": [], "multiprocessing.Manager": []}
    outer = []
    errors = {}
    ctx = multiprocessing.get_context("fork")

    async def start_pool(impl, cb, target="bench_handlers:cb_loop"):
        try:
            pool = kameo.Pool(target, size=1, callbacks=cb)
            await asyncio.wait_for(pool.start(), KAMEO_TIMEOUT_S)
            await pool.ask(warm, timeout=KAMEO_TIMEOUT_S)
            elapsed[impl] = []
            return pool
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            errors[impl] = f"{type(exc).__name__}: {exc}"
            return None

    async def timed_round(impl, pool):
        """One round of ``n`` callbacks timed in the worker; the pool, or None once it failed."""
        if pool is None:
            return None
        try:
            elapsed[impl].append(await pool.ask(n, timeout=KAMEO_TIMEOUT_S))
            return pool
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            errors[impl] = f"{type(exc).__name__}: {exc}"
            del elapsed[impl]
            await pool.close()
            return None

    async def run(conn, child):
        pool = pool_sync = pool_async = None
        if kameo is not None:
            cb = kameo.Callbacks()

            @cb.handler("bench.Ping")
            async def ping(req):
                return {"ok": True}

            cb_sync = kameo.Callbacks()

            @cb_sync.handler("bench.Ping")
            def ping_sync(req):
                return {"ok": True}

            @cb.handler("bench.Echo")
            async def echo(req):
                return req

            pool = await start_pool("kameo", cb)
            pool_sync = await start_pool("kameo_sync_parent_handler", cb_sync)
            pool_async = await start_pool("kameo_async_worker", cb, "bench_handlers:acb_loop")
        try:
            conn.send(warm)
            conn.recv()
            raw_pingpong(child.sock, PING, warm)
            gc.collect()
            for _ in range(rounds):
                t0 = clock()
                _, reply = raw_pingpong(child.sock, PING, n)
                elapsed["raw_socketpair"].append(clock() - t0)
                assert reply == PING, reply
                conn.send(n)
                elapsed["multiprocessing.Manager"].append(conn.recv())
                if pool is not None:
                    try:
                        t0 = clock()
                        # The ask's own timeout, not asyncio.wait_for: on 3.11 wait_for
                        # awaits through a waiter future, so the ask could not wait for its
                        # answer (and serve the callbacks) directly; on 3.12+ it could.
                        inner = await pool.ask(n, timeout=KAMEO_TIMEOUT_S)
                        outer.append(clock() - t0)
                        elapsed["kameo"].append(inner)
                    except Exception as exc:
                        traceback.print_exc(file=sys.stderr)
                        errors["kameo"] = f"{type(exc).__name__}: {exc}"
                        del elapsed["kameo"]
                        await pool.close()
                        pool = None
                pool_sync = await timed_round("kameo_sync_parent_handler", pool_sync)
                pool_async = await timed_round("kameo_async_worker", pool_async)
        finally:
            for p in (pool, pool_sync, pool_async):
                if p is not None:
                    await asyncio.wait_for(p.close(), 30)

    # The Manager and its client fork: start them before any kameo pool of this run exists.
    mgr = ctx.Manager()
    try:
        d = mgr.dict(k=1)
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=manager_client_main, args=(d, child_conn), daemon=True)
        proc.start()
        child_conn.close()
        child = RawChild()
        try:
            asyncio.run(run(conn, child))
        finally:
            conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            child.close()
    finally:
        mgr.shutdown()

    out = {
        "raw_socketpair": emit_rate(
            workload,
            "raw_socketpair",
            n,
            elapsed["raw_socketpair"],
            "round_trips/s",
            note="sync ping-pong of pickled {'ok': True}, <I framing, subprocess echo child",
        ),
        "multiprocessing.Manager": emit_rate(
            workload,
            "multiprocessing.Manager",
            n,
            elapsed["multiprocessing.Manager"],
            "calls/s",
            note="forked child calling Manager().dict() proxy d.get('k'); server is a process",
        ),
    }
    if kameo is None:
        emit(workload, "kameo", "skipped", None, None, reason=f"import kameo failed: {kameo_err}")
    elif "kameo" in errors:
        emit(workload, "kameo", "error", None, None, error=errors["kameo"])
    else:
        outer_rates = sorted(n / (e / 1e9) for e in outer)
        out["kameo"] = emit_rate(
            workload,
            "kameo",
            n,
            elapsed["kameo"],
            "callbacks/s",
            outer_rate=round(statistics.median(outer_rates), 1),
            note="sync worker 'for x in kameo.bench.Ping({})', async parent handler; timed in "
            "the worker (outer_rate: whole ask timed in the parent)",
        )
    for impl, note in (
        (
            "kameo_sync_parent_handler",
            "info: as kameo, with a plain 'def' parent handler (run in a handler thread); "
            "timed in the worker",
        ),
        (
            "kameo_async_worker",
            "an async worker handler iterating 'async for x in kameo.bench.Echo(i)', async "
            "parent handler; timed in the worker",
        ),
    ):
        if kameo is not None and impl in errors:
            emit(workload, impl, "error", None, None, error=errors[impl])
        elif kameo is not None:
            out[impl] = emit_rate(workload, impl, n, elapsed[impl], "callbacks/s", note=note)
    return out


# ---------------------------------------------------------------------------------------------
# W8 threads: sync requests of one worker in 1 or 2 handler threads
# ---------------------------------------------------------------------------------------------


def w8_threads(kameo, sz):
    """``w8_tasks`` CPU-bound sync requests (``spin``) on one worker, with ``max_concurrency``
    1 (one at a time) and 2 (two handler threads), in interleaved rounds; tasks/s of each. The
    ratio is the speed-up of two threads in one worker: about 2 on a free-threaded interpreter
    with two free cores, about 1 with the GIL."""
    tasks, n, rounds = sz["w8_tasks"], sz["w8_spin"], sz["w8_rounds"]
    elapsed = {1: [], 2: []}

    async def run():
        pools = {c: kameo.Pool("bench_handlers:spin", size=1, max_concurrency=c) for c in (1, 2)}
        try:
            for p in pools.values():
                await asyncio.wait_for(p.start(), KAMEO_TIMEOUT_S)
                await asyncio.gather(*(p.ask(1000) for _ in range(4)))
            for _ in range(rounds):
                for c, p in pools.items():
                    t0 = clock()
                    await asyncio.wait_for(
                        asyncio.gather(*(p.ask(n) for _ in range(tasks))), KAMEO_TIMEOUT_S
                    )
                    elapsed[c].append(clock() - t0)
        finally:
            for p in pools.values():
                await asyncio.wait_for(p.close(), 30)

    asyncio.run(run())
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    out = {}
    for c in (1, 2):
        out[c] = emit_rate(
            "W8",
            f"kameo_{c}_thread" + ("s" if c > 1 else ""),
            tasks,
            elapsed[c],
            "tasks/s",
            note=f"one worker, max_concurrency={c}, sync CPU-bound handler; GIL "
            + ("enabled" if gil else "disabled"),
        )
    return out


# ---------------------------------------------------------------------------------------------
# W7 startup
# ---------------------------------------------------------------------------------------------


def start_bare(size, code):
    t0 = clock()
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(size)]
    codes = [p.wait() for p in procs]
    elapsed = clock() - t0
    if any(codes):
        raise RuntimeError(f"python -c {code!r} exited with {codes}")
    return elapsed


def start_kameo(kameo, size):
    async def run():
        t0 = clock()
        pool = kameo.Pool("bench_handlers:echo", size=size)
        await pool.start()
        elapsed = clock() - t0
        try:
            assert await pool.ask(MSG) == MSG
        finally:
            await pool.close()
        return elapsed

    return asyncio.run(asyncio.wait_for(run(), KAMEO_TIMEOUT_S))


def emit_startup(impl, samples_ns, size, **extra):
    ms = [s / 1e6 for s in samples_ns]
    return emit(
        "W7",
        impl,
        "startup_median",
        round(statistics.median(ms), 2),
        "ms",
        min_ms=round(min(ms), 2),
        max_ms=round(max(ms), 2),
        samples_ms=[round(x, 2) for x in ms],
        size=size,
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, sz):
        self.sz = sz
        self.results = {}

    def run(self, key, fn, *args):
        """Run one benchmark; an exception becomes an ``error`` line instead of aborting."""
        workload, impl = key
        try:
            rec = fn(*args)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            emit(workload, impl, "error", None, None, error=f"{type(exc).__name__}: {exc}")
            return None
        self.results[key] = rec
        return rec


def ratio(num, den):
    if num is None or den is None or not den:
        return None
    return round(num / den, 3)


def emit_summary(workload, name, value, target, ok_fn, **extra):
    passed = None if value is None else bool(ok_fn(value))
    emit(workload, "summary", name, value, "ratio", target=target, passed=passed, **extra)


def value_of(results, key):
    rec = results.get(key)
    return None if rec is None else rec["value"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (< 20 s)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads to run")
    ap.add_argument(
        "--pin",
        default=None,
        metavar="CPUS",
        help="pin this process (and so every child and worker it starts) to these CPUs, e.g. 0",
    )
    ap.add_argument(
        "--listener",
        action="store_true",
        help="W2 also with an event listener registered (kameo_listener, info)",
    )
    ap.add_argument("--raw-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--raw-stream-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.raw_child is not None:
        raw_child_main(args.raw_child)
        return 0
    if args.raw_stream_child is not None:
        raw_stream_child_main(args.raw_stream_child)
        return 0

    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {sorted(unknown)}")
    sz = SIZES["quick" if args.quick else "full"]
    if args.pin:
        # Before kameo is imported or anything is started: threads and processes inherit it.
        os.sched_setaffinity(0, {int(c) for c in args.pin.split(",")})

    kameo, kameo_err = load_kameo()
    emit_env(
        kameo,
        quick=args.quick,
        only=sorted(only),
        sizes=sz,
    )
    if kameo is None:
        print(f"bench_pool: kameo not importable, skipping kameo ({kameo_err})", file=sys.stderr)

    def skip(workload, impl):
        emit(workload, impl, "skipped", None, None, reason=f"import kameo failed: {kameo_err}")

    r = Runner(sz)
    t_start = time.monotonic()

    if "W1" in only:
        # The stdlib pools fork, so they go before anything kameo starts in this process.
        r.run(("W1", "ProcessPoolExecutor"), w1_ppe, sz)
        r.run(("W1", "multiprocessing.Pool"), w1_mp_pool, sz)
        recs = r.run(("W1", "raw_socketpair"), w1_interleaved, kameo, sz, kameo_err)
        for impl, rec in (recs or {}).items():
            r.results[("W1", impl)] = rec
        # On a VM a cross-CPU wakeup can cost tens of µs, and where the scheduler places the
        # processes changes from run to run: so W1 again with every process on one CPU (the
        # children and workers inherit the affinity of the thread that starts them).
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})
            try:
                recs = r.run(
                    ("W1_samecpu", "raw_socketpair"),
                    w1_interleaved,
                    kameo,
                    sz,
                    kameo_err,
                    "W1_samecpu",
                )
            finally:
                os.sched_setaffinity(0, set(cpus))
            for impl, rec in (recs or {}).items():
                r.results[("W1_samecpu", impl)] = rec

    if "W2" in only:
        r.run(("W2", "ProcessPoolExecutor"), w2_ppe, sz)
        r.run(("W2", "multiprocessing.Pool"), w2_mp_pool, sz)
        r.run(("W2", "asyncio_gather_floor"), w2_asyncio_floor, sz)
        r.run(("W2", "raw_socketpair"), w2_raw, sz)
        if kameo is not None:
            r.run(("W2", "kameo"), w2_kameo, kameo, sz)
            r.run(
                ("W2", "kameo_async_handler"),
                w2_kameo,
                kameo,
                sz,
                "kameo_async_handler",
                "bench_handlers:aecho",
            )
            if args.listener:
                r.run(
                    ("W2", "kameo_listener"),
                    w2_kameo,
                    kameo,
                    sz,
                    "kameo_listener",
                    "bench_handlers:echo",
                    True,
                )
        else:
            skip("W2", "kameo")
        r.run(("W2", "asyncio_socketpair"), w2_asyncio_socketpair, sz)

    if "W4" in only:
        recs = r.run(("W4", "raw_socketpair"), w4_interleaved, kameo, sz, kameo_err)
        for impl, rec in (recs or {}).items():
            r.results[("W4", impl)] = rec
        r.run(("W4", "ray"), w4_ray, sz)
        # Info: on one CPU the raw floor cannot overlap producer and consumer, and no wakeup
        # crosses CPUs; unpinned, both depend on where the scheduler puts the processes.
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})
            try:
                recs = r.run(
                    ("W4_samecpu", "raw_socketpair"),
                    w4_interleaved,
                    kameo,
                    sz,
                    kameo_err,
                    "W4_samecpu",
                )
            finally:
                os.sched_setaffinity(0, set(cpus))
            for impl, rec in (recs or {}).items():
                r.results[("W4_samecpu", impl)] = rec

    if "W5" in only:
        recs = r.run(("W5", "raw_socketpair"), w5_interleaved, kameo, sz, kameo_err)
        for impl, rec in (recs or {}).items():
            r.results[("W5", impl)] = rec
        # Same reason as W1_samecpu: one round trip per call, so cross-CPU wakeups dominate.
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})
            try:
                recs = r.run(
                    ("W5_samecpu", "raw_socketpair"),
                    w5_interleaved,
                    kameo,
                    sz,
                    kameo_err,
                    "W5_samecpu",
                )
            finally:
                os.sched_setaffinity(0, set(cpus))
            for impl, rec in (recs or {}).items():
                r.results[("W5_samecpu", impl)] = rec

    if "W8" in only:
        if kameo is None:
            skip("W8", "kameo_1_thread")
        else:
            recs = r.run(("W8", "kameo_1_thread"), w8_threads, kameo, sz)
            for c, rec in (recs or {}).items():
                r.results[("W8", "kameo_1_thread" if c == 1 else "kameo_2_threads")] = rec

    if "W7" in only:
        size = sz["w7_size"]
        bare_import, bare_pass, kameo_start = [], [], []
        try:
            # Interleave the three so that machine noise hits them alike.
            for _ in range(sz["w7_repeats"]):
                bare_pass.append(start_bare(size, "pass"))
                if kameo is not None:
                    bare_import.append(start_bare(size, "import kameo"))
                    kameo_start.append(start_kameo(kameo, size))
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            emit("W7", "kameo", "error", None, None, error=f"{type(exc).__name__}: {exc}")
        if bare_pass:
            r.results[("W7", "bare_python_pass")] = emit_startup(
                "bare_python_pass", bare_pass, size, note=f'{size}x python -c "pass" concurrently'
            )
        if kameo is None:
            skip("W7", "bare_import_kameo")
            skip("W7", "kameo")
        else:
            if bare_import:
                r.results[("W7", "bare_import_kameo")] = emit_startup(
                    "bare_import_kameo",
                    bare_import,
                    size,
                    note=f'{size}x python -c "import kameo" concurrently (Popen all, wait all)',
                )
            if kameo_start and len(kameo_start) == len(bare_import):
                r.results[("W7", "kameo")] = emit_startup(
                    "kameo",
                    kameo_start,
                    size,
                    note=f"kameo.Pool(size={size}) construct + await start()",
                )

    res = r.results
    if "W1" in only:
        for wl, target in (("W1", "<= 1.3"), ("W1_samecpu", "<= 1.3 (info: all on one CPU)")):
            if not any(k[0] == wl for k in res):
                continue
            raw = value_of(res, (wl, "raw_socketpair"))
            emit_summary(
                wl,
                "kameo_p50/raw_p50",
                ratio(value_of(res, (wl, "kameo")), raw),
                target,
                lambda v: v <= 1.3,
            )
            emit_summary(
                wl,
                "kameo_p50/asyncio_socketpair_p50",
                ratio(value_of(res, (wl, "kameo")), value_of(res, (wl, "asyncio_socketpair"))),
                "info",
                lambda v: True,
            )
            emit_summary(
                wl,
                "kameo_async_handler_p50/raw_p50",
                ratio(value_of(res, (wl, "kameo_async_handler")), raw),
                "info",
                lambda v: True,
            )
    if "W2" in only:
        kameo_tp = value_of(res, ("W2", "kameo"))
        emit_summary(
            "W2",
            "kameo/raw",
            ratio(kameo_tp, value_of(res, ("W2", "raw_socketpair"))),
            ">= 0.5",
            lambda v: v >= 0.5,
        )
        for ref in ("asyncio_socketpair", "asyncio_gather_floor"):
            emit_summary(
                "W2",
                f"kameo/{ref}",
                ratio(kameo_tp, value_of(res, ("W2", ref))),
                "info",
                lambda v: True,
            )
        emit_summary(
            "W2",
            "kameo_async_handler/raw",
            ratio(
                value_of(res, ("W2", "kameo_async_handler")),
                value_of(res, ("W2", "raw_socketpair")),
            ),
            "info",
            lambda v: True,
        )
        pools = {
            k[1]: v["value"]
            for k, v in res.items()
            if k[0] == "W2" and k[1] in ("ProcessPoolExecutor", "multiprocessing.Pool")
        }
        best = max(pools, key=pools.get) if pools else None
        emit_summary(
            "W2",
            "kameo/best_stdlib_pool",
            ratio(kameo_tp, pools.get(best)),
            "> 1 (info)",
            lambda v: v > 1,
            best_pool=best,
        )
    if "W4" in only:
        for wl, info in (("W4", ""), ("W4_samecpu", " (info: all on one CPU)")):
            if not any(k[0] == wl for k in res):
                continue
            raw = value_of(res, (wl, "raw_socketpair"))
            emit_summary(
                wl,
                "kameo/raw",
                ratio(value_of(res, (wl, "kameo")), raw),
                ">= 0.5" + info,
                lambda v: v >= 0.5,
            )
            for impl in (
                "kameo_async_gen",
                "kameo_window4096",
                "kameo_async_gen_window4096",
                "ray",
            ):
                if res.get((wl, impl)) is not None:
                    emit_summary(
                        wl,
                        f"{impl}/raw",
                        ratio(value_of(res, (wl, impl)), raw),
                        "info",
                        lambda v: True,
                    )
    if "W5" in only:
        for wl, info in (("W5", ""), ("W5_samecpu", " (info: all on one CPU)")):
            if not any(k[0] == wl for k in res):
                continue
            kameo_rate = value_of(res, (wl, "kameo"))
            emit_summary(
                wl,
                "kameo/raw",
                ratio(kameo_rate, value_of(res, (wl, "raw_socketpair"))),
                ">= 0.7" + info,
                lambda v: v >= 0.7,
            )
            emit_summary(
                wl,
                "kameo/multiprocessing.Manager",
                ratio(kameo_rate, value_of(res, (wl, "multiprocessing.Manager"))),
                "> 1" + info,
                lambda v: v > 1,
            )
            if res.get((wl, "kameo_async_worker")) is not None:
                emit_summary(
                    wl,
                    "kameo_async_worker/raw",
                    ratio(
                        value_of(res, (wl, "kameo_async_worker")),
                        value_of(res, (wl, "raw_socketpair")),
                    ),
                    ">= 0.7" + info,
                    lambda v: v >= 0.7,
                )
            if res.get((wl, "kameo_sync_parent_handler")) is not None:
                emit_summary(
                    wl,
                    "kameo_sync_parent_handler/raw",
                    ratio(
                        value_of(res, (wl, "kameo_sync_parent_handler")),
                        value_of(res, (wl, "raw_socketpair")),
                    ),
                    "info",
                    lambda v: True,
                )
    if "W7" in only:
        emit_summary(
            "W7",
            "kameo/bare_import_kameo",
            ratio(value_of(res, ("W7", "kameo")), value_of(res, ("W7", "bare_import_kameo"))),
            "<= 1.5",
            lambda v: v <= 1.5,
        )
    if "W8" in only and res.get(("W8", "kameo_1_thread")) is not None:
        free = not getattr(sys, "_is_gil_enabled", lambda: True)()
        emit_summary(
            "W8",
            "kameo_2_threads/kameo_1_thread",
            ratio(
                value_of(res, ("W8", "kameo_2_threads")), value_of(res, ("W8", "kameo_1_thread"))
            ),
            ">= 1.6 (free-threaded)" if free else "info (the GIL is enabled)",
            (lambda v: v >= 1.6) if free else (lambda v: True),
        )
    emit("total", "bench_pool", "wall_time", round(time.monotonic() - t_start, 2), "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
