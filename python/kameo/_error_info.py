"""The error-info format: what an ERROR frame (and STARTUP_FAILED) carries, both ways.

An error crosses the socket as a dict of four strings, ``{kind, type, message, traceback}``:

* ``kind`` says what failed: :data:`REMOTE` (a handler raised; ``type`` is the exception's
  qualified name, kept through a chain of processes), :data:`CALLBACK_NOT_FOUND`,
  :data:`CANCELLED`, :data:`HANDLER_TYPE` (``ask`` on a generator, ``stream`` on a function),
  :data:`PROTOCOL` and :data:`SERIALIZATION`.
* STARTUP_FAILED adds ``stage`` and ``what`` (:func:`startup_failed`).

Every dict Python sends is built here, and every ERROR frame either side receives is decoded
here (:func:`from_worker`, :func:`from_peer`). One producer lives in Rust: the worker channel
(``Channel::error_frame`` in ``crates/kameo-native/src/channel.rs``) builds the
:data:`SERIALIZATION` / :data:`PROTOCOL` dict for a reply it cannot encode or that is over the
frame limit; keep its keys in step with the ones named below. The Rust core decodes a worker's
ERROR frame by calling :func:`from_worker` here by name (``errors::from_worker`` in
``crates/kameo-native/src/errors.rs``).
"""

from __future__ import annotations

import builtins
import traceback
from typing import Any

from kameo.errors import (
    CallbackNotFound,
    HandlerTypeError,
    KameoError,
    ProtocolError,
    RefError,
    RemoteError,
    SerializationError,
)

# The keys.
KIND = "kind"
TYPE = "type"
MESSAGE = "message"
TRACEBACK = "traceback"

# The kinds.
REMOTE = "remote"
CALLBACK_NOT_FOUND = "callback_not_found"
CANCELLED = "cancelled"
HANDLER_TYPE = "handler_type"
PROTOCOL = "protocol"
REF = "ref"
SERIALIZATION = "serialization"

Info = dict[str, str]


def make(kind: str, message: str = "", type_name: str = "", tb: str = "") -> Info:
    return {KIND: kind, TYPE: type_name, MESSAGE: message, TRACEBACK: tb}


def cancelled() -> Info:
    """The request (or callback) was cancelled before it completed."""
    return make(CANCELLED)


def handler_type(message: str) -> Info:
    return make(HANDLER_TYPE, message)


def protocol(message: str) -> Info:
    return make(PROTOCOL, message)


def serialization(message: str) -> Info:
    return make(SERIALIZATION, message)


def from_exception(exc: BaseException) -> Info:
    """What the other side needs to rebuild ``exc`` (a handler's error)."""
    if isinstance(exc, RemoteError):
        # Keep the original type and message through a chain of processes.
        type_name, message = exc.remote_type, exc.remote_message
    else:
        type_name, message = f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc)
    if isinstance(exc, CallbackNotFound):
        kind = CALLBACK_NOT_FOUND
    elif isinstance(exc, RefError):
        kind = REF
    elif isinstance(exc, HandlerTypeError):
        kind = HANDLER_TYPE
    else:
        kind = REMOTE
    return make(kind, message, type_name, "".join(traceback.format_exception(exc)))


def startup_failed(exc: BaseException, stage: str, what: str | None) -> Info:
    """The body of STARTUP_FAILED: ``exc`` happened while the worker tried to ``stage what``."""
    info = from_exception(exc)
    info["stage"] = stage
    info["what"] = repr(what)
    return info


# ------------------------------------------------------------------------------- decoding


def from_worker(info: Any, worker_id: int, pid: int) -> BaseException:
    """The exception for an ERROR frame from a worker."""
    return decode(info, f"worker {worker_id}", worker_id, pid)


def from_peer(info: Any, location: str, pid: int) -> BaseException:
    """The exception for an ERROR frame from the parent (a callback handler's error)."""
    return decode(info, location, -1, pid)


def decode(info: Any, location: str, worker_id: int, pid: int) -> BaseException:
    where = f"{location} (pid {pid})"
    if not isinstance(info, dict):
        return ProtocolError(f"{where} sent a malformed error reply")
    kind = info.get(KIND, REMOTE)
    message = str(info.get(MESSAGE, ""))
    if kind == PROTOCOL:
        return ProtocolError(f"{message} [{where}]")
    if kind == SERIALIZATION:
        return SerializationError(f"{message} [{where}]")
    if kind == CALLBACK_NOT_FOUND:
        return CallbackNotFound(message)
    if kind == HANDLER_TYPE:
        return HandlerTypeError(message)
    if kind == REF:
        return RefError(f"{message} [{where}]")
    if kind == CANCELLED:
        return KameoError(f"the call was cancelled in {where}")
    return _remote(info, worker_id, pid, location)


_remote_classes: dict[type[BaseException], type[RemoteError]] = {}


def _remote_class(builtin: type[BaseException]) -> type[RemoteError]:
    cls = _remote_classes.get(builtin)
    if cls is None:
        try:
            cls = type(f"Remote{builtin.__name__}", (RemoteError, builtin), {})
        except TypeError:  # incompatible layout: fall back to the plain class
            cls = RemoteError
        cls.__module__ = "kameo.errors"
        _remote_classes[builtin] = cls
    return cls


def _builtin_exception(qualname: str) -> type[BaseException] | None:
    if not qualname.startswith("builtins."):
        return None
    obj = getattr(builtins, qualname[len("builtins.") :], None)
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def _remote(info: dict[str, Any], worker_id: int, pid: int, location: str) -> RemoteError:
    remote_type = str(info.get(TYPE, "builtins.Exception"))
    message = str(info.get(MESSAGE, ""))
    builtin = _builtin_exception(remote_type)
    cls = _remote_class(builtin) if builtin is not None else RemoteError
    try:
        exc: RemoteError = cls(message)
    except Exception:  # a built-in with a demanding constructor (UnicodeDecodeError, ...)
        exc = RemoteError(message)
    exc.remote_type = remote_type
    exc.remote_message = message
    exc.remote_traceback = str(info.get(TRACEBACK, ""))
    exc.worker_id = worker_id
    exc.pid = pid
    exc.location = location
    return exc
