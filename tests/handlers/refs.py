"""Handlers that answer with remote object references (kameo._native's 0x1F values).

They are the tokens a worker sends for the objects it keeps (``kameo._calls.token``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kameo._calls import token as Ref


def make(msg: dict[str, Any]) -> Any:
    """Reply with ``[Ref(wid, n, type) ...]`` for each of ``msg["nums"]``."""
    return [Ref(msg["wid"], n, msg["type"]) for n in msg["nums"]]


def stream(msg: dict[str, Any]) -> Iterator[Any]:
    for n in msg["nums"]:
        yield {"ref": Ref(msg["wid"], n, msg["type"])}
