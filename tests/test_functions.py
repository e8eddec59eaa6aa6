"""Functions by reference: ``kameo.Pool(f)``, ``pool.call(f, ...)``, ``init=f`` with
``initargs``, what cannot be sent by name (and the errors saying so), ``allow_pickle=True``, and
functions of a script's ``__main__``."""

from __future__ import annotations

import asyncio
import collections
import functools
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kameo
import pytest
from handlers import funcs
from kameo._functions import reference

HAS_CLOUDPICKLE = importlib.util.find_spec("cloudpickle") is not None
needs_cloudpickle = pytest.mark.skipif(
    not HAS_CLOUDPICKLE, reason="cloudpickle is not installed (extra kameo[pickle])"
)


# ------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("fn", "name"),
    [
        (funcs.add, "handlers.funcs:add"),
        (funcs.Adder, "handlers.funcs:Adder"),
        (funcs.Tools.twice, "handlers.funcs:Tools.twice"),
        (funcs.Tools.name, "handlers.funcs:Tools.name"),
        (vars(funcs.Tools)["twice"], "handlers.funcs:Tools.twice"),
        (vars(funcs.Tools)["name"], "handlers.funcs:Tools.name"),
        (funcs.Tools.Inner.deep, "handlers.funcs:Tools.Inner.deep"),
        (len, "builtins:len"),
        (math.hypot, "math:hypot"),
        (str.upper, "builtins:str.upper"),
        (dict.fromkeys, "builtins:dict.fromkeys"),
        (collections.Counter, "collections:Counter"),
    ],
)
def test_reference_names_what_the_workers_import(fn, name):
    assert reference(fn) == name
    assert reference(fn, allow_pickle=True) == name  # by name whenever it can be


async def test_calls_by_reference_run_in_the_workers():
    async with kameo.Pool(size=1) as pool:
        assert await pool.call(funcs.add, 2, 3) == 5
        assert await pool.call(math.hypot, 3, 4) == 5.0
        assert await pool.call(str.upper, "abc") == "ABC"
        assert await pool.call(funcs.Tools.twice, 7) == [7, 7]
        assert await pool.call(funcs.Tools.name) == "Tools"
        assert await pool.call(vars(funcs.Tools)["twice"], 1) == [1, 1]
        assert await pool.call(funcs.Tools.Inner.deep, 2) == ("deep", 2)
        assert await pool.call(funcs.adouble, 21) == 42
        assert await pool.call(funcs.pid) != os.getpid()
        c = await pool.new(collections.Counter, "abracadabra")
        assert c.type_name == "collections.Counter"
        assert await c.most_common(1) == [("a", 5)]
        adder = await pool.new(funcs.Adder)
        assert await adder.plus(1) == 101
        assert [x async for x in pool.call_stream(funcs.count, 4)] == [0, 1, 2, 3]
        f = pool.function(funcs.add, timeout=10.0)
        assert f.target == "handlers.funcs:add"
        assert await asyncio.gather(*(f(i, 1) for i in range(5))) == [1, 2, 3, 4, 5]
        p = pool.pipeline()
        a = p.call(funcs.add, 1, 2)
        p.call(funcs.double, a)
        p.new(collections.Counter, "aab")
        first, second, counter = await p.run()
        assert (first, second) == (3, 6)
        assert counter.type_name == "collections.Counter"
        async with pool.session() as s:
            assert await s.call(funcs.add, "a", "b") == "ab"
            d = await s.new(collections.OrderedDict)
            assert d.type_name == "collections.OrderedDict"
            assert [x async for x in s.call_stream(funcs.count, 2)] == [0, 1]


async def test_pool_of_a_function_is_the_pool_of_its_name():
    async with kameo.Pool(funcs.double, size=2) as pool:
        assert pool.target == "handlers.funcs:double"
        assert await asyncio.gather(*(pool.ask(i) for i in range(6))) == [0, 2, 4, 6, 8, 10]
    async with kameo.Pool(funcs.adouble, size=1, max_concurrency=4) as pool:
        assert await pool.ask("ab") == "abab"
    async with kameo.Pool(funcs.count, size=1) as pool:
        assert [x async for x in pool.stream(3)] == [0, 1, 2]


async def test_pool_of_an_adapter_class():
    async with kameo.Pool(funcs.Adder, size=1) as pool:
        assert pool.target == "handlers.funcs:Adder"
        assert await pool.ask(5) == 105
        assert await pool.call("plus", 1) == 101


# ------------------------------------------------------------------------ not by name


def _closure():
    n = 3

    def inner(x):
        return x + n

    return inner


class _Holder:
    def method(self, x):
        return x


@pytest.mark.parametrize(
    ("fn", "words"),
    [
        (lambda x: x, ["<lambda>", "a lambda", "top level of a module"]),
        (_closure(), ["_closure.<locals>.inner", "inside a function", "top level of a module"]),
        (funcs.make_adder(1), ["make_adder.<locals>.adder", "inside a function"]),
        (_Holder().method, ["bound method", "_Holder instance", "pool.new"]),
        ([].append, ["bound method", "list instance"]),
        (functools.partial(funcs.add, 1), ["functools.partial", "pass its arguments"]),
        (funcs.Callable(), ["callable Callable instance", "not a function or class"]),
    ],
    ids=["lambda", "closure", "nested", "bound-method", "builtin-bound", "partial", "instance"],
)
def test_what_has_no_name_raises_saying_why_and_what_to_do(fn, words):
    with pytest.raises(kameo.SerializationError) as ei:
        reference(fn)
    assert isinstance(ei.value, TypeError)
    msg = str(ei.value)
    assert repr(fn)[:40] in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    assert "allow_pickle=True" in msg, msg


def test_a_name_that_leads_to_another_object_is_refused():
    def add(a, b):  # the qualname of funcs.add, but another function
        return a - b

    add.__module__, add.__qualname__ = "handlers.funcs", "add"
    with pytest.raises(kameo.SerializationError, match="names another object"):
        reference(add)
    gone = funcs.make_adder(1)
    gone.__qualname__ = "no_such_function"
    with pytest.raises(kameo.SerializationError, match="has no attribute 'no_such_function'"):
        reference(gone)


def test_a_non_callable_target_is_refused():
    with pytest.raises(kameo.SerializationError, match="must be a callable"):
        kameo.Pool(42)  # type: ignore[arg-type]


async def test_pool_api_raises_at_the_call_for_what_has_no_name():
    with pytest.raises(kameo.SerializationError, match="a lambda"):
        kameo.Pool(lambda m: m)
    with pytest.raises(kameo.SerializationError, match="a lambda"):
        kameo.Pool(init=lambda: None)
    async with kameo.Pool(size=1) as pool:
        for submit in (pool.call, pool.new, pool.call_stream, pool.function):
            with pytest.raises(kameo.SerializationError, match="inside a function"):
                submit(_closure())
        with pytest.raises(kameo.SerializationError, match="bound method"):
            pool.pipeline().call(_Holder().method, 1)
        async with pool.session() as s:
            with pytest.raises(kameo.SerializationError, match="a lambda"):
                s.call(lambda: 1)
        # pickled bytes need a pool that allows pickle
        with pytest.raises(kameo.SerializationError, match="allow_pickle=True"):
            pool.call(b"\x80\x05N.")
        assert await pool.call(funcs.add, 1, 1) == 2  # and the pool goes on


# ------------------------------------------------------------------------ allow_pickle


def test_allow_pickle_without_cloudpickle_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # import cloudpickle fails
    for fn in (lambda x: x, _closure(), _Holder().method):
        with pytest.raises(kameo.SerializationError) as ei:
            reference(fn, allow_pickle=True)
        msg = str(ei.value)
        assert "pip install 'kameo[pickle]'" in msg, msg
        assert "cloudpickle" in msg and "not installed" in msg, msg
    with pytest.raises(kameo.SerializationError, match=r"kameo\[pickle\]"):
        kameo.Pool(lambda m: m, allow_pickle=True)
    assert reference(funcs.add, allow_pickle=True) == "handlers.funcs:add"  # no pickle needed


def test_importing_kameo_does_not_import_cloudpickle():
    code = "import sys, kameo, kameo._functions, kameo._worker; print('cloudpickle' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


@needs_cloudpickle
async def test_allow_pickle_sends_what_has_no_name_pickled():
    offset = 10
    async with kameo.Pool(size=1, allow_pickle=True) as pool:
        lam = lambda x: x * 3  # noqa: E731
        assert isinstance(reference(lam, allow_pickle=True), bytes)
        assert await pool.call(lam, 2) == 6
        assert await pool.call(lam, 3) == 9  # again: known in the worker (fast path)
        assert await pool.call(lambda x: x + offset, 1) == 11
        assert await pool.call(_closure(), 1) == 4
        assert await pool.call(_Holder().method, "m") == "m"
        assert await pool.call(functools.partial(funcs.add, 100), 1) == 101
        assert [x async for x in pool.call_stream(lambda n: iter(range(n)), 3)] == [0, 1, 2]
        f = pool.function(lambda a, b: a - b)
        assert isinstance(f.target, bytes)
        assert await f(5, 2) == 3
        p = pool.pipeline()
        a = p.call(lam, 1)
        p.call(lambda v: [v, v], a)
        assert await p.run() == [3, [3, 3]]
        async with pool.session() as s:
            assert await s.call(lambda: kameo.current_session()) == s.id
        # A closure's bytes change with what it captured: many of them, each right.
        results = await asyncio.gather(*(pool.call(funcs.make_adder(i), 1) for i in range(600)))
        assert results == [i + 1 for i in range(600)]
        assert await pool.call(lam, 4) == 12


@needs_cloudpickle
async def test_pickled_handler_and_init():
    calls = []
    async with kameo.Pool(
        lambda m: [m, calls],
        size=1,
        init=lambda tag: funcs.INIT_ARGS.append(tag),
        initargs=("pickled-init",),
        allow_pickle=True,
    ) as pool:
        assert pool.target is not None and pool.target.endswith("(pickled)")
        assert await pool.ask(1) == [1, []]
        assert await pool.call(funcs.init_args) == ["pickled-init"]


@needs_cloudpickle
async def test_a_pickled_function_that_raises():
    def fails(x):
        raise ValueError(f"pickled failure {x}")

    async with kameo.Pool(size=1, allow_pickle=True) as pool:
        with pytest.raises(ValueError, match="pickled failure 3") as ei:
            await pool.call(fails, 3)
        assert isinstance(ei.value, kameo.RemoteError)


# ------------------------------------------------------------------------ init and initargs


async def test_init_function_with_initargs():
    async with kameo.Pool(
        size=2, init=funcs.setup, initargs=(1, "two", [3.0], {"k": None})
    ) as pool:
        got = await asyncio.gather(*(pool.call(funcs.init_args) for _ in range(4)))
        assert got == [[[[1, "two", [3.0], {"k": None}], {}]]] * 4


async def test_init_string_with_initargs_and_async_init():
    async with kameo.Pool(size=1, init="handlers.funcs:setup", initargs=[7]) as pool:
        assert await pool.call(funcs.init_args) == [[[7], {}]]
    async with kameo.Pool(size=1, init=funcs.asetup, initargs=("a",), max_concurrency=2) as pool:
        assert await pool.call(funcs.init_args) == [["async", ["a"]]]
    async with kameo.Pool(size=1, init=funcs.setup) as pool:  # no initargs: called with none
        assert await pool.call(funcs.init_args) == [[[], {}]]


async def test_initargs_of_types_the_codec_does_not_know():
    with pytest.raises(kameo.SerializationError) as ei:
        kameo.Pool(size=1, init=funcs.setup, initargs=(1, funcs.Point(1, 2)))
    assert "initargs cannot be encoded" in str(ei.value)
    assert "Point" in str(ei.value)
    assert "allow_pickle=True" in str(ei.value)
    pool = kameo.Pool(size=1, init=funcs.setup, initargs=(funcs.Point(1, 2),), allow_pickle=True)
    async with pool:
        assert await pool.call(funcs.init_points) == [[1, 2]]


def test_initargs_need_init_and_room():
    with pytest.raises(ValueError, match="initargs given without init"):
        kameo.Pool(size=1, initargs=(1,))
    with pytest.raises(kameo.SerializationError, match="handshake"):
        kameo.Pool(size=1, init=funcs.setup, initargs=(b"x" * (1 << 20),))


async def test_a_failing_init_names_itself():
    with pytest.raises(kameo.WorkerStartupError) as ei:
        async with kameo.Pool(size=1, init=funcs.add, initargs=(1,)):
            pass
    msg = str(ei.value)
    assert "run init hook" in msg and "handlers.funcs:add" in msg, msg
    assert "TypeError" in msg, msg


# ------------------------------------------------------------------------ __main__

SCRIPT = """
import asyncio
import kameo


class Boom(Exception):
    pass


def square(x):
    return x * x


def boom(x):
    raise Boom(f"boom {x}")


async def main():
    print("target", kameo.Pool(square).target)
    async with kameo.Pool(square, size=1) as pool:
        print("ask", await pool.ask(7))
        print("call", await pool.call(square, 3))
        try:
            await pool.call(boom, 5)
        except Boom as e:
            print("caught", type(e).__name__, isinstance(e, kameo.RemoteError), e.args)
{guard}
"""


def _run_script(tmp_path: Path, source: str, name: str = "userscript.py", **kw):
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=kw.pop("cwd", tmp_path),
        **kw,
    )


def test_a_scripts_functions_go_by_the_scripts_module_name(tmp_path):
    guard = 'if __name__ == "__main__":\n    asyncio.run(main())\n'
    other = tmp_path / "elsewhere"
    other.mkdir()
    proc = _run_script(tmp_path, SCRIPT.replace("{guard}", guard), cwd=other)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        "target userscript:square",
        "ask 49",
        "call 9",
        "caught RemoteBoom True ('boom 5',)",
    ], proc.stdout


def test_a_script_that_starts_pools_at_import_is_told_to_guard_them(tmp_path):
    proc = _run_script(tmp_path, SCRIPT.replace("{guard}", "asyncio.run(main())\n"))
    assert proc.returncode != 0
    assert "WorkerStartupError" in proc.stderr, proc.stderr
    assert "while it imported 'userscript'" in proc.stderr, proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr, proc.stderr


def test_a_script_the_workers_cannot_import(tmp_path):
    source = """
    import os, sys
    import kameo
    from kameo._functions import reference

    def f():
        pass

    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p) != here]
    try:
        reference(f)
    except kameo.SerializationError as e:
        print(e)
    """
    proc = _run_script(tmp_path, source, name="not-a-module.py")
    assert proc.returncode == 0, proc.stderr
    assert "not importable as a module" in proc.stdout, proc.stdout
    proc = _run_script(tmp_path, source, name="offpath.py")
    assert proc.returncode == 0, proc.stderr
    assert "is not on sys.path" in proc.stdout, proc.stdout
    assert "allow_pickle=True" in proc.stdout, proc.stdout


def test_main_without_a_file_says_what_to_do_in_a_notebook():
    code = textwrap.dedent(
        """
        import kameo
        def f():
            pass
        try:
            kameo.Pool(f)
        except kameo.SerializationError as e:
            print(e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    msg = proc.stdout
    assert "defined in __main__" in msg, msg
    assert "notebook" in msg and ".py file" in msg and "%%writefile" in msg, msg
    assert "allow_pickle=True" in msg, msg


def test_python_dash_m_module_functions_go_by_its_name(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tool.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            import kameo

            def triple(x):
                return 3 * x

            async def main():
                async with kameo.Pool(size=1) as pool:
                    print(kameo.Pool(triple).target, await pool.call(triple, 5))

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypkg.tool"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "mypkg.tool:triple 15"


def _f(x):
    return x


async def _af(x):
    return x


def _g(x):
    yield x


async def _ag(x):
    yield x


class _Callables:
    def m(self, x):
        return x

    async def am(self, x):
        return x

    def __call__(self, x):
        yield x


class _AsyncCallable:
    async def __call__(self, x):
        return x


KIND_CASES = [
    _f,
    _af,
    _g,
    _ag,
    _Callables().m,
    _Callables().am,
    _Callables(),
    _AsyncCallable(),
    _Callables.m,
    len,
    "".upper,
    str.upper,
    functools.partial(_f, 1),
    functools.partial(_af, 1),
    functools.partial(_ag),
    lambda: 1,
    staticmethod(_af),
    functools.wraps(_af)(lambda *a: 1),
    _Callables,
]
if sys.version_info >= (3, 12):
    import inspect

    KIND_CASES.append(inspect.markcoroutinefunction(lambda: 1))


@pytest.mark.parametrize("fn", KIND_CASES, ids=repr)
def test_a_handler_kind_is_what_inspect_says(fn):
    """A worker reads a plain function's code flags instead of importing inspect: every kind
    of callable is judged as inspect judges it (callable objects by their __call__)."""
    import inspect

    from kameo._handler import handler_kind

    call = fn if inspect.isroutine(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    if inspect.isasyncgenfunction(call):
        expected = "asyncgen"
    elif inspect.iscoroutinefunction(call):
        expected = "async"
    elif inspect.isgeneratorfunction(call):
        expected = "gen"
    else:
        expected = "sync"
    assert handler_kind(fn) == expected
