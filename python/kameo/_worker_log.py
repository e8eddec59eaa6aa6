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

import contextlib
import logging
import os
import threading
import time
import traceback
from typing import Any

__all__ = ["Forwarder", "close", "drain", "forward", "install", "levels"]

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

worker_log = logging.getLogger("kameo.worker")

# A record as it travels: (logger name, level, message, exception text or None, stack text or
# None, created (time.time()), pathname, lineno, funcName, threadName).
Record = tuple[str, int, str, str | None, str | None, float, str, int, str, str]


# ------------------------------------------------------------------------------ parent


def levels() -> dict[str, int]:
    """The parent's logger levels for WELCOME: ``""`` the root logger's effective level, and
    each logger that has a level of its own."""
    out = {"": logging.getLogger().getEffectiveLevel()}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            out[name] = logger.level
    return out


def forward(payload: Any, pool: str, worker_id: int, pid: int) -> None:
    """Log the records of one LOG frame from worker ``worker_id`` (see the module docstring)."""
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


def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT:
        return text
    return f"{text[:MAX_TEXT]}... [{len(text) - MAX_TEXT} more characters cut]"


class Forwarder(logging.Handler):
    """The worker's root handler: records into a bounded buffer, sent by a thread."""

    def __init__(self, chan: Any) -> None:
        super().__init__()
        self.chan = chan
        self.queued: list[Record] = []
        self.chars = 0
        self.dropped = 0
        self.dead = False  # the parent is gone (or this is a forked child): drop everything
        self.closing = False
        self.wake = threading.Event()
        self.sent = 0  # records sent (tests)
        self.thread = threading.Thread(target=self._run, name="kameo-log", daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        # Called with self.lock held (Handler.handle): the buffer's lock.
        if self.dead or threading.current_thread() is self.thread:
            return
        try:
            msg = _cut(record.getMessage())
        except Exception as exc:  # bad format arguments: say so rather than lose the record
            msg = f"{record.msg!r} % {record.args!r} could not be formatted: {exc!r}"
        exc_text = record.exc_text
        if record.exc_info and not exc_text:
            exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        exc_text = None if not exc_text else _cut(exc_text)
        stack = None if not record.stack_info else _cut(record.stack_info)
        chars = len(msg) + len(exc_text or "") + len(stack or "")
        if len(self.queued) >= MAX_QUEUED or self.chars + chars > MAX_QUEUED_CHARS:
            self.dropped += 1
            return
        self.queued.append(
            (
                record.name,
                record.levelno,
                msg,
                exc_text,
                stack,
                record.created,
                record.pathname,
                record.lineno,
                record.funcName or "",
                record.threadName or "",
            )
        )
        self.chars += chars
        if not self.wake.is_set():
            self.wake.set()

    def _take(self) -> tuple[list[Record], int]:
        with self.lock:  # type: ignore[union-attr]
            batch, self.queued = self.queued, []
            dropped, self.dropped = self.dropped, 0
            self.chars = 0
        return batch, dropped

    def _run(self) -> None:
        while not self.closing:
            self.wake.wait()
            if self.closing:
                return
            time.sleep(LINGER)  # let a burst collect into one frame
            self.wake.clear()
            batch, dropped = self._take()
            try:
                self._send(batch, dropped, None)
            except Exception:
                self.dead = True  # the parent is gone
                return

    def _send(self, batch: list[Record], dropped: int, deadline: float | None) -> None:
        """Send ``batch`` (split to fit the frame limit) and the count of dropped records, and
        write them out (until ``deadline``, if given)."""
        if not batch and not dropped:
            return
        pending = [batch]
        while pending:
            part = pending.pop()
            if self.chan.log((dropped, part)):
                self.sent += len(part)
                dropped = 0
            elif len(part) > 1:
                half = len(part) // 2
                pending += [part[half:], part[:half]]  # the first half goes first
            else:
                dropped += len(part)  # one record over the frame limit
        if dropped:
            self.chan.log((dropped, []))
        while not self.chan.flush():  # a non-blocking socket (async worker) that is full
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(POLL)

    def drain(self, deadline: float | None = None) -> None:
        """Send what is buffered now, from the calling thread."""
        if self.dead:
            return
        batch, dropped = self._take()
        with contextlib.suppress(Exception):
            self._send(batch, dropped, deadline)

    def close(self) -> None:
        """Stop the thread and send what is left, within ``CLOSE_WAIT``."""
        if self.closing:
            return
        self.closing = True
        self.wake.set()
        deadline = time.monotonic() + CLOSE_WAIT
        self.thread.join(CLOSE_WAIT)
        with contextlib.suppress(Exception):
            self.chan.set_blocking(False)  # bounded writes from here on
        self.drain(deadline)
        super().close()

    def _forked(self) -> None:
        """In a child forked by the handler: it must not write to the pool's socket."""
        self.dead = True
        logging.getLogger().removeHandler(self)


_forwarder: Forwarder | None = None


def install(chan: Any, config: dict[str, Any]) -> Forwarder:
    """Worker: forward ``logging`` records to the parent through ``chan``, with the parent's
    levels from WELCOME's ``log_levels``."""
    global _forwarder
    root = logging.getLogger()
    for name, level in (config.get("log_levels") or {}).items():
        with contextlib.suppress(TypeError, ValueError):
            (logging.getLogger(name) if name else root).setLevel(int(level))
    forwarder = _forwarder = Forwarder(chan)
    root.addHandler(forwarder)
    os.register_at_fork(after_in_child=forwarder._forked)
    return forwarder


def drain() -> None:
    """Worker: send the buffered records now (before STARTUP_FAILED, so they come first)."""
    if _forwarder is not None:
        _forwarder.drain(time.monotonic() + CLOSE_WAIT)


def close() -> None:
    """Worker, on its way out: send what is left (bounded)."""
    if _forwarder is not None:
        _forwarder.close()
