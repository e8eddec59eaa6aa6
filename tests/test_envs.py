"""Worker environments: kameo.PythonEnv, hermetic workers, Pool(python=..., pythonpath=...).

Everything runs offline: the packages are tiny wheels built here (a zip with the module and
its ``.dist-info``: METADATA, WHEEL, RECORD) installed with ``find_links=[dir], offline=True``.
Envs go to a temporary ``KAMEO_CACHE_DIR``. The installer is venv + pip, and uv too where it
is installed (``kameo[envs]``, or on PATH).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import kameo
import pytest
from kameo import envs

INSTALLERS = ["pip"] + (["uv"] if envs._find_uv() is not None else [])

PKG = "kameo_envtest_pkg"
# The module of the test wheel: what its workers see.
PKG_SOURCE = '''
import importlib, os, sys

VERSION = "{version}"


def info(names):
    """Facts about this worker, and which of ``names`` it can import."""
    imports = {{}}
    for name in names:
        try:
            importlib.import_module(name)
            imports[name] = True
        except ImportError:
            imports[name] = False
    kameo = importlib.import_module("kameo")
    return {{
        "version": VERSION,
        "prefix": sys.prefix,
        "executable": sys.executable,
        "path": sys.path,
        "no_user_site": sys.flags.no_user_site,
        "kameo": os.path.dirname(os.path.realpath(kameo.__file__)),
        "virtual_env": os.environ.get("VIRTUAL_ENV"),
        "imports": imports,
    }}
'''


def make_wheel(directory: Path, name: str, version: str, source: str) -> Path:
    """A pure-Python wheel of one module ``name`` (a zip with the module and its dist-info)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: kameo-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KAMEO_CACHE_DIR", str(root))
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    return root


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    d = tmp_path / "wheels"
    make_wheel(d, PKG, "1.0", PKG_SOURCE.format(version="1.0"))
    make_wheel(d, "kameo_envtest_other", "2.5", "VERSION = '2.5'\n")
    return d


def env_entries(cache: Path) -> list[str]:
    """What the cache's envs/ holds, lock files aside."""
    d = cache / "envs"
    return sorted(n for n in os.listdir(d) if not n.endswith(".lock")) if d.exists() else []


def offline_env(wheels: Path, *packages: str, **kwargs: Any) -> kameo.PythonEnv:
    return kameo.PythonEnv(
        packages=list(packages) or [f"{PKG}>=1"], find_links=[wheels], offline=True, **kwargs
    )


@pytest.mark.parametrize("installer", INSTALLERS)
async def test_env_workers_see_the_env_and_not_the_parent(
    cache: Path,
    wheels: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    installer: str,
) -> None:
    # A module only the parent has: on its sys.path and in its PYTHONPATH.
    parent_only = tmp_path / "parent_only"
    parent_only.mkdir()
    (parent_only / "kameo_parent_only.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(parent_only))
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(p for p in (str(parent_only), os.environ.get("PYTHONPATH")) if p),
    )
    import kameo_parent_only  # noqa: F401  (the parent can)

    names = ["kameo_parent_only", "handlers", PKG]
    try:
        import numpy  # noqa: F401

        names.append("numpy")  # in the dev venv, not in the env
    except ImportError:
        pass
    env = offline_env(wheels, installer=installer)
    with pytest.raises(kameo.EnvError, match="not ensured"):
        env.python  # noqa: B018
    # Pool.start ensures the env.
    async with kameo.Pool(f"{PKG}:info", python=env, size=1) as pool:
        got = await pool.ask(names)
    assert env.python == os.path.join(env.path, "bin", "python")
    assert os.path.realpath(got["prefix"]) == os.path.realpath(env.path)
    assert got["version"] == "1.0"
    assert got["imports"] == {n: n == PKG for n in names}
    assert got["no_user_site"] == 1
    assert got["virtual_env"] == env.path
    assert got["kameo"] == os.path.dirname(os.path.realpath(kameo.__file__))
    assert str(parent_only) not in got["path"]
    assert not any(p.startswith(str(Path(kameo.__file__).parent.parent)) for p in got["path"])
    assert env_entries(cache) == [os.path.basename(env.path)]
    assert env.missing([f"{PKG}==1.0"]) == []


async def test_second_ensure_finds_the_env_and_installs_nothing(cache: Path, wheels: Path) -> None:
    first = offline_env(wheels)
    python = await first.ensure()
    assert os.access(python, os.X_OK)
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True
    )
    assert os.path.realpath(out.stdout.strip()) == os.path.realpath(first.path)
    # No wheel to install any more: a second ensure that ran the installer would fail.
    for wheel in wheels.iterdir():
        wheel.unlink()
    assert await first.ensure() == python
    assert await offline_env(wheels).ensure() == python
    assert offline_env(wheels).ensure_sync() == python
    # Another package set is another env (and here, a failure: nothing to install it from).
    with pytest.raises(kameo.EnvError):
        await offline_env(wheels, "kameo_envtest_other").ensure()
    assert env_entries(cache) == [os.path.basename(python.rsplit("/bin/", 1)[0])]


@pytest.mark.parametrize("installer", INSTALLERS)
async def test_failed_install_raises_with_the_installers_lines_and_leaves_nothing(
    cache: Path, wheels: Path, installer: str
) -> None:
    env = offline_env(wheels, PKG, "kameo-no-such-dist-x7", installer=installer)
    with pytest.raises(kameo.EnvError) as info:
        await env.ensure()
    message = str(info.value)
    assert "kameo-no-such-dist-x7" in message
    assert "the installer said:" in message
    installer_lines = message.split("the installer said:", 1)[1].strip().splitlines()
    assert any("kameo-no-such-dist-x7" in line for line in installer_lines)
    assert env_entries(cache) == []  # no env, no build directory left
    with pytest.raises(kameo.EnvError, match="not ensured"):
        env.python  # noqa: B018
    # A pool of that env fails to start with the same error, and can be started again.
    pool = kameo.Pool(f"{PKG}:info", python=env, size=1)
    with pytest.raises(kameo.EnvError, match="kameo-no-such-dist-x7"):
        await pool.start()
    assert env_entries(cache) == []
    make_wheel(wheels, "kameo_no_such_dist_x7", "0.1", "")
    async with pool:
        assert (await pool.ask(["kameo_no_such_dist_x7"]))["imports"] == {
            "kameo_no_such_dist_x7": True
        }
    assert env_entries(cache) == [os.path.basename(env.path)]


def test_concurrent_ensure_from_two_processes_makes_one_env(
    cache: Path, wheels: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        import kameo
        env = kameo.PythonEnv(packages=["{PKG}"], find_links=[{str(wheels)!r}], offline=True)
        deadline = time.monotonic() + 30
        while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
            time.sleep(0.002)
        print(env.ensure_sync(timeout=50))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    go.write_text("")
    results = [p.communicate(timeout=55) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    pythons = {out.strip() for out, _ in results}
    assert len(pythons) == 1
    assert env_entries(cache) == [os.path.basename(pythons.pop().rsplit("/bin/", 1)[0])]


def test_missing(cache: Path, wheels: Path) -> None:
    env = offline_env(wheels, f"{PKG}>=1", "kameo_envtest_other")
    with pytest.raises(kameo.EnvError, match="does not exist yet"):
        env.missing([PKG])
    env.ensure_sync()
    reqs = [
        f"{PKG}>=1",
        f"{PKG}<1",
        "kameo-envtest-other~=2.4",  # the name normalized
        "Kameo.Envtest_Other==2.5",
        "kameo_envtest_other>=3",
        "kameo-no-such-dist-x7",
        "kameo-no-such-dist-x7; python_version < '3'",  # a marker that does not apply
        f"{PKG}[extra]==1.0",
    ]
    assert env.missing(reqs) == [f"{PKG}<1", "kameo_envtest_other>=3", "kameo-no-such-dist-x7"]
    assert env.missing([]) == []
    with pytest.raises(ValueError, match="invalid requirement"):
        env.missing(["not a requirement !"])
    with pytest.raises(TypeError):
        env.missing("numpy")  # type: ignore[arg-type]


def test_path_env_is_updated_in_place(cache: Path, wheels: Path, tmp_path: Path) -> None:
    where = tmp_path / "my-env"
    first = offline_env(wheels, PKG, path=where)
    python = first.ensure_sync()
    assert python == str(where / "bin" / "python")
    assert first.missing(["kameo_envtest_other"]) == ["kameo_envtest_other"]
    (where / "sentinel").write_text("kept")
    second = offline_env(wheels, PKG, "kameo_envtest_other", path=where)
    assert second.ensure_sync() == python
    assert second.missing([PKG, "kameo_envtest_other==2.5"]) == []
    assert (where / "sentinel").read_text() == "kept"  # updated, not rebuilt
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".my-env.")) == [".my-env.lock"]
    # Not a virtual environment: refused, untouched.
    other = tmp_path / "not-an-env"
    other.mkdir()
    (other / "data.txt").write_text("mine")
    with pytest.raises(kameo.EnvError, match="is not a virtual environment"):
        offline_env(wheels, path=other).ensure_sync()
    assert (other / "data.txt").read_text() == "mine"


def test_an_interpreter_that_cannot_import_this_kameo_is_refused(
    cache: Path, wheels: Path, tmp_path: Path
) -> None:
    info = {
        "executable": "/opt/fake/bin/python3.99",
        "base_executable": "/opt/fake/bin/python3.99",
        "prefix": "/opt/fake",
        "version": "3.99.0",
        "full_version": "3.99.0 (fake)",
        "version_info": [3, 99],
        "implementation": "cpython",
        "cache_tag": "cpython-399",
        "gil_disabled": False,
        "ext_suffixes": [".cpython-399-x86_64-linux-gnu.so", ".abi3.so", ".so"],
    }
    fake = tmp_path / "python3.99"
    fake.write_text(f"#!/bin/sh\necho '{json.dumps(info)}'\n")
    fake.chmod(0o755)
    env = offline_env(wheels, python=str(fake))
    with pytest.raises(kameo.EnvError) as err:
        env.ensure_sync()
    message = str(err.value)
    assert "CPython 3.99.0" in message or "cpython 3.99.0" in message
    assert ".cpython-399-x86_64-linux-gnu.so" in message
    assert "native extension" in message
    assert env_entries(cache) == []
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho nope >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(kameo.EnvError, match="not a Python interpreter that runs"):
        offline_env(wheels, python=str(broken)).ensure_sync()


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        kameo.PythonEnv(packages="numpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="installer"):
        kameo.PythonEnv(installer="conda")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pythonpath"):
        kameo.Pool("handlers.basic:echo", pythonpath="/tmp")  # type: ignore[arg-type]


async def test_pythonpath_for_env_workers(cache: Path, wheels: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "kameo_extra_mod.py").write_text("def where(_):\n    return __file__\n")
    env = offline_env(wheels)
    async with kameo.Pool(f"{PKG}:info", python=env, size=1) as pool:
        assert (await pool.ask(["kameo_extra_mod"]))["imports"] == {"kameo_extra_mod": False}
    async with kameo.Pool("kameo_extra_mod:where", python=env, size=1, pythonpath=[extra]) as pool:
        assert await pool.ask(None) == str(extra / "kameo_extra_mod.py")


async def test_pythonpath_for_workers_of_the_parents_environment(tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "kameo_extra_mod2.py").write_text("def where(_):\n    return __file__\n")
    assert str(extra) not in sys.path
    async with kameo.Pool("kameo_extra_mod2:where", size=1, pythonpath=[str(extra)]) as pool:
        assert await pool.ask(None) == str(extra / "kameo_extra_mod2.py")
        # the parent's sys.path is still there, after pythonpath
        assert await pool.call("handlers.basic:echo", 7) == 7


def _venv(path: Path, kameo_dir: str) -> Path:
    """A real venv (no pip: fast) with this kameo importable (a .pth to a directory holding
    only a kameo symlink, as an installed kameo would be); returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    out = subprocess.run(
        [
            str(path / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    site = Path(out.stdout.strip())
    (site / "kameo_under_test.pth").write_text(kameo_dir + "\n")
    return site


def test_another_venv_of_the_same_base_python_is_isolated(cache: Path, tmp_path: Path) -> None:
    """The defect of issue 15: a worker in venv B started from a parent in venv A (both of
    one base interpreter: the same binary) imported A's packages, because the pool compared
    binaries (realpath) and sent A's whole sys.path. Environments differ: B's worker gets
    its own sys.path (plus pythonpath); A's own interpreter by another name gets A's."""
    link = envs.kameo_link()
    a_site = _venv(tmp_path / "a", link)
    b_site = _venv(tmp_path / "b", link)
    a_python, b_python = tmp_path / "a" / "bin" / "python", tmp_path / "b" / "bin" / "python"
    assert os.path.realpath(a_python) == os.path.realpath(b_python)  # one binary
    (a_site / "only_in_a.py").write_text("X = 'a'\n")
    (b_site / "only_in_b.py").write_text(PKG_SOURCE.format(version="b"))
    (a_site / "only_in_b.py").write_text(PKG_SOURCE.format(version="a's copy"))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "script_dir_mod.py").write_text("X = 1\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extra_mod.py").write_text("X = 1\n")
    (scripts / "parent.py").write_text(
        textwrap.dedent(
            """
            import asyncio, json, sys
            import kameo

            NAMES = ["only_in_a", "script_dir_mod", "extra_mod"]

            async def main():
                out = {}
                for label, python, pythonpath in (
                    ("b", sys.argv[1], []),
                    ("b+extra", sys.argv[1], [sys.argv[3]]),
                    ("a by another name", sys.argv[2], []),
                ):
                    async with kameo.Pool(
                        "only_in_b:info", python=python, size=1, pythonpath=pythonpath
                    ) as pool:
                        out[label] = await pool.ask(NAMES)
                print(json.dumps(out))

            asyncio.run(main())
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    a_other_name = tmp_path / "a" / "bin" / "python3"
    proc = subprocess.run(
        [str(a_python), str(scripts / "parent.py"), str(b_python), str(a_other_name), str(extra)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    b, b_extra, a_again = out["b"], out["b+extra"], out["a by another name"]
    assert os.path.realpath(b["prefix"]) == os.path.realpath(tmp_path / "b")
    assert b["version"] == "b"  # B's module, not A's copy of it
    assert b["imports"] == {"only_in_a": False, "script_dir_mod": False, "extra_mod": False}
    assert not any(str(a_site) in p for p in b["path"])
    assert b_extra["imports"] == {"only_in_a": False, "script_dir_mod": False, "extra_mod": True}
    # A's interpreter under another name is A's environment: the parent's sys.path first.
    assert os.path.realpath(a_again["prefix"]) == os.path.realpath(tmp_path / "a")
    assert a_again["version"] == "a's copy"
    assert a_again["imports"] == {"only_in_a": True, "script_dir_mod": True, "extra_mod": False}


@pytest.fixture
def silent_index() -> Any:
    """The URL of a package index that takes connections and never answers."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/simple"
    sock.close()


def _wait_until(predicate: Any, bound: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("installer", INSTALLERS)
async def test_ensure_timeout_kills_the_installer_and_leaves_nothing(
    cache: Path, silent_index: str, installer: str
) -> None:
    env = kameo.PythonEnv(
        packages=["kameo-envtest-slow"], index_url=silent_index, installer=installer
    )
    with pytest.raises(kameo.EnvError, match="did not finish within the timeout"):
        await env.ensure(timeout=1.5)
    assert env_entries(cache) == []


@pytest.mark.parametrize("installer", INSTALLERS)
async def test_cancelled_ensure_removes_what_it_built(
    cache: Path, silent_index: str, installer: str
) -> None:
    import asyncio

    env = kameo.PythonEnv(
        packages=["kameo-envtest-slow"], index_url=silent_index, installer=installer
    )
    task = asyncio.ensure_future(env.ensure(timeout=50))

    def installing() -> bool:  # the venv is made: the installer is next, or running
        return any(
            (cache / "envs" / n / "pyvenv.cfg").exists()
            for n in env_entries(cache)
            if ".build-" in n
        )

    assert await asyncio.to_thread(_wait_until, installing)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(_wait_until, lambda: env_entries(cache) == [])


def test_a_parent_without_pip_or_packaging(cache: Path, wheels: Path, tmp_path: Path) -> None:
    """venv + pip from a parent that has no pip: the env gets its own (ensurepip, slower);
    missing() needs packaging and says which extra brings it."""
    _venv(tmp_path / "bare", envs.kameo_link())
    script = textwrap.dedent(
        f"""
        import asyncio, importlib.util, json
        import kameo
        assert importlib.util.find_spec("pip") is None
        env = kameo.PythonEnv(
            packages=["{PKG}"], find_links=[{str(wheels)!r}], offline=True, installer="pip"
        )
        env.ensure_sync(timeout=45)
        try:
            env.missing(["{PKG}"])
        except kameo.ExtraMissing as exc:
            missing = str(exc)

        async def main():
            async with kameo.Pool("{PKG}:info", python=env, size=1) as pool:
                return await pool.ask(["pip"])

        print(json.dumps({{"info": asyncio.run(main()), "missing": missing}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(tmp_path / "bare" / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=55,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["info"]["version"] == "1.0"
    assert out["info"]["imports"] == {"pip": True}  # the env's own pip
    assert "kameo[envs]" in out["missing"]
