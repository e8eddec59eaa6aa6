"""Worker side of :mod:`kameo._worker_log`: the root handler that forwards ``logging`` records.

Imported by :func:`kameo._worker_log.install` only once the worker's ``logging`` is imported (a
worker whose code never logs imports neither ``logging`` nor this module).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback

from kameo._worker_log import CLOSE_WAIT, LINGER, MAX_QUEUED, MAX_QUEUED_CHARS, MAX_TEXT, POLL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kameo._worker_log import Record

__all__ = ["Forwarder"]


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
