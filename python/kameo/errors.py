"""The exceptions kameo raises. All derive from :class:`KameoError`.

Remote exceptions keep their built-in type: a ``ValueError`` raised by a handler arrives in the
parent as a :class:`RemoteError` that is also a ``ValueError``, so ``except ValueError:`` works.
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "CallTimeout",
    "CallbackNotFound",
    "HandlerTypeError",
    "KameoError",
    "PoolClosed",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "WorkerCrashed",
    "WorkerStartupError",
]


class KameoError(Exception):
    """Base class of every kameo exception."""


class PoolClosed(KameoError, RuntimeError):
    """The pool is closed (or closing) and takes no new requests, or closed before answering."""


class ProtocolError(KameoError):
    """A frame broke the protocol: over ``max_frame_bytes``, malformed, or of an unknown kind."""


class SerializationError(KameoError, TypeError):
    """A value cannot be encoded (the message names its type and its path) or decoded."""


class CallTimeout(KameoError, TimeoutError):
    """A request did not complete within its timeout."""


class CallbackNotFound(KameoError, LookupError):
    """A worker called a parent handler path that is not registered."""


class HandlerTypeError(KameoError, TypeError):
    """The call does not fit the handler: ``ask`` on a generator, ``stream`` on a function."""


class WorkerStartupError(KameoError):
    """A worker could not start: import failed, handler missing, or the handshake timed out."""


class WorkerCrashed(KameoError):
    """A worker process died while it was running the request."""

    def __init__(
        self,
        message: str,
        *,
        worker_id: int,
        pid: int,
        exitcode: int | None = None,
        signal: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.stderr_tail = stderr_tail


class RemoteError(KameoError):
    """The handler raised. For built-in exception types the instance also derives from that
    built-in (``RemoteError`` + ``ValueError``), so ordinary ``except`` clauses keep working."""

    remote_type: str
    remote_message: str
    remote_traceback: str
    #: The worker that raised; -1 when the parent raised (a callback handler's error).
    worker_id: int
    pid: int
    location: str = "the worker"

    def __init__(self, message: str, *args: Any) -> None:
        super().__init__(message, *args)

    def __str__(self) -> str:
        base = f"{self.remote_type}: {self.remote_message} (in {self.location}, pid {self.pid})"
        if self.remote_traceback:
            return f"{base}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return base


_remote_classes: dict[type[BaseException], type[RemoteError]] = {}


def _remote_class(builtin: type[BaseException]) -> type[RemoteError]:
    cls = _remote_classes.get(builtin)
    if cls is None:
        try:
            cls = type(f"Remote{builtin.__name__}", (RemoteError, builtin), {})
        except TypeError:  # incompatible layout: fall back to the plain class
            cls = RemoteError
        cls.__module__ = __name__
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
    remote_type = str(info.get("type", "builtins.Exception"))
    message = str(info.get("message", ""))
    builtin = _builtin_exception(remote_type)
    cls = _remote_class(builtin) if builtin is not None else RemoteError
    try:
        exc: RemoteError = cls(message)
    except Exception:  # a built-in with a demanding constructor (UnicodeDecodeError, ...)
        exc = RemoteError(message)
    exc.remote_type = remote_type
    exc.remote_message = message
    exc.remote_traceback = str(info.get("traceback", ""))
    exc.worker_id = worker_id
    exc.pid = pid
    exc.location = location
    return exc


def _from_worker(info: Any, worker_id: int, pid: int) -> BaseException:
    """Build the exception for an ERROR frame from a worker (called by the Rust core)."""
    return _build(info, f"worker {worker_id}", worker_id, pid)


def _from_peer(info: Any, location: str, pid: int) -> BaseException:
    """Build the exception for an ERROR frame from the parent (a callback handler's error)."""
    return _build(info, location, -1, pid)


def _build(info: Any, location: str, worker_id: int, pid: int) -> BaseException:
    where = f"{location} (pid {pid})"
    if not isinstance(info, dict):
        return ProtocolError(f"{where} sent a malformed error reply")
    kind = info.get("kind", "remote")
    message = str(info.get("message", ""))
    if kind == "protocol":
        return ProtocolError(f"{message} [{where}]")
    if kind == "serialization":
        return SerializationError(f"{message} [{where}]")
    if kind == "callback_not_found":
        return CallbackNotFound(message)
    if kind == "handler_type":
        return HandlerTypeError(message)
    if kind == "cancelled":
        return KameoError(f"the call was cancelled in {where}")
    return _remote(info, worker_id, pid, location)
