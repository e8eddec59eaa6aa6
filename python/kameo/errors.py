"""The exceptions kameo raises. All derive from :class:`KameoError`.

Remote exceptions keep their type: a ``ValueError`` raised by a handler arrives in the parent as
a :class:`RemoteError` that is also a ``ValueError``, so ``except ValueError:`` works, and so
does ``except MyError:`` for a class of a module the parent has imported
(``kameo._error_info``).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


__all__ = [
    "CallTimeout",
    "CallbackNotFound",
    "EnvError",
    "ExtraMissing",
    "HandlerTypeError",
    "KameoError",
    "PoolClosed",
    "ProtocolError",
    "RefError",
    "RemoteError",
    "SerializationError",
    "SessionLost",
    "WorkerCrashed",
    "WorkerStartupError",
]


class KameoError(Exception):
    """Base class of every kameo exception."""


class PoolClosed(KameoError, RuntimeError):
    """The pool is closed (or closing) and takes no new requests, or closed before answering."""


class ProtocolError(KameoError):
    """A frame broke the protocol: over ``max_frame_bytes``, malformed, or of an unknown kind."""


class ExtraMissing(KameoError, ImportError):
    """A feature needs an optional dependency that is not installed (the message says which
    extra to install, e.g. ``pip install 'kameo[progress]'``)."""


class EnvError(KameoError):
    """A :class:`~kameo.PythonEnv` cannot be made or used: its interpreter cannot run, cannot
    import this kameo (another version or ABI), or the installer failed (the message ends with
    the installer's last lines); also a lock another process held past the timeout."""


class SerializationError(KameoError, TypeError):
    """A value cannot be encoded (the message names its type and its path) or decoded."""


class RefError(KameoError, LookupError):
    """A remote object reference cannot be used: it was released, its worker died, or it
    belongs to another pool (or a call mixes refs of two workers)."""


class SessionLost(KameoError):
    """A strict session's worker died: its state and objects are gone, and so is the session
    (the call in flight when it died failed with :class:`WorkerCrashed`)."""


class CallTimeout(KameoError, TimeoutError):
    """A request did not complete within its timeout."""


class CallbackNotFound(KameoError, LookupError, AttributeError):
    """A worker called a parent handler path that is not registered (``callback_handle(path)``,
    ``kameo.<module>`` or ``kameo.<module>.<Type>``); the message lists the registered paths.
    Also an ``AttributeError``, since the module style reaches it by attribute access."""


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
    """The handler raised. The instance also derives from the exception's own class when that
    is an ``Exception`` of a module this process has imported (``RemoteError`` + ``ValueError``,
    ``RemoteError`` + ``mypkg.MyError``), so ordinary ``except`` clauses keep working; its
    ``args`` are the remote exception's when they are plain values. ``kameo`` errors, and
    classes not imported here, arrive as a plain ``RemoteError``."""

    remote_type: str
    remote_message: str
    remote_traceback: str
    #: The worker that raised; -1 when the parent raised (a callback handler's error).
    worker_id: int
    pid: int
    location: str = "the worker"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)

    def __str__(self) -> str:
        base = f"{self.remote_type}: {self.remote_message} (in {self.location}, pid {self.pid})"
        if self.remote_traceback:
            return f"{base}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return base
