"""The error-info format: what an ERROR frame (and STARTUP_FAILED) carries, both ways.

An error crosses the socket as a dict of four strings, ``{kind, type, message, traceback}``:

* ``kind`` says what failed: :data:`REMOTE` (a handler raised; ``type`` is the exception's
  qualified name, kept through a chain of processes), :data:`CALLBACK_NOT_FOUND`,
  :data:`CANCELLED`, :data:`HANDLER_TYPE` (``ask`` on a generator, ``stream`` on a function),
  :data:`PROTOCOL` and :data:`SERIALIZATION`.
* An exception's info (:func:`from_exception`) adds ``module`` and ``qualname``, the class's
  (a class of the sender's ``__main__`` under the name the other side imports that file as,
  ``kameo._functions.main_module_name``), and ``args``, the exception's args when they differ
  from ``(message,)`` and are all plain values (None, bool, int, float, str, bytes; strings up
  to 64 KiB).
* STARTUP_FAILED adds ``stage`` and ``what`` (:func:`startup_failed`).

Decoding a ``remote`` error (:func:`decode`) gives a :class:`~kameo.RemoteError`, and where it
can, an instance of a class derived from both ``RemoteError`` and the exception's own class
(``RemoteError`` first: its ``str()`` with the remote traceback), so that ``except MyError:``
works as with ``ProcessPoolExecutor``. The class is looked up by ``module`` and ``qualname``
among the modules this process has already imported (``sys.modules``, and the parent's
``__main__`` under its module name), walking class ``__dict__``\\ s: nothing is imported and no
code of the module runs because a peer named it. That is enough for ``except``: a class an
``except`` clause or ``isinstance`` names is one whose module is imported (unlike
``ProcessPoolExecutor``, which unpickles, and so imports). The derived classes are cached, one
per class. The instance is made as unpickling makes it, ``cls(*args)``, then ``cls(message)``;
if the class's ``__init__`` refuses both, through ``cls.__new__`` with ``args`` set; and if that
fails too, a plain ``RemoteError``: building the error never raises. These stay plain
``RemoteError``\\ s: a class that is not imported here, that is not an ``Exception``
(``CancelledError``, ``KeyboardInterrupt``, ``SystemExit``: they would stop the caller's task
or loop), ``StopIteration`` and ``StopAsyncIteration`` (which a coroutine may not raise), and
the ``KameoError`` family (a worker's own pool's ``CallTimeout`` must not look like the
caller's).

Every dict Python sends is built here, and every ERROR frame either side receives is decoded
here (:func:`from_worker`, :func:`from_peer`). One producer lives in Rust: the worker channel
(``Channel::error_frame`` in ``crates/kameo-native/src/channel.rs``) builds the
:data:`SERIALIZATION` / :data:`PROTOCOL` dict for a reply it cannot encode or that is over the
frame limit; keep its keys in step with the ones named below. The Rust core decodes a worker's
ERROR frame by calling :func:`from_worker` here by name (``errors::from_worker`` in
``crates/kameo-native/src/errors.rs``).
"""

from __future__ import annotations

import os
import sys

from kameo import _functions
from kameo.errors import (
    CallbackNotFound,
    HandlerTypeError,
    KameoError,
    ProtocolError,
    RefError,
    RemoteError,
    SerializationError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The keys.
KIND = "kind"
TYPE = "type"
MESSAGE = "message"
TRACEBACK = "traceback"
MODULE = "module"
QUALNAME = "qualname"
ARGS = "args"

# The kinds.
REMOTE = "remote"
CALLBACK_NOT_FOUND = "callback_not_found"
CANCELLED = "cancelled"
HANDLER_TYPE = "handler_type"
PROTOCOL = "protocol"
REF = "ref"
SERIALIZATION = "serialization"

Info = dict[str, "Any"]


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
        # Keep the original type, message, class and args through a chain of processes.
        type_name, message = exc.remote_type, exc.remote_message
        module, qualname, args = getattr(exc, "_kameo_origin", ("", "", None))
    else:
        cls = type(exc)
        module, qualname = cls.__module__, cls.__qualname__
        type_name = f"{module}.{qualname}"
        try:
            message = str(exc)
        except Exception:
            message = f"<unprintable {cls.__qualname__}>"
        args = _plain_args(_args_of(exc), message)
        if module == "__main__":
            module = _functions.main_module_name() or module
    if isinstance(exc, CallbackNotFound):
        kind = CALLBACK_NOT_FOUND
    elif isinstance(exc, RefError):
        kind = REF
    elif isinstance(exc, HandlerTypeError):
        kind = HANDLER_TYPE
    else:
        kind = REMOTE
    info = make(kind, message, type_name, _format(exc))
    if module and qualname:
        info[MODULE], info[QUALNAME] = module, qualname
    if args is not None:
        info[ARGS] = args
    return info


#: The types of exception args that travel (others: the receiver uses the message).
_PLAIN_ARG = frozenset((type(None), bool, int, float, str, bytes))
MAX_ARG_LEN = 64 * 1024


def _args_of(exc: BaseException) -> tuple[Any, ...]:
    """The arguments unpickling would make ``exc`` with (an OSError's filename is not in its
    ``args``, but is in what ``__reduce__`` gives)."""
    try:
        reduced = exc.__reduce__()
    except Exception:
        return exc.args
    if (
        isinstance(reduced, tuple)
        and len(reduced) >= 2
        and reduced[0] is type(exc)
        and isinstance(reduced[1], tuple)
    ):
        return reduced[1]
    return exc.args


def _plain_args(args: tuple[Any, ...], message: str) -> tuple[Any, ...] | None:
    """``args`` if they should travel: not the usual ``(message,)``, and all plain values."""
    if len(args) == 1 and args[0] == message and type(args[0]) is str:
        return None
    if len(args) > 16:
        return None
    for a in args:
        if type(a) not in _PLAIN_ARG or (type(a) in (str, bytes) and len(a) > MAX_ARG_LEN):
            return None
    return tuple(args)


_KAMEO_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _format(exc: BaseException) -> str:
    """``exc``'s traceback as text, without kameo's own frames that led to the user's code
    (the server's loop, ``run_batch``): the remote traceback starts at the user's function,
    and an error of a builtin (``math.sqrt(-1)``) or of kameo's own (a target that does not
    import) is its last line alone."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_KAMEO_DIR):
        tb = tb.tb_next
    import traceback  # here: a worker that raises nothing never imports it (3 ms)

    return "".join(traceback.format_exception(type(exc), exc, tb))


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


#: The class derived from RemoteError and each exception class met (RemoteError: none can be).
_remote_classes: dict[type[BaseException], type[RemoteError]] = {}
_NEVER = (KameoError, StopIteration, StopAsyncIteration)


def remote_class(module: str, qualname: str) -> type[RemoteError]:
    """The class a remote exception of class ``module.qualname`` is an instance of."""
    original = _find_class(module, qualname)
    if original is None:
        return RemoteError
    cls = _remote_classes.get(original)
    if cls is None:
        try:
            cls = type(
                f"Remote{original.__name__}",
                (RemoteError, original),
                {"__module__": "kameo.errors", "__qualname__": f"Remote{original.__name__}"},
            )
        except Exception:  # incompatible layout or metaclass, a refusing __init_subclass__
            cls = RemoteError
        _remote_classes[original] = cls
    return cls


def _find_class(module: str, qualname: str) -> type[BaseException] | None:
    """The exception class ``module.qualname`` if this process has imported its module (no
    import, and no attribute code: class and module ``__dict__``\\ s only)."""
    if not module or not qualname:
        return None
    obj: Any = sys.modules.get(module)
    if obj is None and module == _functions.main_module_name():
        obj = sys.modules.get("__main__")  # the worker imported our script by its name
    if obj is None:
        return None
    for part in qualname.split("."):
        try:
            obj = vars(obj).get(part)
        except TypeError:
            return None
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, _NEVER):
        return obj
    return None


def _origin(info: dict[str, Any], remote_type: str) -> tuple[str, str, tuple[Any, ...] | None]:
    module, qualname, args = info.get(MODULE), info.get(QUALNAME), info.get(ARGS)
    if not (isinstance(module, str) and isinstance(qualname, str)):
        # A peer that does not send them (or Rust): built-in types by their qualified name.
        module, qualname = "", ""
        if remote_type.startswith("builtins."):
            module, qualname = "builtins", remote_type[len("builtins.") :]
    return module, qualname, tuple(args) if isinstance(args, list | tuple) else None


def _instance(cls: type[RemoteError], args: tuple[Any, ...] | None, message: str) -> RemoteError:
    """An instance of ``cls`` with ``args`` (else ``(message,)``), as best it can be made."""
    if cls is not RemoteError:
        for attempt in ((message,),) if args is None else (args, (message,)):
            try:
                return cls(*attempt)
            except Exception:
                pass
        try:  # an __init__ that takes other arguments: as unpickling without __init__
            exc = cls.__new__(cls, *(args if args is not None else (message,)))
            exc.args = args if args is not None else (message,)
            return exc
        except Exception:
            pass
    return RemoteError(message)


def _remote(info: dict[str, Any], worker_id: int, pid: int, location: str) -> RemoteError:
    remote_type = str(info.get(TYPE, "builtins.Exception"))
    message = str(info.get(MESSAGE, ""))
    origin = _origin(info, remote_type)
    try:
        exc = _instance(remote_class(origin[0], origin[1]), origin[2], message)
        _fill(exc, info, remote_type, message, worker_id, pid, location)
    except Exception:  # the class has read-only attributes of these names, ...
        exc = RemoteError(message)
        _fill(exc, info, remote_type, message, worker_id, pid, location)
    exc._kameo_origin = origin  # type: ignore[attr-defined]
    return exc


def _fill(
    exc: RemoteError,
    info: dict[str, Any],
    remote_type: str,
    message: str,
    worker_id: int,
    pid: int,
    location: str,
) -> None:
    exc.remote_type = remote_type
    exc.remote_message = message
    exc.remote_traceback = str(info.get(TRACEBACK, ""))
    exc.worker_id = worker_id
    exc.pid = pid
    exc.location = location
