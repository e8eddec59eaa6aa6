"""Handlers that answer with remote object references (kameo._native's 0x1F values).

Until kameo.Ref exists the test registers its own slotted class, here in the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kameo import _native


class Ref:
    __slots__ = ("_key", "_num", "_type", "_wid")

    def __init__(self, wid: int, num: int, type_name: str) -> None:
        self._wid = wid
        self._num = num
        self._type = type_name
        self._key = 0


_native.set_ref_type(Ref)


def make(msg: dict[str, Any]) -> Any:
    """Reply with ``[Ref(wid, n, type) ...]`` for each of ``msg["nums"]``."""
    return [Ref(msg["wid"], n, msg["type"]) for n in msg["nums"]]


def stream(msg: dict[str, Any]) -> Iterator[Any]:
    for n in msg["nums"]:
        yield {"ref": Ref(msg["wid"], n, msg["type"])}
