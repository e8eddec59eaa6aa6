"""Stand-ins for the few stdlib pieces a worker needs before it serves, without their modules.

A worker that imports ``contextlib`` pays ``collections`` and ``functools`` with it, and one
that imports ``threading`` pays the same again: ~4 ms of a fresh interpreter's ~20 ms start
(``python benches/bench_start.py``), and the zygote's. These are the same objects or the same
behaviour, from modules every interpreter has loaded already. Code that runs in the parent, or
only once a worker uses a feature, imports the stdlib modules as usual.
"""

from __future__ import annotations

import _thread

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections import deque as deque
    from collections.abc import Callable
    from types import TracebackType
    from typing import Any
else:
    from _collections import deque  # collections.deque is this type, re-exported

__all__ = ["deque", "start_thread", "suppress"]


class suppress:
    """``contextlib.suppress``: the listed exceptions end the ``with`` block silently."""

    __slots__ = ("exceptions",)

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self.exceptions = exceptions

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return kind is not None and issubclass(kind, self.exceptions)


def start_thread(target: Callable[[], Any]) -> None:
    """Run ``target`` in a new daemon thread (``threading`` not imported for it: the thread
    is not in ``threading.enumerate()``, and the interpreter does not wait for it at exit)."""
    _thread.start_new_thread(target, ())
