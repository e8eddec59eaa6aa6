"""kameo: pools of Python worker processes driven from asyncio, with a Rust core.

>>> async with kameo.Pool("pkg.mod:handler", size=4) as pool:
...     reply = await pool.ask({"symbol": "AAPL"}, timeout=5.0)
"""

from __future__ import annotations

import importlib
import sys

from kameo import _context
from kameo._native import PROTOCOL_VERSION, decode, encode, register_type
from kameo.errors import (
    CallbackNotFound,
    CallTimeout,
    EnvError,
    ExtraMissing,
    HandlerTypeError,
    KameoError,
    PoolClosed,
    ProtocolError,
    RefError,
    RemoteError,
    SerializationError,
    SessionLost,
    WorkerCrashed,
    WorkerStartupError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kameo import _runtime, events
    from kameo._future import AskFuture
    from kameo._mapping import MapResults
    from kameo.callbacks import Callbacks
    from kameo.envs import PythonEnv
    from kameo.events import add_listener, remove_listener
    from kameo.executor import Executor
    from kameo.pipeline import Pipeline, PipelineError
    from kameo.pool import Pool, PoolStats, WorkerInfo
    from kameo.remote import Ref, RemoteFunction
    from kameo.session import Session
    from kameo.stream import Stream

#: The public names imported on first use (``kameo.__getattr__``), and their modules: a worker
#: imports none of the parent's machinery (pools, supervision, environments), and ``import
#: kameo`` stays cheap for programs that use part of it.
_LAZY = {
    "AskFuture": "kameo._future",
    "Callbacks": "kameo.callbacks",
    "Executor": "kameo.executor",
    "MapResults": "kameo._mapping",
    "Pipeline": "kameo.pipeline",
    "PipelineError": "kameo.pipeline",
    "Pool": "kameo.pool",
    "PoolStats": "kameo.pool",
    "PythonEnv": "kameo.envs",
    "Ref": "kameo.remote",
    "RemoteFunction": "kameo.remote",
    "Session": "kameo.session",
    "Stream": "kameo.stream",
    "WorkerInfo": "kameo.pool",
    "add_listener": "kameo.events",
    "remove_listener": "kameo.events",
}

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AskFuture",
    "CallTimeout",
    "CallbackNotFound",
    "Callbacks",
    "EnvError",
    "Executor",
    "ExtraMissing",
    "HandlerTypeError",
    "KameoError",
    "MapResults",
    "Pipeline",
    "PipelineError",
    "Pool",
    "PoolClosed",
    "PoolStats",
    "ProtocolError",
    "PythonEnv",
    "Ref",
    "RefError",
    "RemoteError",
    "RemoteFunction",
    "SerializationError",
    "Session",
    "SessionLost",
    "Stream",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerStartupError",
    "__version__",
    "add_listener",
    "callback_handle",
    "current_session",
    "current_traceparent",
    "decode",
    "encode",
    "events",
    "live_refs",
    "register_type",
    "remove_listener",
    "session_state",
]


def callback_handle(path: str, data: Any = None) -> _runtime.CallbackCall:
    """In a worker: call the parent handler registered at ``path`` ("module.Type") and return
    an iterator of its items: ``for x in kameo.callback_handle(...)`` in sync handlers,
    ``async for x in await kameo.callback_handle(...)`` (or without the ``await``) in async ones.

    Raises :class:`CallbackNotFound` for a path the parent did not register.
    """
    from kameo import _runtime

    rt = _runtime.current()
    if rt is None:
        raise KameoError("callback_handle() can only be used inside a kameo worker")
    return rt.new_call(path, data)


def current_traceparent() -> str | None:
    """The W3C traceparent of the request (in a worker) or callback (in the parent) being
    handled, if the caller sent one."""
    return _context.traceparent.get()


def current_session() -> str | None:
    """In a worker: the id of the session the running call belongs to (None outside one)."""
    return _context.session.get()


def session_state() -> dict[str, Any]:
    """In a worker, inside a session's call: a dict private to that session on this worker,
    dropped when the session closes."""
    from kameo import _runtime

    rt = _runtime.current()
    sid = _context.session.get()
    if rt is None or sid is None:
        raise KameoError("session_state() is only available inside a session's call in a worker")
    return rt.ops.objects.session(sid).state


def live_refs() -> int:
    """In a worker: how many objects it holds for the parent's Refs
    (``await pool.call("kameo:live_refs")``); 0 outside a worker."""
    from kameo import _runtime

    rt = _runtime.current()
    return 0 if rt is None else len(rt.ops.objects)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # found directly from now on
        return value
    if name == "events":
        return importlib.import_module("kameo.events")
    if name.startswith("_"):  # a submodule not imported yet (`from kameo import _x` imports it)
        raise AttributeError(f"module 'kameo' has no attribute {name!r}")
    # In a worker, `kameo.<module>` exists for each registered callback module, and any other
    # public name raises CallbackNotFound (an AttributeError too); see _runtime.module_attribute.
    runtime = sys.modules.get("kameo._runtime")  # always imported in a worker
    if runtime is None:
        raise AttributeError(f"module 'kameo' has no attribute {name!r}")
    return runtime.module_attribute(name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
