"""Functions by reference: a callable as the workers can find it, or pickled when it has no name.

A worker runs a function the parent names as ``"module:qualname"``: it imports the module and
walks the qualified name (``kameo._calls.load``). :func:`reference` turns a callable object into
that name, and checks that the name leads back to the object itself (importing
``fn.__module__``, here: from ``sys.modules``, and walking ``fn.__qualname__`` must give ``fn``):

* module-level functions and classes, builtins (``len``, ``math.hypot``), methods of builtin
  types (``str.upper``), functions and classes nested in classes (a class's staticmethod, or
  its classmethod, ``"mod:Class.method"``), and ``staticmethod``/``classmethod`` objects taken
  from a class's ``__dict__``, all by name;
* a function of the parent's ``__main__``: by the name the workers import that file as, when
  ``__main__`` is a file (``python script.py``: ``"script:f"``; ``python -m pkg.mod``:
  ``"pkg.mod:f"``) that the workers find first on their ``sys.path`` under that name
  (:func:`main_module_name`). Workers in the parent's environment (the default ``python=``,
  or another path to it: ``kameo.envs.launch``) put the parent's ``sys.path`` first on theirs,
  so a script's directory is there; with another interpreter or a ``PythonEnv``, put it there
  with ``pythonpath=[...]`` or ``cwd=``. The
  workers import that file as a module: its top-level code runs in each of them, so the code
  that starts pools goes under ``if __name__ == "__main__":`` (a pool started while a worker
  imports a module raises, see ``kameo.pool``). A notebook's, the REPL's or ``python -c``'s
  ``__main__`` has no file the workers could import: define the functions in a ``.py`` file in
  the notebook's directory (on ``sys.path``; e.g. with ``%%writefile mymod.py``) and import them.

Anything else raises :class:`~kameo.SerializationError` (a ``TypeError``) saying what the object
is and what to do: a lambda, a function defined inside another (``<locals>`` in its qualified
name), a bound method (of an instance: the instance lives here), a ``functools.partial``, a
callable instance, or a name that leads to another object. With ``allow_pickle=True`` those are
pickled with ``cloudpickle`` instead (bytes; extra ``kameo[pickle]``), which the workers load
with the stdlib's ``pickle.loads`` (:func:`load_pickled`; cloudpickle must be installed in the
workers' environment too). Importing kameo never imports cloudpickle.

A target travels as it is in the "call" op (``kameo._calls``): a ``str`` or, pickled, ``bytes``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types

from kameo.errors import SerializationError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["as_target", "describe", "load_pickled", "main_module_name", "reference"]

Target = str | bytes

#: How to get cloudpickle (the extra of pyproject.toml).
INSTALL_PICKLE = "pip install 'kameo[pickle]'"

_MOVE = (
    "define it with def at the top level of a module the workers can import (a .py file on "
    "sys.path) and pass that function"
)
_OR_PICKLE = "or pass allow_pickle=True (with cloudpickle installed) to send it pickled"


def reference(fn: Callable[..., Any], *, allow_pickle: bool = False) -> str | bytes:
    """``fn`` as the workers can load it: ``"module:qualname"`` when that name leads back to
    ``fn`` itself; otherwise, with ``allow_pickle=True``, ``cloudpickle.dumps(fn)``.

    Raises :class:`~kameo.SerializationError` (a ``TypeError``) saying why ``fn`` cannot be
    sent by name and what to do, or that cloudpickle is not installed.
    """
    name, why = _by_name(fn)
    if name is not None:
        return name
    if not allow_pickle:
        raise SerializationError(f"cannot send {_short_repr(fn)} to the workers by name: {why}")
    return _pickle(fn, why)


def as_target(target: Any, *, allow_pickle: bool = False, what: str = "target") -> str | bytes:
    """A target as it travels: a ``str`` as it is, ``bytes`` (a pickled callable, from
    :func:`reference`) when pickling is allowed, a callable through :func:`reference`."""
    if type(target) is str:
        return target
    if isinstance(target, bytes):
        if not allow_pickle:
            raise SerializationError(
                f"{what} is bytes (a pickled callable), which needs allow_pickle=True"
            )
        return bytes(target)
    if isinstance(target, str):
        return str(target)
    if not callable(target) and not isinstance(target, staticmethod | classmethod):
        raise SerializationError(
            f"{what} must be a callable or a 'module:qualname' string, not "
            f"{type(target).__name__} {_short_repr(target)}"
        )
    return reference(target, allow_pickle=allow_pickle)


def describe(target: Any) -> str:
    """A target as messages name it (a pickled one is not shown)."""
    if isinstance(target, bytes):
        return f"<a pickled callable, {len(target)} bytes>"
    return str(target)


def load_pickled(data: bytes) -> Callable[..., Any]:
    """Worker: the callable that :func:`reference` pickled (stdlib ``pickle.loads``)."""
    try:
        import pickle  # here: a worker that loads no pickled target never imports it

        fn = pickle.loads(data)
    except ModuleNotFoundError as exc:
        if exc.name == "cloudpickle" or (exc.name or "").startswith("cloudpickle."):
            raise SerializationError(
                "a callable pickled with cloudpickle cannot be loaded in this worker: "
                f"cloudpickle is not installed in the workers' environment ({INSTALL_PICKLE})"
            ) from None
        raise SerializationError(f"cannot unpickle a pickled callable: {exc}") from exc
    except Exception as exc:
        raise SerializationError(
            f"cannot unpickle a pickled callable: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(fn):
        raise SerializationError(f"a pickled target is not callable (it is {type(fn).__name__})")
    return fn  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ by name


def _by_name(fn: Any) -> tuple[str | None, str]:
    """(``"module:qualname"``, "") or (None, why not)."""
    import functools  # the parent's (a worker imports kameo._functions without it)

    if isinstance(fn, functools.partial):
        return None, (
            "a functools.partial has no importable name; pass its arguments in the call "
            f"(pool.call(f, *args)), {_MOVE}, {_OR_PICKLE}"
        )
    obj = fn
    if isinstance(fn, staticmethod | classmethod):
        fn = fn.__func__  # as found in a class's __dict__: compare what the class gives
    self_ = getattr(fn, "__self__", None)
    if self_ is not None and not isinstance(self_, type | types.ModuleType):
        return None, (
            f"it is a bound method of a {type(self_).__qualname__} instance, which lives in "
            "this process; make the object in a worker (ref = await pool.new(...), then "
            "await ref.method(...)), or use a module-level function; "
            f"{_OR_PICKLE} (the instance is pickled with it)"
        )
    qualname = getattr(fn, "__qualname__", None)
    module = _module_of(fn)
    if not isinstance(qualname, str) or not isinstance(module, str):
        return None, (
            "it has no module and qualified name to import it by (a callable "
            f"{type(obj).__qualname__} instance, not a function or class); {_MOVE}, {_OR_PICKLE}"
        )
    if "<lambda>" in qualname:
        return None, f"a lambda has no importable name; {_MOVE}, {_OR_PICKLE}"
    if "<locals>" in qualname:
        return None, (
            f"{qualname!r} is defined inside a function (a closure or nested function), which "
            f"the workers cannot import; {_MOVE}, {_OR_PICKLE}"
        )
    found = _walk(sys.modules.get(module), qualname)
    if found is _MISSING:
        return None, (
            f"{module}:{qualname} does not name it (module {module!r} is not imported here, "
            f"or has no attribute {qualname!r}); {_MOVE}, {_OR_PICKLE}"
        )
    if not _same(found, fn, obj):
        return None, (
            f"{module}:{qualname} names another object ({_short_repr(found)}): it was "
            "replaced or redefined after this one was made; pass the object that name has "
            f"now, {_OR_PICKLE}"
        )
    if module == "__main__":
        name, why = _main_name()
        if name is None:
            return None, f"it is defined in __main__, {why}; {_OR_PICKLE}"
        module = name
    return f"{module}:{qualname}", ""


_MISSING: Any = object()


def _module_of(fn: Any) -> str | None:
    module = getattr(fn, "__module__", None)
    if isinstance(module, str):
        return module
    for owner in (getattr(fn, "__objclass__", None), getattr(fn, "__self__", None)):
        if isinstance(owner, type):
            return owner.__module__
    return None


def _walk(obj: Any, qualname: str) -> Any:
    if obj is None:
        return _MISSING
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:
            return _MISSING
    return obj


def _same(found: Any, fn: Any, obj: Any) -> bool:
    if found is fn:
        return True
    if isinstance(obj, classmethod):  # from a class's __dict__: the class gives it bound
        return getattr(found, "__func__", None) is fn
    # A classmethod (or a builtin's method bound to its class): a new bound object per lookup.
    self_ = getattr(fn, "__self__", None)
    return isinstance(self_, type) and getattr(found, "__self__", None) is self_ and found == fn


# ------------------------------------------------------------------------------ __main__

_main_cache: dict[tuple[Any, ...], tuple[str | None, str]] = {}


def main_module_name() -> str | None:
    """The module name the workers import the parent's ``__main__`` as, or None when they
    cannot (a notebook, the REPL, ``python -c``, a script they would not find by that name)."""
    return _main_name()[0]


def _main_name() -> tuple[str | None, str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    spec_name = getattr(spec, "name", None)
    if isinstance(spec_name, str) and spec_name and spec_name != "__main__":
        return spec_name, ""  # python -m pkg.mod: the workers import pkg.mod
    file = getattr(main, "__file__", None)
    if not isinstance(file, str):
        return None, (
            "which has no file (a notebook, the REPL or python -c) the workers could import; "
            "put it in a .py file in this directory (on sys.path; in a notebook e.g. with "
            "%%writefile mymod.py) and import it from there"
        )
    key = (file, os.getcwd(), *sys.path)
    cached = _main_cache.get(key)
    if cached is None:
        if len(_main_cache) > 16:
            _main_cache.clear()
        cached = _main_cache[key] = _script_name(file)
    return cached


def _script_name(file: str) -> tuple[str | None, str]:
    """The module name of script ``file`` if the workers (the parent's sys.path first) would
    import that very file by it."""
    path = os.path.realpath(file)
    directory, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    where = f"the script {file!r}"
    if ext != ".py" or not stem.isidentifier():
        return None, f"{where}, which is not importable as a module (its name is not 'name.py')"
    if stem in sys.builtin_module_names or importlib.machinery.FrozenImporter.find_spec(stem):
        return None, f"{where}, whose name {stem!r} is the one of a built-in module; rename it"
    loaded = sys.modules.get(stem)
    loaded_file = getattr(loaded, "__file__", None)
    if loaded is not None and (
        not isinstance(loaded_file, str) or os.path.realpath(loaded_file) != path
    ):
        return None, f"{where}, whose name {stem!r} is the one of another module; rename it"
    cwd = os.getcwd()
    search = [os.path.join(cwd, p) for p in sys.path if isinstance(p, str)]
    found = importlib.machinery.PathFinder.find_spec(stem, search)
    origin = getattr(found, "origin", None)
    if not isinstance(origin, str) or os.path.realpath(origin) != path:
        return None, (
            f"{where}: the workers would not import it as {stem!r} (its directory "
            f"{directory!r} is not on sys.path, or another {stem!r} comes first); add the "
            "directory to sys.path, or move the function to a module"
        )
    return stem, ""


# ------------------------------------------------------------------------------ pickled


def _pickle(fn: Any, why: str) -> bytes:
    try:
        cloudpickle = importlib.import_module("cloudpickle")
    except ImportError:
        raise SerializationError(
            f"cannot send {_short_repr(fn)} to the workers by name ({why.split(';')[0]}), and "
            f"allow_pickle=True needs cloudpickle, which is not installed: {INSTALL_PICKLE}"
        ) from None
    try:
        data: bytes = cloudpickle.dumps(fn)
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle {_short_repr(fn)} with cloudpickle: {type(exc).__name__}: {exc}"
        ) from exc
    return data


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= 120 else text[:117] + "..."
