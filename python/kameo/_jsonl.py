"""Worker side of ``kameo map`` (the command line, :mod:`kameo.cli`): JSON lines in blocks.

The parent never parses JSON: it sends each worker a *block* of whole input lines (bytes) and
the number of its first line, and writes back the bytes :func:`run_block` returns: one JSON
line per non-blank input line, in input order. Each line is decoded, given to the target
function, and its result encoded; an error of one line (malformed JSON, the function raised,
a result JSON cannot encode) is handled as the parent's ``--on-error`` says:

* ``stop``: the block ends at the first error; the output of the lines before it comes back
  with that error;
* ``skip``: the line is left out;
* ``record``: ``{"error": {"type": ..., "message": ..., "line": n}}`` is written in its place.

Blank lines give no output, and keep their number. The parent calls :func:`check` once, before
it reads any input, so that a target the workers cannot import fails up front.

A worker running these functions writes what the target prints to its stderr rather than its
stdout (:func:`_prepare`): the worker inherits the parent's stdout, which may be the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import json.decoder
import json.encoder
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from kameo import _calls, _error_info
from kameo._handler import ASYNCGEN, GEN, handler_kind

__all__ = ["RECORD", "SKIP", "STOP", "check", "run_block"]

STOP = "stop"
SKIP = "skip"
RECORD = "record"

#: What :func:`run_block` answers: the output bytes, how many lines failed, the first error
#: (an error-info dict with ``line``, or None) and the seconds the lines took.
BlockResult = tuple[bytes, int, "dict[str, Any] | None", float]

# Targets already loaded in this worker, by name.
_functions: dict[str, Callable[[Any], Any]] = {}
_stdout_moved = False


def check(target: str) -> None:
    """Import ``target`` and check that ``kameo map`` can call it (raises the error of
    :func:`kameo._calls.load`, or a TypeError)."""
    _function(target)


def run_block(job: tuple[str, bytes, int, str]) -> BlockResult:
    """``job``: (target, block of whole lines, number of its first line, on_error mode)."""
    target, block, first, mode = job
    fn = _functions.get(target)
    if fn is None:
        fn = _function(target)
    started = time.perf_counter()
    try:
        lines: list[Any] = block.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = [_decode(raw) for raw in block.split(b"\n")]
    if lines and not lines[-1]:
        lines.pop()  # after the last newline
    out: list[str] = []
    append, scan, encode, join = out.append, _scan, _encode, "".join
    errors = _Errors(mode, out)
    n = first - 1
    for line in lines:
        n += 1
        try:
            try:
                record, end = scan(line, 0)
                parsed = end == len(line) or not line[end:].strip()
            except Exception:
                parsed = False
            if not parsed:
                record = _parse(line)  # the slow path: blank, spaced or malformed
                if record is _BLANK:
                    continue
            append(join(encode(fn(record), 0)))
        except Exception as exc:
            if errors.add(exc, n):
                break
    return _join(out), errors.count, errors.first, time.perf_counter() - started


class _Errors:
    """The failed lines of a block: how many, the first, and what ``mode`` does with each."""

    __slots__ = ("count", "first", "mode", "out")

    def __init__(self, mode: str, out: list[str]) -> None:
        self.mode = mode
        self.out = out
        self.count = 0
        self.first: dict[str, Any] | None = None

    def add(self, exc: BaseException, line: int) -> bool:
        """Line ``line`` failed with ``exc``; True if the block stops here."""
        info = _info(exc, line)
        self.count += 1
        if self.first is None:
            self.first = info
        if self.mode == STOP:
            return True
        if self.mode == RECORD:
            self.out.append(error_line(info))
        return False


# ------------------------------------------------------------------------------ the target


def _function(target: str) -> Callable[[Any], Any]:
    """Load ``target`` once per worker: a callable of one argument (a coroutine function runs
    on a loop of this worker's own)."""
    _prepare()
    obj = _calls.load(target)
    if not callable(obj):
        raise TypeError(f"target {target!r} is not callable (it is {type(obj).__name__})")
    kind = handler_kind(obj)
    if kind in (GEN, ASYNCGEN):
        raise TypeError(
            f"target {target!r} is a generator function: kameo map needs one result per line"
        )
    fn: Callable[[Any], Any] = obj
    if inspect.iscoroutinefunction(obj):
        fn = _on_own_loop(obj)
    _functions[target] = fn
    return fn


def _on_own_loop(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    loop = asyncio.new_event_loop()

    def call(record: Any) -> Any:
        return loop.run_until_complete(fn(record))

    return call


def _prepare() -> None:
    """Once per worker: what the target prints goes to this worker's stderr (the parent logs
    it), not to the stdout it inherited, which may be the command's output."""
    global _stdout_moved
    if _stdout_moved:
        return
    _stdout_moved = True
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.dup2(2, 1)


# ------------------------------------------------------------------------------ decoding


class _Malformed(ValueError):
    """An input line that is not one JSON value (``type_name``: what to call the error)."""

    def __init__(self, message: str, type_name: str) -> None:
        super().__init__(message)
        self.type_name = type_name


_decoder = json.JSONDecoder()
# The C scanner behind json.loads, without its regular-expression passes for whitespace:
# (value, end) for a line that starts with a value, else StopIteration.
_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


class _Blank:
    pass


_BLANK = _Blank()


class _BadBytes:
    """A line that is not UTF-8."""

    __slots__ = ("error",)

    def __init__(self, error: UnicodeDecodeError) -> None:
        self.error = error


def _decode(raw: bytes) -> str | _BadBytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _BadBytes(exc)


def _parse(line: str | _BadBytes) -> Any:
    """A line the fast path did not take: its value, :data:`_BLANK`, or :class:`_Malformed`."""
    if isinstance(line, _BadBytes):
        error = line.error
        raise _Malformed(
            f"malformed input: not UTF-8 ({error.reason} at byte {error.start + 1})",
            "UnicodeDecodeError",
        )
    if not line.strip():
        return _BLANK
    try:
        return _decoder.decode(line)
    except json.JSONDecodeError as exc:
        raise _Malformed(
            f"malformed JSON: {exc.msg} (column {exc.colno})", "json.decoder.JSONDecodeError"
        ) from None


# ------------------------------------------------------------------------------ encoding


def _default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _make_encoder() -> Callable[[Any, int], Any]:
    """The C encoder behind json.dumps, made once (json.dumps with options makes a new
    JSONEncoder, and encode() a new C encoder, for every call): compact, UTF-8 as is, and no
    circular-reference marks (a tenth of the cost): a circular result fails with RecursionError."""
    make = getattr(json.encoder, "c_make_encoder", None)
    quote = getattr(json.encoder, "c_encode_basestring", None)
    if make is not None and quote is not None:
        enc: Callable[[Any, int], Any] = make(
            None, _default, quote, None, ":", ",", False, False, True
        )
        return enc
    py = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, check_circular=False, default=_default
    )

    def encode(obj: Any, _level: int) -> tuple[str]:
        return (py.encode(obj),)

    return encode


_encode = _make_encoder()


def _join(out: list[str]) -> bytes:
    if not out:
        return b""
    text = "\n".join(out)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape): write it escaped
        return b"".join(_ascii_line(s) for s in out)


def _ascii_line(line: str) -> bytes:
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        value = json.loads(line)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


# ------------------------------------------------------------------------------ errors


def type_label(type_name: str) -> str:
    """``builtins.ValueError`` -> ``ValueError``; other names keep their module."""
    return type_name.removeprefix("builtins.")


def _info(exc: BaseException, line: int) -> dict[str, Any]:
    if isinstance(exc, _Malformed):
        info: dict[str, Any] = _error_info.make(_error_info.REMOTE, str(exc), exc.type_name)
        exc.__traceback__ = None
    else:
        tb = exc.__traceback__
        if tb is not None and tb.tb_frame.f_code is run_block.__code__ and tb.tb_next:
            exc = exc.with_traceback(tb.tb_next)  # start the traceback in the target
        info = dict(_error_info.from_exception(exc))
    info["line"] = line
    return info


def error_line(info: dict[str, Any]) -> str:
    error = {
        "type": type_label(info[_error_info.TYPE]),
        "message": info[_error_info.MESSAGE],
        "line": info["line"],
    }
    return json.dumps({"error": error}, separators=(",", ":"), ensure_ascii=False)
