"""Every Python snippet in README.md runs as written against the shipped examples.

A block whose first line is ``# name.py`` is a module the README asks the reader to create: it is
written to a temporary directory on the workers' path. Every other block runs in its own
interpreter, with ``examples/`` on the path and top-level ``await`` allowed (as in
``python -m asyncio``). A ``print(...)  # expected`` line must print what its comment says (worker
pids aside).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

RUNNER = """
import ast, asyncio, sys
source = sys.stdin.read()
code = compile(source, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
namespace = {"__name__": "__main__"}
result = eval(code, namespace)
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(1))
        for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)
    ]


def _is_module(block: str) -> bool:
    return re.match(r"# [\w.]+\.py\n", block) is not None


def _mask_pids(text: str) -> str:
    return re.sub(r"('worker_pid': )\d+", r"\1<pid>", text)


SNIPPETS = [(line, b) for line, b in _blocks() if not _is_module(b)]


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 3
    assert any(_is_module(b) for _, b in _blocks())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("line", "block"), SNIPPETS, ids=[f"line{n}" for n, _ in SNIPPETS])
def test_snippet_runs_as_written(line: int, block: str, tmp_path: Path) -> None:
    for _, other in _blocks():
        if _is_module(other):
            name = other.split("\n", 1)[0][2:]
            (tmp_path / name).write_text(other)
    env = dict(os.environ)
    path = [str(tmp_path), str(ROOT / "examples"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env["KAMEO_CACHE_DIR"] = str(tmp_path / "kameo-cache")  # a PythonEnv's, not the user's
    env["UV_CACHE_DIR"] = str(tmp_path / "uv-cache")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=block,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=100,
    )
    assert proc.returncode == 0, f"README.md snippet at line {line} failed:\n{proc.stderr}"
    out = _mask_pids(proc.stdout)
    for expected in re.findall(r"^\s*print\(.*\)\s+# (.+)$", block, flags=re.M):
        assert _mask_pids(expected.strip()) in out, (
            f"README.md line {line}: printed {proc.stdout!r}, the comment says {expected!r}"
        )
