"""Functions and classes passed by reference (``kameo.Pool(f)``, ``pool.call(f, ...)``).

The test process imports this module too: no side effects at import time.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

#: What the init hook received, in this worker.
INIT_ARGS: list[Any] = []


def add(a: Any, b: Any) -> Any:
    return a + b


def double(msg: Any) -> Any:
    return msg * 2


async def adouble(msg: Any) -> Any:
    await asyncio.sleep(0)
    return msg * 2


def count(n: int) -> Any:
    yield from range(n)


def pid() -> int:
    return os.getpid()


class Adder:
    """An adapter class: one instance per worker; ``ask`` calls it."""

    def __init__(self) -> None:
        self.base = 100

    def __call__(self, msg: Any) -> Any:
        return self.base + msg

    def plus(self, x: Any) -> Any:
        return self.base + x


class Tools:
    @staticmethod
    def twice(x: Any) -> Any:
        return [x, x]

    @classmethod
    def name(cls) -> str:
        return cls.__qualname__

    class Inner:
        @staticmethod
        def deep(x: Any) -> Any:
            return ("deep", x)


class Point:
    """A value the codec does not know: it travels pickled (``allow_pickle=True``)."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


def setup(*args: Any, **kwargs: Any) -> None:
    """An init hook: records its arguments."""
    INIT_ARGS.append([list(args), kwargs])


async def asetup(*args: Any) -> None:
    await asyncio.sleep(0)
    INIT_ARGS.append(["async", list(args)])


def init_args() -> list[Any]:
    return INIT_ARGS


def init_points() -> list[Any]:
    return [[p.x, p.y] for args, _ in INIT_ARGS for p in args if isinstance(p, Point)]


def make_adder(n: int) -> Any:
    """A closure: not importable by name."""

    def adder(x: Any) -> Any:
        return x + n

    return adder


class Callable:
    """Its instances are callable, but have no name to be imported by."""

    def __call__(self, x: Any) -> Any:
        return x


replaced = add  # "handlers.funcs:replaced" names add, whose qualname is "add"
