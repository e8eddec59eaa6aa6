"""Handlers that raise exceptions of their own classes (``tests/test_error_classes.py``).

The test process imports this module too (to catch its classes): no side effects at import.
"""

from __future__ import annotations

import importlib
from typing import Any

import kameo


class AppError(Exception):
    """A plain custom exception."""


class CodeError(Exception):
    """Positional arguments other than a message, kept as attributes."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class KeywordOnlyError(Exception):
    """An __init__ that neither its args nor its message can call."""

    def __init__(self, *, reason: str) -> None:
        super().__init__(f"reason: {reason}")
        self.reason = reason


class Outer:
    class NestedError(ValueError):
        """A class nested in a class, also a ValueError."""


class ReadOnlyPid(Exception):
    """An attribute RemoteError sets is a read-only property here."""

    @property
    def pid(self) -> int:
        return -1


class NoSubclasses(Exception):
    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("NoSubclasses takes no subclasses")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def raise_app(msg: Any) -> Any:
    raise AppError(f"app failure {msg}")


def raise_code(code: int, detail: str) -> Any:
    raise CodeError(code, detail)


def raise_keyword_only(reason: str) -> Any:
    raise KeywordOnlyError(reason=reason)


def raise_nested(msg: Any) -> Any:
    raise Outer.NestedError(f"nested {msg}")


def raise_read_only_pid() -> Any:
    raise ReadOnlyPid("read-only pid")


def raise_no_subclasses() -> Any:
    raise NoSubclasses("no subclasses")


def raise_unprintable() -> Any:
    raise Unprintable("hidden")


def raise_from(module: str, name: str, *args: Any) -> Any:
    """Raise ``module.name(*args)``: a class of a module only the worker imports."""
    raise getattr(importlib.import_module(module), name)(*args)


def raise_builtin(name: str, *args: Any) -> Any:
    import builtins

    raise getattr(builtins, name)(*args)


def raise_kameo() -> Any:
    raise kameo.CallTimeout("a nested pool's timeout")


def handler(msg: dict[str, Any]) -> Any:
    """``pool.ask`` dispatch: ``{"raise": name, "args": [...]}``."""
    return globals()[msg["raise"]](*msg.get("args", ()))


async def catch_parent_error(msg: dict[str, Any]) -> dict[str, Any]:
    """Call a parent handler that raises, and catch its error by its class."""
    try:
        async for _ in await kameo.callback_handle(msg["path"], None):
            pass
    except AppError as exc:
        return {
            "caught": "AppError",
            "args": list(exc.args),
            "remote": isinstance(exc, kameo.RemoteError),
        }
    except Exception as exc:
        return {
            "caught": None,
            "type": type(exc).__name__,
            "remote_type": getattr(exc, "remote_type", ""),
        }
    return {"caught": None}
