"""``Pool.map``: a function (or the pool's handler) over a lazy input, results as they come.

:class:`MapResults` is the async iterator ``Pool.map`` returns. It pulls the input (a sync or
async iterable) only as far as its window allows: at most ``window`` items are in flight or
done and not yet taken, so a ten-million-item generator is never materialised. Items travel
in *batches* (the ``batch`` call op, ``kameo._calls``): one CALL runs the function on each item
of a list in one worker and answers with every result, so tiny items cost one round trip per
batch instead of one each. With ``chunksize=None`` the batch size adapts: it aims at batches of
about :data:`BATCH_SECONDS` of work per worker, from the measured time between answers, so
slow items go one by one and fast ones in batches of up to :data:`MAX_BATCH`.

Results come in input order (``ordered=True``) or as batches finish. An item that raised is
raised where its result would be (the remaining work is cancelled), or with
``return_exceptions=True`` yielded in its place. Leaving the loop early (``break``, an
exception, the iterator collected) cancels what is in flight in the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections import deque
from collections.abc import AsyncIterable, Iterable
from itertools import islice
from typing import TYPE_CHECKING, Any

from kameo import _error_info, _progress

if TYPE_CHECKING:
    from kameo._future import AskFuture
    from kameo.pool import Pool

__all__ = ["MapResults"]

#: With an adaptive batch size: the work one batch should hold, per worker (seconds).
BATCH_SECONDS = 0.002
#: The largest adaptive batch.
MAX_BATCH = 1024
#: The most results :meth:`MapResults.take` hands over at once.
MAX_TAKE = 65536
#: Op flag of ``batch``: each item is a tuple of arguments (``kameo._calls.STAR``).
STAR = 2


class _Batch:
    """One batch in flight: its future, how many items, and (once answered) its outcomes."""

    __slots__ = ("errors", "fut", "n", "values")

    def __init__(self, fut: AskFuture, n: int) -> None:
        self.fut = fut
        self.n = n
        self.values: list[Any] | None = None
        self.errors: dict[int, BaseException] | None = None


class MapResults:
    """The results of ``Pool.map``: ``async for r in pool.map(items, fn): ...``."""

    def __init__(
        self,
        pool: Pool,
        items: Iterable[Any] | AsyncIterable[Any],
        target: str | bytes | None,
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        window: int | None = None,
        chunksize: int | None = None,
        timeout: float | None = None,
        progress: bool = False,
        star: bool = False,
    ) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize}")
        self._pool = pool
        self._target = target
        self._flags = STAR if star else 0
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self._timeout = timeout
        self._window = window
        # A timeout bounds each item: batches of one, unless a batch size is asked for.
        self._fixed = chunksize if chunksize is not None else (1 if timeout is not None else None)
        self._batch_size = self._fixed or 1
        self._workers = max(1, pool.size)
        if isinstance(items, AsyncIterable):
            self._it: Any = None
            self._ait: Any = items.__aiter__()
        else:
            self._it = iter(items)
            self._ait = None
        try:
            total: int | None = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
        self._left = total  # items not yet pulled, when the input has a length
        self._bar = _progress.bar(total) if progress else None
        self._exhausted = False
        self._closed = False
        self._in_flight = 0  # items pulled and not yet taken by the consumer
        self._pending: deque[_Batch] = deque()  # submitted, in input order (ordered)
        self._ready: deque[_Batch] = deque()  # answered, in answer order (unordered)
        self._flying: set[_Batch] = set()  # submitted, not answered
        self._waiter: asyncio.Future[None] | None = None
        self._values: list[Any] = []  # the batch being delivered
        self._errors: dict[int, BaseException] | None = None
        self._pos = 0
        # Adaptive batch size: time of the last answer, and seconds per item per worker.
        self._last_answer = 0.0
        self._per_item: float | None = None
        self._ref = weakref.ref(self)

    def __aiter__(self) -> MapResults:
        return self

    async def __anext__(self) -> Any:
        while True:
            values = self._values
            pos = self._pos
            if pos < len(values):
                self._pos = pos + 1
                self._in_flight -= 1
                errors = self._errors
                if errors is not None and pos in errors:
                    exc = errors.pop(pos)
                    if self._return_exceptions:
                        return exc
                    self.close()
                    raise exc
                return values[pos]
            if not await self._advance():
                raise StopAsyncIteration

    async def take(self) -> tuple[list[Any], dict[int, BaseException] | None]:
        """The rest of the current batch, else the next one (waiting for it): its values and
        the errors at their positions; ``([], None)`` at the end. One hop per batch for a
        consumer on another thread (``Executor.map``)."""
        if self._pos >= len(self._values) and not await self._advance():
            return [], None
        pos = self._pos
        values, errors = self._values, self._errors
        self._pos = len(values)
        self._in_flight -= len(values) - pos
        values = values[pos:]  # ours to extend
        if errors is not None and pos:
            errors = {i - pos: e for i, e in errors.items() if i >= pos}
        # And the batches answered after it: one hop for all that is ready.
        while len(values) < MAX_TAKE:
            batch = self._answered_now()
            if batch is None:
                break
            if batch.errors:
                base = len(values)
                errors = dict(errors) if errors else {}
                errors.update((base + i, e) for i, e in batch.errors.items())
            values.extend(batch.values or ())
            self._in_flight -= batch.n
            if self._bar is not None:
                self._bar.update(batch.n)
        return values, errors

    async def _advance(self) -> bool:
        """Top the window up, then make the next answered batch the current one (waiting for
        it); False at the end (closed, or nothing left)."""
        if self._closed:
            return False
        try:
            await self._fill()
            batch = await self._next_answered()
        except BaseException:
            self.close()
            raise
        if batch is None:
            self.close()
            return False
        self._values, self._errors, self._pos = batch.values or [], batch.errors, 0
        if self._bar is not None:
            self._bar.update(batch.n)
        return True

    def _answered_now(self) -> _Batch | None:
        """The next batch to deliver if it is already answered."""
        if self._ordered:
            pending = self._pending
            if pending and pending[0].values is not None:
                return pending.popleft()
            return None
        return self._ready.popleft() if self._ready else None

    async def aclose(self) -> None:
        """Stop: cancel what is in flight (also done when the loop is left, or on collection)."""
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for batch in self._flying:
            batch.fut.cancel()
        self._flying.clear()
        self._pending.clear()
        self._ready.clear()
        self._values, self._errors = [], None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # a closed loop: nothing left to cancel
                self.close()

    # ----------------------------------------------------------------- input and batches

    def _limit(self) -> int:
        if self._window is not None:
            return self._window
        return max(16, 4 * self._workers * self._batch_size)

    async def _fill(self) -> None:
        """Pull and submit batches while the window has room."""
        limit = self._limit()
        while not self._exhausted and self._in_flight < limit:
            n = min(self._batch_size, limit - self._in_flight)
            if self._fixed is None and self._left is not None:
                # The tail: split what is left over the workers rather than one big batch.
                n = max(1, min(n, -(-self._left // (2 * self._workers))))
            if self._it is not None:
                batch = list(islice(self._it, n))
            else:
                batch = []
                ait = self._ait
                for _ in range(n):
                    try:
                        batch.append(await ait.__anext__())
                    except StopAsyncIteration:
                        break
            if len(batch) < n:
                self._exhausted = True
            if not batch:
                return
            if self._left is not None:
                self._left -= len(batch)
            self._submit(batch)

    def _submit(self, items: list[Any]) -> None:
        op = ("batch", None, self._target, items, self._flags)
        timeout = None if self._timeout is None else self._timeout * len(items)
        fut = self._pool._submit_op(op, None, timeout)
        batch = _Batch(fut, len(items))
        self._in_flight += len(items)
        self._flying.add(batch)
        if self._ordered:
            self._pending.append(batch)
        fut.add_done_callback(functools.partial(_answered, self._ref, batch))

    def _answered(self, batch: _Batch) -> None:
        """A batch's future is done (a loop callback): its outcomes, and the batch size."""
        if self._closed:
            return
        self._flying.discard(batch)
        fut = batch.fut
        if fut.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        else:
            exc = fut.exception()
        if exc is not None:
            batch.values = [None] * batch.n
            batch.errors = dict.fromkeys(range(batch.n), exc)
        else:
            reply = fut.result()
            batch.values = reply[1]
            if reply[0] != "ok":
                _, _, infos, wid, pid = reply
                batch.errors = {
                    i: _error_info.from_worker(info, wid, pid) for i, info in infos.items()
                }
            self._measure(batch.n)
        if not self._ordered:
            self._ready.append(batch)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _measure(self, n: int) -> None:
        """Adapt the batch size to the time between answers (about one batch per worker)."""
        now = time.perf_counter()
        last, self._last_answer = self._last_answer, now
        if self._fixed is not None or last == 0.0:
            return
        per_item = (now - last) * self._workers / n
        est = self._per_item
        est = per_item if est is None else 0.7 * est + 0.3 * per_item
        self._per_item = est
        self._batch_size = max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est, 1e-9))))

    async def _next_answered(self) -> _Batch | None:
        """The next batch to deliver (in input order, or in answer order), None at the end."""
        loop = asyncio.get_running_loop()
        while True:
            if self._ordered:
                if not self._pending:
                    return None
                head = self._pending[0]
                if head.values is not None:
                    self._pending.popleft()
                    return head
            else:
                if self._ready:
                    return self._ready.popleft()
                if not self._flying:
                    return None
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


def _answered(ref: weakref.ref[MapResults], batch: _Batch, _fut: Any) -> None:
    """A batch's done callback. It holds its MapResults weakly: an iterator dropped while its
    batches are in flight is collected, and cancels them."""
    results = ref()
    if results is not None:
        results._answered(batch)
