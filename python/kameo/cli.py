"""The ``kameo`` command line (also ``python -m kameo``)::

    kameo map pkg.mod:f [-i in.jsonl] [-o out.jsonl] [-w N] [--unordered]
              [--progress | --no-progress] [--on-error stop|skip|record] [--timeout S]
    kameo doctor [--json]
    kameo --version

``kameo map`` reads JSON lines (stdin by default, or ``-i``; ``-`` is stdin), calls ``f(record)``
in a pool of ``-w`` workers for each line, and writes one JSON line per non-blank input line
(stdout by default, or ``-o``; ``-`` is stdout), in input order unless ``--unordered``.

How it runs: the parent never parses JSON. A reader thread reads the input in chunks of whole
lines (:data:`CHUNK_BYTES`) and counts their lines; the parent cuts them into *blocks* and sends
each to a worker (``kameo._jsonl.run_block``), which decodes, calls and encodes every line and
answers with the block's output bytes; the parent writes them as they come (in order, or as
blocks finish). Blocks adapt to the cost of a line: about :data:`BLOCK_SECONDS` of work each,
so slow functions go a line at a time over every worker and fast ones in whole chunks.

Errors (``--on-error``): ``stop`` (the default) ends at the first failing line: the output of the
lines before it is written (in order mode, exactly those), the error is printed on stderr with
its line number and the remote traceback, exit status 1. ``skip`` leaves failing lines out and
``record`` writes ``{"error": {"type": ..., "message": ..., "line": n}}`` in their place; both
end with status 0 and a one-line count on stderr. A malformed line is an error of that line.
``--timeout S`` gives a block of n lines n*S seconds (with a timeout, blocks hold at most
:data:`TIMEOUT_MAX_LINES` lines); a block that times out (or whose worker dies) is an error of
each of its lines, reported with the block's line range.

Exit status: 0 done; 1 a line failed with ``--on-error stop``, or the run failed (workers could
not start, the output could not be written, a read error); 2 the command could not start (bad
flags, a target that is not ``module:function`` or that the workers cannot import or call, an
input or output file that cannot be opened, ``--progress`` without tqdm), before any input is
read; 130 interrupted (SIGINT): the output so far is flushed and the workers are stopped.

``kameo doctor`` checks this machine and interpreter (the kernel features kameo uses, the fd
limit, the optional extras, a real 1-worker pool) and prints one line per check, or one JSON
object with ``--json``; exit status 1 when a required check fails (:mod:`kameo._doctor`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import stat
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from kameo import _jsonl
from kameo._jsonl import type_label as _label

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "kameo"
RUN_BLOCK = "kameo._jsonl:run_block"
CHECK = "kameo._jsonl:check"
#: What the reader thread reads at a time; a chunk is this much input cut at its last newline.
CHUNK_BYTES = 1 << 16
#: Chunks read ahead of the blocks sent.
READ_AHEAD = 16
#: The work a block should hold, from the measured seconds per line.
BLOCK_SECONDS = 0.01
#: With --timeout, the most lines in one block (its timeout is lines * S).
TIMEOUT_MAX_LINES = 64
#: Blocks in flight per worker (without --timeout; with it, one: its clock runs from the send).
RUNNING_PER_WORKER = 4
#: Blocks sent or answered but not yet written, per worker (in order mode, behind a slow one).
OUTSTANDING_PER_WORKER = 16
#: How long a worker may take to import the target (the check before the input is read).
CHECK_TIMEOUT = 60.0


class UsageError(Exception):
    """The command cannot start (exit status 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command == "doctor":
        from kameo import _doctor  # only the command imports it

        try:
            return _doctor.main(as_json_output=args.json)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    if args.command != "map":
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _map(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    import kameo

    parser = argparse.ArgumentParser(
        prog=PROG, description="kameo: pools of Python worker processes."
    )
    parser.add_argument("--version", action="version", version=f"kameo {kameo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    m = sub.add_parser(
        "map",
        help="call a function on each JSON line, in worker processes",
        description="Read JSON lines, call module:function on each record in worker "
        "processes, write one JSON line per input line (blank lines give none).",
    )
    m.add_argument("target", metavar="module:function", help="the function, e.g. pkg.mod:f")
    m.add_argument("-i", "--input", default="-", help="input file (default: stdin, or -)")
    m.add_argument("-o", "--output", default="-", help="output file (default: stdout, or -)")
    m.add_argument(
        "-w", "--workers", type=_positive_int, default=None, help="worker processes (default: CPUs)"
    )
    m.add_argument(
        "--unordered", action="store_true", help="write results as they finish, not in input order"
    )
    bar = m.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal; needs tqdm)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no bar")
    m.add_argument(
        "--on-error",
        choices=("stop", "skip", "record"),
        default="stop",
        help="a failing line: stop (exit 1), skip it, or record an error object in its place",
    )
    m.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="seconds allowed per line (a block of n lines gets n*S)",
    )
    d = sub.add_parser(
        "doctor",
        help="check that this machine can run kameo pools",
        description="Check what kameo needs here (versions, memfd with seals, SCM_RIGHTS, "
        "pidfd, PR_SET_PDEATHSIG, the fd limit, uv and the optional extras) and run a real "
        "1-worker pool (start, an ask, a stream, a callback, shared memory) with its timings. "
        "Exit status 1 when a required check fails.",
    )
    d.add_argument(
        "--json", action="store_true", help='print one JSON object: {"ok": ..., "checks": [...]}'
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _error(message: str) -> None:
    print(f"{PROG} map: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------- kameo map


@dataclass
class MapJob:
    target: str
    fd: int
    out: IO[bytes]
    workers: int | None
    ordered: bool
    on_error: str
    timeout: float | None
    progress: bool
    bar: Any = None


def _map(args: argparse.Namespace) -> int:
    module, sep, function = args.target.partition(":")
    if not sep or not module or not function:
        _error(f"the target must be 'module:function', got {args.target!r}")
        return EXIT_USAGE
    # As `python -m` does: modules in the current directory are importable (by the workers too,
    # which get this process's sys.path).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    opened: list[Any] = []
    try:
        try:
            fd = _open_input(args.input, opened)
            out = _open_output(args.output, fd, opened)
            progress = _want_bar(args.progress)
        except UsageError as exc:
            _error(str(exc))
            return EXIT_USAGE
        job = MapJob(
            args.target,
            fd,
            out,
            args.workers,
            not args.unordered,
            args.on_error,
            args.timeout,
            progress,
        )
        try:
            return asyncio.run(_run(job))
        finally:
            if job.bar is not None:
                job.bar.close()
            _flush(out)
    finally:
        for f in opened:
            with contextlib.suppress(OSError):
                f() if callable(f) else f.close()


def _open_input(path: str, opened: list[Any]) -> int:
    if path == "-":
        if sys.stdin is None:
            raise UsageError("there is no stdin to read (use -i FILE)")
        return sys.stdin.fileno()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open the input {path!r}: {exc.strerror}") from None
    opened.append(lambda: os.close(fd))
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise UsageError(f"the input {path!r} is a directory")
    return fd


def _open_output(path: str, in_fd: int, opened: list[Any]) -> IO[bytes]:
    if path == "-":
        if sys.stdout is None:
            raise UsageError("there is no stdout to write (use -o FILE)")
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        return sys.stdout.buffer
    with contextlib.suppress(OSError):
        st, ist = os.stat(path), os.fstat(in_fd)
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (ist.st_dev, ist.st_ino):
            raise UsageError(f"the output {path!r} is the input: it would be overwritten")
    try:
        out = open(path, "wb")  # noqa: SIM115 (closed by _map)
    except OSError as exc:
        raise UsageError(f"cannot open the output {path!r}: {exc.strerror}") from None
    opened.append(out)
    return out


def _want_bar(progress: bool | None) -> bool:
    """A progress bar on stderr: forced (--progress: tqdm must be there), off, or when stderr
    is a terminal and tqdm is installed."""
    forced = progress is not None
    if progress is None:
        try:
            progress = sys.stderr is not None and sys.stderr.isatty()
        except (AttributeError, ValueError):
            progress = False
    if not progress:
        return False
    try:
        __import__("tqdm")
    except ImportError:
        if not forced:
            return False
        raise UsageError(
            "--progress needs tqdm, which is not installed: pip install 'kameo[progress]' "
            "(or pip install tqdm)"
        ) from None
    return True


def _count_lines(fd: int) -> int | None:
    """The lines left in ``fd`` if it is a regular file (read ahead with pread: its offset
    stays), else None."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        count, last = 0, b"\n"
        while pos < st.st_size:
            data = os.pread(fd, 1 << 20, pos)
            if not data:
                break
            count += data.count(b"\n")
            last = data[-1:]
            pos += len(data)
        return count + (last != b"\n")
    except OSError:
        return None


def _flush(out: IO[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        out.flush()


async def _run(job: MapJob) -> int:
    import kameo

    try:
        pool = kameo.Pool(None, size=job.workers)
        await pool.start()
    except kameo.WorkerStartupError as exc:
        _error(f"the workers could not start: {exc}")
        return EXIT_FAILED
    try:
        try:
            await pool.function(CHECK, timeout=CHECK_TIMEOUT)(job.target)
        except kameo.RemoteError as exc:
            _target_error(job.target, exc)
            return EXIT_USAGE
        except kameo.CallTimeout:
            _error(f"importing {job.target!r} took longer than {CHECK_TIMEOUT:g} s")
            return EXIT_USAGE
        except kameo.KameoError as exc:  # the worker died importing it, say
            _error(f"cannot use {job.target!r}: {exc}")
            return EXIT_USAGE
        return await Driver(pool, job).run()
    finally:
        # Interrupted (a cancelled task) or failed: what is in flight is cancelled and the
        # workers stopped at once; after a clean run they have nothing left and just exit.
        await pool.close(grace=0)


def _target_error(target: str, exc: Any) -> None:
    """The check failed: the message of kameo's own checks, or the traceback of an error the
    module raised while it was imported."""
    message: str = exc.remote_message
    ours = message.startswith(f"target {target!r}")
    message = message.removeprefix(f"target {target!r}: ")
    _error(f"cannot use {target!r}: {message} ({_label(exc.remote_type)})")
    if not ours:
        print(exc.remote_traceback.rstrip("\n"), file=sys.stderr)


# ------------------------------------------------------------------------------ the reader


class Reader:
    """A daemon thread reading ``fd`` (``os.read``: no buffered object whose lock it could hold
    at exit) into chunks of whole lines, at most :data:`READ_AHEAD` ahead. The loop thread
    takes them with :meth:`take`; ``wake`` is called on the loop when one arrives while it
    waits. Reading off the loop keeps it free to write answers and to see Ctrl-C while the
    input (a pipe, a terminal) has nothing to give."""

    EOF = (b"", -1)

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, wake: Any) -> None:
        self._fd = fd
        self._loop = loop
        self._wake = wake
        self._lock = threading.Lock()
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._room = threading.Semaphore(READ_AHEAD)
        self._eof = False
        self._waiting = False
        self._stopped = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._read, name="kameo-map-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> tuple[bytes, int] | None:
        """The next chunk and its line count, :data:`EOF` at the end, None if none is there yet
        (then ``wake`` is called when one comes)."""
        with self._lock:
            if self._chunks:
                item = self._chunks.popleft()
            elif self._eof:
                return self.EOF
            else:
                self._waiting = True
                return None
        self._room.release()
        return item

    def stop(self) -> None:
        self._stopped = True
        self._room.release()  # a thread waiting for room goes on and sees the flag

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _read(self) -> None:
        fd, size = self._fd, CHUNK_BYTES
        carry: list[bytes] = []  # an unfinished line
        try:
            while True:
                self._room.acquire()
                if self._stopped:
                    return
                data = os.read(fd, size)
                if not data:
                    break
                cut = data.rfind(b"\n") + 1
                if not cut:
                    carry.append(data)
                    self._room.release()
                    continue
                chunk = data if cut == len(data) else data[:cut]
                if carry:
                    carry.append(chunk)
                    chunk = b"".join(carry)
                    carry = []
                if cut != len(data):
                    carry.append(data[cut:])
                self._push(chunk, chunk.count(b"\n"))
            if carry:
                self._push(b"".join(carry) + b"\n", 1)  # the last line had no newline
        except OSError as exc:
            self.error = exc
        finally:
            with self._lock:
                self._eof = True
                waiting, self._waiting = self._waiting, False
            if waiting:
                self._notify()

    def _push(self, chunk: bytes, lines: int) -> None:
        with self._lock:
            self._chunks.append((chunk, lines))
            waiting, self._waiting = self._waiting, False
        if waiting:
            self._notify()

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._wake)


# ------------------------------------------------------------------------------ the driver


class _Block:
    __slots__ = ("data", "first", "fut", "lines")

    def __init__(self, first: int, data: bytes, lines: int) -> None:
        self.first = first
        self.data = data
        self.lines = lines
        self.fut: Any = None

    def span(self) -> str:
        last = self.first + self.lines - 1
        return f"line {self.first}" if last == self.first else f"lines {self.first}-{last}"


@dataclass
class _Failure:
    """What ended a run (--on-error stop, or the output)."""

    message: str
    traceback: str = ""
    code: int = EXIT_FAILED


class Driver:
    """Sends blocks to the pool and writes their answers, within a window."""

    def __init__(self, pool: Any, job: MapJob) -> None:
        self.pool = pool
        self.job = job
        workers = max(1, pool.size)
        timed = job.timeout is not None
        self.max_running = workers if timed else RUNNING_PER_WORKER * workers
        self.max_outstanding = OUTSTANDING_PER_WORKER * workers
        self.max_lines = TIMEOUT_MAX_LINES if timed else 1 << 30
        self.block_lines = 1  # until a first answer says what a line costs
        self.per_line: float | None = None
        self.queue: deque[_Block] = deque()  # sent, not written (in order)
        self.ready: deque[_Block] = deque()  # answered, not written (unordered)
        self.flying: set[_Block] = set()  # sent, not answered
        self.chunk: bytes | None = None
        self.chunk_lines = 0
        self.pos = 0
        self.next_line = 1
        self.eof = False
        self.errors = 0
        self.first_error: tuple[int, str] | None = None  # (line, text) for the summary
        self.failure: _Failure | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reader: Reader | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if self.job.progress:
            from kameo import _progress

            total = _count_lines(self.job.fd)
            self.job.bar = _progress.bar(total, file=sys.stderr, unit="lines", desc="kameo map")
        reader = self.reader = Reader(self.job.fd, loop, self._wake)
        reader.start()
        try:
            while True:
                # Write what is answered first, then send: sending first could find the window
                # full of answered blocks, which the write then empties, and nothing in flight
                # would be left to wake this loop (seen as a hang under load).
                self._deliver()
                if self.failure is not None:
                    break
                self._fill()
                if self.eof and not self.queue and not self.flying and not self.ready:
                    break
                self.waiter = loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
        finally:
            self._stop()
        if self.failure is None and reader.error is not None:
            self.failure = _Failure(f"cannot read the input: {reader.error.strerror}")
        if self.job.bar is not None:
            self.job.bar.close()
        return self._report()

    def _report(self) -> int:
        failure = self.failure
        if failure is not None:
            if failure.message:
                print(f"{PROG} map: {failure.message}", file=sys.stderr)
            if failure.traceback:
                print(failure.traceback.rstrip("\n"), file=sys.stderr)
            return failure.code
        if self.errors and self.first_error is not None:
            line, text = self.first_error
            done = "skipped" if self.job.on_error == "skip" else "recorded"
            many = "line" if self.errors == 1 else "lines"
            print(
                f"{PROG} map: {self.errors} {many} failed ({done}); the first: line {line}: {text}",
                file=sys.stderr,
            )
        return EXIT_OK

    def _stop(self) -> None:
        """Cancel what is in flight, stop reading, write what was written."""
        for block in self.flying:
            block.fut.cancel()
        self.flying.clear()
        if self.reader is not None:
            self.reader.stop()
            self.reader.join(0.2)  # a file ends at once; a pipe may be left to the process exit
        _flush(self.job.out)

    def _wake(self, *_: Any) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- sending

    def _fill(self) -> None:
        job = self.job
        ordered = job.ordered
        while len(self.flying) < self.max_running:
            outstanding = len(self.queue) if ordered else len(self.flying) + len(self.ready)
            if outstanding >= self.max_outstanding:
                return
            block = self._next_block()
            if block is None:
                return
            timeout = None if job.timeout is None else job.timeout * block.lines
            fut = self.pool.function(RUN_BLOCK, timeout=timeout)(
                (job.target, block.data, block.first, job.on_error)
            )
            block.fut = fut
            self.flying.add(block)
            if ordered:
                self.queue.append(block)
            fut.add_done_callback(lambda _f, b=block: self._answered(b))

    def _next_block(self) -> _Block | None:
        if self.chunk is None:
            if self.eof or self.reader is None:
                return None
            item = self.reader.take()
            if item is None:
                return None
            if item is Reader.EOF:
                self.eof = True
                return None
            self.chunk, self.chunk_lines = item
            self.pos = 0
        chunk, pos = self.chunk, self.pos
        want = min(self.block_lines, self.max_lines)
        if want >= self.chunk_lines:
            data = chunk[pos:] if pos else chunk
            lines = self.chunk_lines
            self.chunk = None
        else:
            end = pos
            for _ in range(want):
                end = chunk.index(b"\n", end) + 1
            data = chunk[pos:end]
            self.pos = end
            self.chunk_lines -= want
            lines = want
        block = _Block(self.next_line, data, lines)
        self.next_line += lines
        return block

    def _answered(self, block: _Block) -> None:
        if block not in self.flying:
            return  # cancelled
        self.flying.discard(block)
        if not self.job.ordered:
            self.ready.append(block)
        self._wake()

    # -- writing

    def _deliver(self) -> None:
        wrote = False
        try:
            while self.failure is None:
                if self.job.ordered:
                    if not self.queue or not self.queue[0].fut.done():
                        break
                    block = self.queue.popleft()
                else:
                    if not self.ready:
                        break
                    block = self.ready.popleft()
                wrote = self._finish(block) or wrote
            if wrote:
                self.job.out.flush()
        except BrokenPipeError:
            # The reader of the output went away (`| head`): stop quietly.
            self.failure = _Failure("")
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.job.out.fileno())
                os.close(devnull)
        except OSError as exc:
            self.failure = _Failure(f"cannot write the output: {exc.strerror or exc}")

    def _finish(self, block: _Block) -> bool:
        """Write one answered block; True if something was written."""
        fut, job = block.fut, self.job
        exc = None if fut.cancelled() else fut.exception()
        wrote = False
        if fut.cancelled() or exc is not None:
            self._block_failed(block, exc)
        else:
            data, errors, info, seconds = fut.result()
            if data:
                job.out.write(data)
                wrote = True
            if errors:
                self._line_failed(errors, info)
            elif block.lines:
                self._measure(block.lines, seconds)
        if job.bar is not None:
            job.bar.update(block.lines)
        return wrote

    def _line_failed(self, errors: int, info: dict[str, Any]) -> None:
        line = int(info["line"])
        text = f"{_label(info['type'])}: {info['message']}"
        if self.job.on_error == "stop":
            self.failure = _Failure(f"line {line}: {text}", str(info.get("traceback") or ""))
            return
        self.errors += errors
        if self.first_error is None or line < self.first_error[0]:
            self.first_error = (line, text)

    def _block_failed(self, block: _Block, exc: BaseException | None) -> None:
        """The block as a whole failed (a timeout, its worker died): an error of each line."""
        import kameo

        if exc is None:
            type_name, message = "CancelledError", "the block was cancelled"
        elif isinstance(exc, kameo.CallTimeout):
            assert self.job.timeout is not None
            type_name = "kameo.errors.CallTimeout"
            budget, per_line = self.job.timeout * block.lines, self.job.timeout
            message = f"not done within {budget:g} s (--timeout {per_line:g})"
            if block.lines > 1:
                message = (
                    f"the block of {block.span()} was not done within {budget:g} s "
                    f"({block.lines} lines, --timeout {per_line:g} s per line)"
                )
        else:
            type_name = getattr(exc, "remote_type", None) or (
                f"{type(exc).__module__}.{type(exc).__qualname__}"
            )
            message = getattr(exc, "remote_message", None) or str(exc)
        label = _label(type_name)
        if self.job.on_error == "stop":
            tb = getattr(exc, "remote_traceback", "") or ""
            self.failure = _Failure(f"{block.span()}: {label}: {message}", tb)
            return
        numbers = [
            block.first + i
            for i, raw in enumerate(block.data.split(b"\n")[: block.lines])
            if raw.strip()
        ]
        if not numbers:
            return
        self.errors += len(numbers)
        text = f"{label}: {message}"
        if self.first_error is None or numbers[0] < self.first_error[0]:
            self.first_error = (numbers[0], text)
        if self.job.on_error == "record":
            lines = [
                _jsonl.error_line({"type": type_name, "message": message, "line": n})
                for n in numbers
            ]
            self.job.out.write(("\n".join(lines) + "\n").encode("utf-8", "backslashreplace"))

    def _measure(self, lines: int, seconds: float) -> None:
        """The block size from the seconds per line the workers measure."""
        per_line = seconds / lines
        est = self.per_line
        est = per_line if est is None else 0.7 * est + 0.3 * per_line
        self.per_line = est
        self.block_lines = max(1, int(BLOCK_SECONDS / max(est, 1e-9)))
