"""Worker ``logging`` records, forwarded to the parent's ``logging``.

Worker side (:func:`install`, from ``kameo._worker`` once the handshake is done): a
:class:`Forwarder` handler on the root logger takes each record as a tuple (message formatted,
exception and stack text rendered, while the record's arguments and traceback still exist) into
a bounded buffer, and returns. A daemon thread, ``kameo-log``, sends what collected as one LOG
frame (``Channel.log``) every :data:`LINGER` seconds at most, and writes it itself (a blocking
write in a sync worker, polled in an async one): the handler never waits for the socket. While
a batch is still being written, new records collect; past :data:`MAX_QUEUED` records (or
:data:`MAX_QUEUED_CHARS` characters of text) the newest are dropped and counted, and the next
frame carries the count. The worker's loggers get the levels the parent's had when the pool
started (WELCOME's ``log_levels``: the root logger's effective level, and each logger given a
level of its own), so records the parent would not log are not made at all.

Parent side (:func:`forward`, from ``Pool._on_event``): each record is remade under its own
logger name, level, message, exception and stack text, time, file, line, function and thread
name, with ``processName`` the worker's (``"<pool> w<id>"``) and the extras ``worker_id``,
``pid`` and ``pool``, and handled if that logger is enabled for its level now. A count of
dropped records is logged as a warning of logger ``kameo.worker``.

Records still buffered when the worker exits normally are sent first (within
:data:`CLOSE_WAIT`); a worker that dies (SIGKILL, ``os._exit``) loses them.
"""

from __future__ import annotations

import os
import sys
import time

from kameo._lean import suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

    from kameo._log_forwarder import Forwarder

__all__ = ["close", "drain", "forward", "install", "levels"]

#: Records waiting to be sent, at most; more are dropped and counted.
MAX_QUEUED = 10_000
#: Characters of text (messages, exception and stack text) waiting, at most.
MAX_QUEUED_CHARS = 8 * 1024 * 1024
#: Longest message, exception text or stack text of one record (longer ones are cut).
MAX_TEXT = 32 * 1024
#: How long the sending thread lets records collect after the first one (seconds).
LINGER = 0.005
#: How long an exiting worker tries to send what is left (seconds).
CLOSE_WAIT = 1.0
POLL = 0.002

# A record as it travels: (logger name, level, message, exception text or None, stack text or
# None, created (time.time()), pathname, lineno, funcName, threadName).
Record = tuple[str, int, str, "str | None", "str | None", float, str, int, str, str]


# ------------------------------------------------------------------------------ parent


def levels() -> dict[str, int]:
    """The parent's logger levels for WELCOME: ``""`` the root logger's effective level, and
    each logger that has a level of its own."""
    import logging

    out = {"": logging.getLogger().getEffectiveLevel()}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            out[name] = logger.level
    return out


def forward(payload: Any, pool: str, worker_id: int, pid: int) -> None:
    """Log the records of one LOG frame from worker ``worker_id`` (see the module docstring)."""
    import logging

    worker_log = logging.getLogger("kameo.worker")
    extra = {"worker_id": worker_id, "pid": pid, "pool": pool}
    if isinstance(payload, str):  # the core could not decode the frame
        worker_log.warning("[%s worker %d pid %d] %s", pool, worker_id, pid, payload, extra=extra)
        return
    try:
        dropped, records = payload
        dropped = int(dropped)
    except (TypeError, ValueError):
        worker_log.warning(
            "[%s worker %d pid %d] a log frame of another shape: %.200r",
            pool,
            worker_id,
            pid,
            payload,
            extra=extra,
        )
        return
    process = f"{pool} w{worker_id}"
    for rec in records:
        try:
            name, level, msg, exc_text, stack, created, path, lineno, func, thread = rec
            logger = logging.getLogger(name)
            if not logger.isEnabledFor(level):
                continue
            filename = os.path.basename(path)
            record = logging.makeLogRecord(
                {
                    "name": name,
                    "levelno": level,
                    "levelname": logging.getLevelName(level),
                    "msg": msg,
                    "args": None,
                    "exc_text": exc_text,
                    "stack_info": stack,
                    "created": created,
                    "msecs": (created - int(created)) * 1000.0,
                    "pathname": path,
                    "filename": filename,
                    "module": os.path.splitext(filename)[0],
                    "lineno": lineno,
                    "funcName": func,
                    "threadName": thread,
                    "thread": None,
                    "process": pid,
                    "processName": process,
                    "worker_id": worker_id,
                    "pid": pid,
                    "pool": pool,
                }
            )
        except (TypeError, ValueError):
            continue  # not a record this version sends
        logger.handle(record)
    if dropped:
        worker_log.warning(
            "[%s worker %d pid %d] dropped %d log records: more were logged than could be "
            "sent to the parent (at most %d wait)",
            pool,
            worker_id,
            pid,
            dropped,
            MAX_QUEUED,
            extra={**extra, "dropped": dropped},
        )


# ------------------------------------------------------------------------------ worker


_forwarder: Forwarder | None = None


def install(chan: Any, config: dict[str, Any]) -> None:
    """Worker: forward ``logging`` records to the parent through ``chan``, with the parent's
    levels from WELCOME's ``log_levels``: now if ``logging`` is imported, else as soon as it is
    (the import of ``logging`` and of its handler costs a worker that never logs ~5 ms)."""
    levels = dict(config.get("log_levels") or {})
    if "logging" in sys.modules:
        _install(chan, levels)
    else:
        sys.meta_path.insert(0, _AfterImport("logging", lambda: _install(chan, levels)))


def _install(chan: Any, levels: dict[str, Any]) -> None:
    global _forwarder
    import logging

    from kameo._log_forwarder import Forwarder

    root = logging.getLogger()
    for name, level in levels.items():
        with suppress(TypeError, ValueError):
            (logging.getLogger(name) if name else root).setLevel(int(level))
    forwarder = _forwarder = Forwarder(chan)
    root.addHandler(forwarder)
    os.register_at_fork(after_in_child=forwarder._forked)


class _AfterImport:
    """A meta path finder that runs ``then()`` once module ``name`` is imported (by whatever
    imports it first, before that import returns), and then leaves ``sys.meta_path``."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != self.name:
            return None
        with suppress(ValueError):
            sys.meta_path.remove(self)
        spec: ModuleSpec | None = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader: Any = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec  # type: ignore[no-any-return]
        then = self.then

        class Loader:
            """The module's own loader, and ``then()`` after it ran the module."""

            def create_module(self, spec: ModuleSpec) -> ModuleType | None:
                made: ModuleType | None = loader.create_module(spec)
                return made

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)
                module.__loader__ = loader
                if module.__spec__ is not None:
                    module.__spec__.loader = loader
                then()

        spec.loader = Loader()
        return spec  # type: ignore[no-any-return]


def drain() -> None:
    """Worker: send the buffered records now (before STARTUP_FAILED, so they come first)."""
    if _forwarder is not None:
        _forwarder.drain(time.monotonic() + CLOSE_WAIT)


def close() -> None:
    """Worker, on its way out: send what is left (bounded)."""
    if _forwarder is not None:
        _forwarder.close()
