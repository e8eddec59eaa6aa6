"""An exception class that only a worker imports until a test imports it in the parent
(``tests/test_error_classes.py``; no other test may import this module)."""

from __future__ import annotations

from typing import Any


class LazyError(Exception):
    pass


def raise_lazy(msg: Any) -> Any:
    raise LazyError(f"lazy {msg}")
