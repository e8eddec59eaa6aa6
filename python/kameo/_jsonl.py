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

Two paths give the same bytes: json's C scanner and encoder (the stdlib path), and orjson where
it is installed (``kameo[json]``; about twice as fast), each line falling back to json where
orjson would read or write it otherwise (the orjson path, below). ``KAMEO_JSONL_STDLIB=1`` in
a worker's environment forces the stdlib path.

Blank lines give no output, and keep their number. The parent calls :func:`check` once, before
it reads any input, so that a target the workers cannot import fails up front.

A worker running these functions writes what the target prints to its stderr rather than its
stdout (:func:`_prepare`): the worker inherits the parent's stdout, which may be the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
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
    if _orjson is not None:
        done = _run_orjson(fn, block, first, mode)
        if done is not None:
            return done[0], done[1].count, done[1].first, time.perf_counter() - started
    try:
        lines: list[Any] = block.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = [_decode(raw) for raw in block.split(b"\n")]
    if lines and not lines[-1]:
        lines.pop()  # after the last newline
    out: list[str] = []
    append, scan, encode, join = out.append, _scan, _encode, "".join
    errors = _Errors(mode, append)
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
    """The failed lines of a block: how many, the first, and what ``mode`` does with each
    (``append`` takes the error line of ``record``)."""

    __slots__ = ("append", "count", "first", "mode")

    def __init__(self, mode: str, append: Callable[[str], Any]) -> None:
        self.mode = mode
        self.append = append
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
            self.append(error_line(info))
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


def _line_bytes(line: str) -> bytes:
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return _ascii_line(line)


# ------------------------------------------------------------------------------ the orjson path

#: Set (to anything but "" or "0") in a worker's environment: the stdlib path even where orjson
#: is installed (the tests run the CLI on both paths).
STDLIB_ENV = "KAMEO_JSONL_STDLIB"


def _load_orjson() -> Any:
    if os.environ.get(STDLIB_ENV, "") not in ("", "0"):
        return None
    try:  # by name: importing kameo never needs it, nor does type-checking kameo
        return importlib.import_module("orjson")
    except ImportError:
        return None


_orjson = _load_orjson()
#: Which path :func:`run_block` takes in this process: "orjson" or "stdlib".
JSON_PATH = "stdlib" if _orjson is None else "orjson"

# Where orjson's answer could differ from the stdlib path's, the line takes the stdlib path
# (decoding, encoding or both): the output is the same bytes either way.
#
# Decoding. orjson refuses what json accepts (NaN, Infinity, numbers beyond a double, lone
# surrogate escapes, ...) and refuses what json refuses with other messages: on any orjson
# error the line is decoded again by the stdlib path. Two things orjson takes that json does
# not take the same way: integers beyond 64 bits (orjson makes them floats) and nesting deeper
# than the C scanner's recursion limit (orjson goes to 1024). A line with an integer of 19
# digits or more is decoded by json; a block with a line of _DEEP brackets or more takes the
# stdlib path as a whole (where the recursion limit is met at the same depth of the stack).
_DEEP = 800
# Digits -> "0", the "." and exponent of a float -> ".", anything else -> " ": an integer of
# 19 digits or more is " " and 19 "0" (or those "0" at the start), the digits of a float not.
_DIGITS = bytes(48 if 48 <= b <= 57 else 46 if b in b".eE" else 32 for b in range(256))
_LONG_DIGITS = b"0" * 19
_LONG_INT = b" " + _LONG_DIGITS


def _long_int(data: bytes) -> bool:
    """Whether ``data`` may hold an integer of 19 digits or more (or holds such a float)."""
    digits = data.translate(_DIGITS)
    return _LONG_INT in digits or digits.startswith(_LONG_DIGITS)


# Encoding. orjson also encodes what json refuses (UUID, enums, dataclasses, datetimes,
# subclasses of the built-in types, through their values), writes NaN and infinities as null
# and some floats otherwise than repr() (1e-05 as 0.00001): its output is kept only for a
# result made of dict, list, tuple, str, int, float (each written as repr writes it), bool and
# None (:func:`_plain`); any other result, and any orjson error, goes through the stdlib
# encoder.
_SHALLOW = frozenset((str, int, bool, type(None)))
_OPTIONS = 0
if _orjson is not None:
    _OPTIONS = (
        _orjson.OPT_APPEND_NEWLINE
        | _orjson.OPT_PASSTHROUGH_SUBCLASS
        | _orjson.OPT_PASSTHROUGH_DATACLASS
        | _orjson.OPT_PASSTHROUGH_DATETIME
    )


class _Failed:
    """A line whose decoding or call raised ``exc``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _run_orjson(
    fn: Callable[[Any], Any], block: bytes, first: int, mode: str
) -> tuple[bytes, _Errors] | None:
    """:func:`run_block` with orjson (None: this block takes the stdlib path): the block's
    lines decoded by ``map`` (a block with a blank line, or one orjson refuses or could read
    otherwise, line by line: :func:`_decode_line`), then, line by line in order as on the
    stdlib path, the target called and its result written at once: a dict of str, int, bool
    and None values by orjson as it is, any other result by :func:`_encode_line`."""
    lines = block.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # after the last newline
    if not lines:
        return b"", _Errors(mode, len)
    if max(map(len, lines)) >= _DEEP and any(
        line.count(b"[") + line.count(b"{") >= _DEEP for line in lines if len(line) >= _DEEP
    ):
        return None  # a line that may be nested deeper than json takes: all as json does
    out = bytearray()
    errors = _Errors(mode, lambda line: out.extend(_line_bytes(line)))
    values: list[Any] | None = None
    if not _long_int(block):
        with contextlib.suppress(Exception):
            values = list(map(_orjson.loads, lines))
    if values is None:
        _lines(fn, [_decode_line(line) for line in lines], first, errors, out)
        return bytes(out), errors
    n = first - 1
    dumps, options, encode, shallow = _orjson.dumps, _OPTIONS, _encode_line, _SHALLOW
    for value in values:
        n += 1
        try:
            result = fn(value)
            # Each result is written at once, as on the stdlib path (a target may return one
            # object that it changes from line to line).
            if type(result) is dict:
                for item in result.values():
                    if type(item) not in shallow:
                        out += encode(result)
                        break
                else:  # values str, int, bool or None: orjson writes them as json does
                    try:
                        out += dumps(result, option=options)
                    except Exception:  # an int beyond 64 bits, a key that is not a str
                        out += encode(result)
            else:
                out += encode(result)
        except Exception as exc:
            if errors.add(exc, n):
                break
    return bytes(out), errors


def _lines(
    fn: Callable[[Any], Any], values: list[Any], first: int, errors: _Errors, out: bytearray
) -> None:
    """Line by line: ``values`` a decoded value, :data:`_BLANK` or :class:`_Failed` each."""
    n = first - 1
    for value in values:
        n += 1
        if value is _BLANK:
            continue
        try:
            if type(value) is _Failed:
                raise value.exc
            out += _encode_line(fn(value))
        except Exception as exc:
            if errors.add(exc, n):
                break


def _decode_line(line: bytes) -> Any:
    """A line's value (by orjson where it gives what json gives), :data:`_BLANK`, or
    :class:`_Failed` with the stdlib path's error."""
    if not _long_int(line):
        with contextlib.suppress(Exception):
            return _orjson.loads(line)
    try:
        text = _decode(line)
        if not isinstance(text, _BadBytes):
            with contextlib.suppress(Exception):
                record, end = _scan(text, 0)
                if end == len(text) or not text[end:].strip():
                    return record
        return _parse(text)
    except Exception as exc:
        return _Failed(exc)


def _encode_line(result: Any) -> bytes:
    """One result's line: orjson's if :func:`_plain`, else the stdlib encoder's."""
    try:
        data: bytes | None = _orjson.dumps(result, option=_OPTIONS)
    except Exception:  # a type orjson does not take or passes through, a big int, ...
        data = None
    if data is not None and _plain(result):
        return data
    return _line_bytes("".join(_encode(result, 0)))


def _plain(obj: Any) -> bool:
    """Whether ``obj`` (that orjson could encode, so not nested past 254 levels) is made only
    of the types orjson writes as json does: dict, list, tuple, str, int, bool, None, and
    floats orjson writes as repr() does (:func:`_float_same`)."""
    kind = type(obj)
    if kind is dict:
        items: Any = obj.values()  # the keys are str: orjson refuses others
    elif kind is list or kind is tuple:
        items = obj
    elif kind is float:
        return _float_same(obj)
    else:
        return kind in _SHALLOW
    shallow = _SHALLOW
    for item in items:
        kind = type(item)
        if kind in shallow:
            continue
        if kind is float:
            if not _float_same(item):
                return False
        elif kind is dict or kind is list or kind is tuple:
            if not _plain(item):
                return False
        else:
            return False
    return True


def _float_same(x: float) -> bool:
    """Whether orjson writes ``x`` as repr() does (not NaN nor the infinities, which it writes
    as null, nor 1e-05, which it writes as 0.00001): checked, except in the range where both
    write the shortest digits without an exponent (itself checked once, :data:`_RANGE_SAME`)."""
    if _RANGE_SAME and (1e-4 <= x < 1e16 or -1e16 < x <= -1e-4 or x == 0.0):
        return True
    same: bool = _orjson.dumps(x) == float.__repr__(x).encode()
    return same


def _range_same() -> bool:
    if _orjson is None:
        return False
    probes = [0.0, -0.0, 0.1 + 0.2, 1e-4, -1e-4, 9999999999999998.0, -9999999999999998.0]
    for e in range(-4, 16):
        for m in (1.0, 1.5, 2.5, 3.141592653589793, 1.2345678901234567, 9.999999999999998):
            probes += [m * 10.0**e, -m * 10.0**e, float(f"{m}e{e}")]
    probes = [x for x in probes if 1e-4 <= abs(x) < 1e16 or x == 0.0]
    return all(_orjson.dumps(x) == float.__repr__(x).encode() for x in probes)


_RANGE_SAME = _range_same()


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
        if tb is not None and tb.tb_next is not None and _ours(tb):
            while tb.tb_next is not None and _ours(tb):
                tb = tb.tb_next
            exc = exc.with_traceback(tb)  # start the traceback in the target
        info = dict(_error_info.from_exception(exc))
    info["line"] = line
    return info


def _ours(tb: Any) -> bool:
    """A frame of the loops above, left out of a line's traceback."""
    return tb.tb_frame.f_code in _LOOPS


_LOOPS = frozenset(f.__code__ for f in (run_block, _run_orjson, _lines, _encode_line, _decode_line))


def error_line(info: dict[str, Any]) -> str:
    error = {
        "type": type_label(info[_error_info.TYPE]),
        "message": info[_error_info.MESSAGE],
        "line": info["line"],
    }
    return json.dumps({"error": error}, separators=(",", ":"), ensure_ascii=False)
