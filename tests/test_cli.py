"""The ``kameo`` command line (``kameo map``, ``kameo --version``), run as a real subprocess
(``python -m kameo``), with real workers; the progress bar in a real pseudo-terminal, and Ctrl-C
sent to the process group as a terminal does."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import tomllib
from pathlib import Path
from typing import Any

import kameo
import kameo.cli
import pytest
from conftest import TESTS_DIR, pid_alive, wait_until

ROOT = os.path.dirname(TESTS_DIR)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(kameo.__file__)))
RUN_BOUND = 60.0
STDLIB_ENV = "KAMEO_JSONL_STDLIB"  # kameo._jsonl.STDLIB_ENV
PATHS = ("orjson", "stdlib")


def has_orjson() -> bool:
    try:
        __import__("orjson")
    except ImportError:
        return False
    return True


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers of the commands run from here take ``path`` (orjson: skipped without it)."""
    if path == "stdlib":
        monkeypatch.setenv(STDLIB_ENV, "1")
        return
    if not has_orjson():
        pytest.skip("orjson is not installed (pip install 'kameo[json]')")
    monkeypatch.delenv(STDLIB_ENV, raising=False)


@pytest.fixture(autouse=True, params=PATHS)
def json_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test of this file runs on both JSON paths of the workers (kameo._jsonl)."""
    path: str = request.param
    use_path(path, monkeypatch)
    return path


def env(*first: str) -> dict[str, str]:
    """This environment, with the kameo under test and tests/ (for handlers.cli) importable."""
    e = dict(os.environ)
    paths = [*first, PACKAGE_DIR, TESTS_DIR]
    if e.get("PYTHONPATH"):
        paths.append(e["PYTHONPATH"])
    e["PYTHONPATH"] = os.pathsep.join(paths)
    return e


def kameo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kameo", *args]


def run(
    *args: str, input: bytes | None = None, extra_path: tuple[str, ...] = (), **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        kameo_cmd(*args),
        input=input,
        capture_output=True,
        env=env(*extra_path),
        timeout=RUN_BOUND,
        **kw,
    )


def jsonl(records: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def parse(out: bytes) -> list[Any]:
    assert out == b"" or out.endswith(b"\n"), out[-200:]
    return [json.loads(line) for line in out.splitlines()]


def numbered(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"i": i, **extra} for i in range(n)]


# ------------------------------------------------------------------------------ basics


def test_stdin_to_stdout_in_input_order() -> None:
    # Every fifth line is slow: blocks finish out of order, the output is in input order.
    res = run("map", "handlers.cli:uneven", "-w", "2", input=jsonl(numbered(60)))
    assert res.returncode == 0, res.stderr
    assert parse(res.stdout) == numbered(60)
    assert res.stderr == b""


def test_files_in_and_out(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(jsonl(numbered(10)))
    res = run("map", "handlers.cli:double", "-i", str(src), "-o", str(dst), "-w", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b""
    assert parse(dst.read_bytes()) == [{"i": i, "y": 2 * i} for i in range(10)]
    # "-" is stdin and stdout.
    res = run("map", "handlers.cli:double", "-i", "-", "-o", "-", input=src.read_bytes())
    assert res.returncode == 0, res.stderr
    assert parse(res.stdout) == [{"i": i, "y": 2 * i} for i in range(10)]


def test_output_is_compact_utf8_json() -> None:
    res = run(
        "map", "handlers.cli:same", "-w", "1", input='{"a": "é", "b": [1, 2.5, null]}\n'.encode()
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == '{"a":"é","b":[1,2.5,null]}\n'.encode()


def test_many_blocks_keep_order_and_line_numbers() -> None:
    # Enough lines for many input chunks and blocks; the failing line is far in.
    records = numbered(30_000)
    records[23_456]["fail"] = True
    res = run("map", "handlers.cli:fail_on", "-w", "2", input=jsonl(records))
    assert res.returncode == 1
    assert parse(res.stdout) == numbered(23_456)
    assert b"line 23457: ValueError: refused record 23456" in res.stderr


def test_unordered_gives_every_result() -> None:
    res = run("map", "handlers.cli:uneven", "-w", "2", "--unordered", input=jsonl(numbered(60)))
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert sorted(got, key=lambda r: r["i"]) == numbered(60)


def test_workers_flag_sets_the_pool_size() -> None:
    res = run("map", "handlers.cli:slow", "-w", "3", input=jsonl(numbered(30, sleep=0.05)))
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert [r["i"] for r in got] == list(range(30))
    assert len({r["pid"] for r in got}) == 3


def test_async_function() -> None:
    res = run("map", "handlers.cli:async_double", "-w", "1", input=jsonl(numbered(5)))
    assert res.returncode == 0, res.stderr
    assert parse(res.stdout) == [{"i": i, "y": 2 * i} for i in range(5)]


def test_what_the_function_prints_stays_out_of_the_output() -> None:
    res = run("map", "handlers.cli:noisy", "-w", "2", input=jsonl(numbered(20)))
    assert res.returncode == 0, res.stderr
    assert parse(res.stdout) == numbered(20)
    assert b"noise from print" in res.stderr
    assert b"noise on fd 1" in res.stderr


def test_blank_lines_crlf_and_no_final_newline() -> None:
    data = b'{"i": 0}\n\n  \n{"i": 1}\r\n {"i": 2} \n\n{"i": 3}'
    res = run("map", "handlers.cli:double", input=data)
    assert res.returncode == 0, res.stderr
    assert parse(res.stdout) == [{"i": i, "y": 2 * i} for i in range(4)]
    # Blank lines keep their numbers: the failing record is on line 5.
    data = b'{"i": 0}\n\n\n\n{"i": 1, "fail": true}\n'
    res = run("map", "handlers.cli:fail_on", input=data)
    assert res.returncode == 1
    assert b"line 5: ValueError" in res.stderr


def test_empty_input() -> None:
    res = run("map", "handlers.cli:double", input=b"")
    assert (res.returncode, res.stdout) == (0, b"")


def test_the_workers_take_the_path_asked_for(json_path: str) -> None:
    res = run("map", "handlers.cli:json_path", "-w", "1", input=b"{}\n")
    assert res.returncode == 0, res.stderr
    assert parse(res.stdout) == [{"path": json_path}]


# ------------------------------------------------------------------ both paths, one output

TRICKY_RESULTS = [
    "uuid",
    "enum",
    "intenum",
    "dataclass",
    "date",
    "ordered",
    "strsub",
    "set",
    "nan",
    "inf",
    "floats",
    "bigint",
    "keys",
    "tuple",
    "surrogate",
    "bytes",
    "namedtuple",
    "deep",
]

#: Lines whose decoding, or whose result's encoding, orjson and json do differently, or that
#: one of them refuses (with handlers.cli:tricky, ``{"k": ...}`` lines return such results).
TRICKY_LINES = [
    '{"a": "é\\u00e9\\n\\t\\"\\\\\\u0000\\u001f\x7f\u2028 ☃ 😀", "b": "\\ud83d\\ude00"}'.encode(),
    b'{"big": 123456789012345678901234567890, "neg": -9223372036854775809}',
    b"[18446744073709551615, -9223372036854775808, 12345678901234567890]",
    b'"12345678901234567890123"',
    b"[0.00123456789012345678, 12345678901234567890.5, 1234567890123456789012e-3, -0.5e-19]",
    b'{"t": 1700000000.123456, "p": 0.30000000000000004, "q": [1e-4, 9999999999999998.0]}',
    b"[1e400, -1e400, 1e-400, -0.0, 1.0, 1E5, 1e-05, 0.000015, 5e-324, 1.7976931348623157e308]",
    b"[0.1, 2.5e-08, 1e16, 1e22, 123.456, 100.0]",
    b"NaN",
    b"[Infinity, -Infinity, NaN]",
    b'{"a": {"b": [1, 2, {"c": null}], "d": [[], {}]}, "e": [true, false]}',
    b"[]",
    b"{}",
    b'""',
    b"0",
    b"-0",
    b'{"a": 1, "b": 2, "a": 3}',
    b"",
    b"   ",
    b"\t",
    b'{"x": 1}\r',
    b' {"x": 2} ',
    b'{"x":',
    b"[1,]",
    b"nul",
    b"1 2",
    b"1,2",
    b"[1",
    b"2]",
    b"01",
    b".5",
    b'"\\x"',
    b'"a\x01b"',
    b"\xef\xbb\xbf{}",
    b"\xff\xfe",
    b'"\xed\xa0\x80"',
    b'"\\ud800"',
    b'{"\\udc00": "\\ud800x"}',
    b"[" * 300 + b"]" * 300,
    b"[" * 1010 + b"]" * 1010,
    b"[" * 3000 + b"]" * 3000,
    *(b'{"k": "%s"}' % name.encode() for name in TRICKY_RESULTS),
    b'{"k": null, "i": 1}',
]


def too_deep_for_json(lines: list[bytes]) -> bool:
    """Whether this interpreter's json refuses one of ``lines`` with a RecursionError."""
    for line in lines:
        try:
            json.loads(line)
        except RecursionError:
            return True
        except ValueError:
            pass
    return False


def tricky_input() -> bytes:
    """The tricky lines alone, together, and each in a block of plain lines."""
    plain = [b'{"i": %d, "s": "x"}' % i for i in range(40)]
    lines = list(TRICKY_LINES) + TRICKY_LINES[::-1]
    for line in TRICKY_LINES:
        lines += [*plain[:20], line, *plain[20:]]
    return b"".join(line + b"\n" for line in lines)


@pytest.mark.parametrize("mode", ["skip", "record", "stop"])
@pytest.mark.parametrize("target", ["handlers.cli:same", "handlers.cli:tricky"])
def test_orjson_and_stdlib_write_the_same_bytes(
    json_path: str, mode: str, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if json_path == "stdlib":
        pytest.skip("compares the two paths: once is enough")
    data = tricky_input()
    args = ("map", target, "-w", "2", "--on-error", mode)
    fast = run(*args, input=data)
    use_path("stdlib", monkeypatch)
    slow = run(*args, input=data)
    assert slow.returncode == (1 if mode == "stop" else 0), slow.stderr
    assert fast.returncode == slow.returncode, fast.stderr
    assert fast.stdout == slow.stdout
    assert fast.stderr.splitlines()[:1] == slow.stderr.splitlines()[:1]
    if mode == "record":
        # Each non-blank line gives one line, and the refused ones are errors.
        got = [json.loads(line) for line in slow.stdout.splitlines()]
        errors = [g["error"] for g in got if isinstance(g, dict) and "error" in g]
        types = {e["type"] for e in errors}
        assert {"json.decoder.JSONDecodeError", "UnicodeDecodeError"} <= types
        # The deepest line is past json's recursion limit on 3.11; 3.12+ limit C recursion
        # separately and decode it.
        assert ("RecursionError" in types) == too_deep_for_json(TRICKY_LINES)
        if target == "handlers.cli:tricky":
            assert "TypeError" in types  # the UUID, the enum, the dataclass, the set...


def test_each_result_is_written_as_it_was_returned() -> None:
    # The target returns one dict that it changes for each line.
    res = run("map", "handlers.cli:shared", "-w", "1", input=jsonl(numbered(400)))
    assert res.returncode == 0, res.stderr
    want = [
        json.dumps({"i": i, "x": i * 1e-05 if i % 2 else i}, separators=(",", ":"))
        for i in range(400)
    ]
    assert res.stdout.decode().splitlines() == want


@pytest.mark.parametrize("stdlib", [False, True])
def test_the_same_bytes_as_json_dumps(stdlib: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output format, on either path: json.dumps(separators=(",", ":"), ensure_ascii=False),
    NaN and infinities as json writes them, a lone surrogate escaped."""
    if stdlib:
        use_path("stdlib", monkeypatch)
    values: list[Any] = [
        {"a": 'é☃😀\n"', "b": [1, 2.5, None, True], "c": {}},
        [1e-05, 1e-07, 1e16, 1e22, -0.0, 0.1, 2**70, -(2**63) - 1],
        {"n": float("nan"), "i": float("inf")},
        "x\ud800",
    ]
    data = b"".join(
        json.dumps(v, ensure_ascii=True, allow_nan=True).encode() + b"\n" for v in values
    )
    res = run("map", "handlers.cli:same", "-w", "1", input=data)
    assert res.returncode == 0, res.stderr
    want = [json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in values[:3]]
    want.append(json.dumps(values[3], separators=(",", ":")))
    assert res.stdout.decode().splitlines() == want


# ------------------------------------------------------------------------------ errors


def failing_input() -> bytes:
    records = numbered(8)
    records[4]["fail"] = True  # line 5
    return jsonl(records)


def test_on_error_stop_is_the_default() -> None:
    res = run("map", "handlers.cli:fail_on", "-w", "2", input=failing_input())
    assert res.returncode == 1
    assert parse(res.stdout) == numbered(4)
    err = res.stderr.decode()
    assert "line 5: ValueError: refused record 4" in err
    # The remote traceback, down to the function that raised.
    assert "Traceback (most recent call last)" in err
    assert "in fail_on" in err
    assert 'raise ValueError(f"refused record' in err


def test_on_error_skip() -> None:
    res = run("map", "handlers.cli:fail_on", "--on-error", "skip", input=failing_input())
    assert res.returncode == 0, res.stderr
    assert parse(res.stdout) == [r for r in numbered(8) if r["i"] != 4]
    assert b"1 line failed (skipped); the first: line 5: ValueError: refused record 4" in (
        res.stderr
    )


def test_on_error_record() -> None:
    res = run("map", "handlers.cli:fail_on", "--on-error", "record", input=failing_input())
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert got[:4] == numbered(4) and got[5:] == numbered(8)[5:]
    assert got[4] == {"error": {"type": "ValueError", "message": "refused record 4", "line": 5}}


def test_malformed_line_names_its_number() -> None:
    data = b'{"i": 0}\n{"i": 1}\n{"i": \n{"i": 3}\n\xff\n'
    res = run("map", "handlers.cli:double", input=data)
    assert res.returncode == 1
    assert parse(res.stdout) == [{"i": 0, "y": 0}, {"i": 1, "y": 2}]
    assert b"line 3: json.decoder.JSONDecodeError: malformed JSON" in res.stderr
    res = run("map", "handlers.cli:double", "--on-error", "record", input=data)
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert got[2]["error"]["line"] == 3
    assert got[2]["error"]["type"] == "json.decoder.JSONDecodeError"
    assert got[3] == {"i": 3, "y": 6}
    assert got[4]["error"]["line"] == 5
    assert got[4]["error"]["type"] == "UnicodeDecodeError"
    assert "not UTF-8" in got[4]["error"]["message"]


def test_result_json_cannot_encode() -> None:
    records = numbered(3)
    records[1]["bad"] = True
    res = run("map", "handlers.cli:unserializable", "--on-error", "record", input=jsonl(records))
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert got[0] == records[0] and got[2] == records[2]
    assert got[1]["error"]["type"] == "TypeError"
    assert "not JSON serializable" in got[1]["error"]["message"]
    assert got[1]["error"]["line"] == 2


def test_worker_crash_fails_the_lines_of_its_block() -> None:
    records = numbered(20)
    records[10]["crash"] = True
    res = run(
        "map", "handlers.cli:crash_on", "-w", "2", "--on-error", "record", input=jsonl(records)
    )
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert len(got) == 20
    assert "WorkerCrashed" in got[10]["error"]["type"]
    assert got[10]["error"]["line"] == 11
    for i, r in enumerate(got):
        assert r == {"i": i} or r["error"]["line"] == i + 1
    res = run("map", "handlers.cli:crash_on", "-w", "2", input=jsonl(records))
    assert res.returncode == 1
    assert b"WorkerCrashed" in res.stderr


def span(stderr: bytes) -> range:
    m = re.search(rb"kameo map: lines? (\d+)(?:-(\d+))?:", stderr)
    assert m is not None, stderr
    first = int(m.group(1))
    return range(first, int(m.group(2) or first) + 1)


def test_timeout() -> None:
    records = numbered(12, sleep=0.0)
    records[6]["sleep"] = 60.0  # line 7 hangs
    res = run("map", "handlers.cli:slow", "-w", "2", "--timeout", "0.5", input=jsonl(records))
    assert res.returncode == 1
    assert b"CallTimeout" in res.stderr
    lines = span(res.stderr)  # the block that timed out, holding line 7
    assert 7 in lines
    # The lines before that block; the block's lines fail together.
    assert [r["i"] for r in parse(res.stdout)] == list(range(lines[0] - 1))
    res = run(
        "map",
        "handlers.cli:slow",
        "-w",
        "2",
        "--timeout",
        "0.5",
        "--on-error",
        "record",
        input=jsonl(records),
    )
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert len(got) == 12
    assert got[6]["error"]["type"] == "kameo.errors.CallTimeout"
    assert got[6]["error"]["line"] == 7
    for i, r in enumerate(got):
        assert r.get("i") == i or r["error"]["line"] == i + 1


# ------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("handlers.cli", "must be 'module:function'"),
        (":double", "must be 'module:function'"),
        ("handlers.nonexistent_mod:f", "No module named 'handlers.nonexistent_mod'"),
        ("handlers.cli:missing", "has no attribute 'missing'"),
        ("handlers.cli:NOT_CALLABLE", "is not callable"),
        ("handlers.cli:generator", "is a generator function"),
        ("handlers.broken_import:handler", "kameo-import-boom-7f3a"),
    ],
)
def test_bad_target_is_a_usage_error_before_any_input(target: str, message: str) -> None:
    # stdin is a pipe that is never written to nor closed: the check comes first.
    with subprocess.Popen(
        kameo_cmd("map", target, "-w", "1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    ) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_BOUND)
        finally:
            proc.kill()
    assert proc.returncode == 2, err
    assert out == b""
    assert message.encode() in err
    assert err.startswith(b"kameo map: error:")


def test_import_error_shows_the_module_traceback() -> None:
    res = run("map", "handlers.broken_import:handler", input=b"")
    assert res.returncode == 2
    assert b"Traceback" in res.stderr and b"broken_import.py" in res.stderr


@pytest.mark.parametrize(
    "flags",
    [["--on-error", "ignore"], ["-w", "0"], ["--timeout", "-1"], ["--progress", "--no-progress"]],
)
def test_bad_flags(flags: list[str]) -> None:
    res = run("map", "handlers.cli:double", *flags, input=b"")
    assert res.returncode == 2
    assert b"usage: kameo map" in res.stderr


def test_no_command() -> None:
    res = run(input=b"")
    assert res.returncode == 2
    assert b"usage: kameo" in res.stderr


def test_files_that_cannot_be_opened(tmp_path: Path) -> None:
    res = run("map", "handlers.cli:double", "-i", str(tmp_path / "missing.jsonl"))
    assert res.returncode == 2
    assert b"cannot open the input" in res.stderr and b"No such file" in res.stderr
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(numbered(3)))
    res = run("map", "handlers.cli:double", "-i", str(src), "-o", str(tmp_path / "no/dir/out"))
    assert res.returncode == 2
    assert b"cannot open the output" in res.stderr
    res = run("map", "handlers.cli:double", "-i", str(src), "-o", str(src))
    assert res.returncode == 2
    assert b"is the input" in res.stderr
    assert src.read_bytes() == jsonl(numbered(3))


# ------------------------------------------------------------------------------ entry points


def test_version() -> None:
    res = run("--version")
    assert res.returncode == 0
    assert res.stdout.decode().strip() == f"kameo {kameo.__version__}"
    assert kameo.cli.main(["--version"]) == 0


def test_main_in_process(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(jsonl(numbered(5)))
    code = kameo.cli.main(["map", "handlers.cli:double", "-i", str(src), "-o", str(dst), "-w", "1"])
    assert code == 0
    assert parse(dst.read_bytes()) == [{"i": i, "y": 2 * i} for i in range(5)]
    assert kameo.cli.main(["map", "nocolon"]) == 2


def test_console_script_is_declared() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    module, _, name = scripts["kameo"].partition(":")
    assert (module, name) == ("kameo.cli", "main")


# ------------------------------------------------------------------------------ progress bar


def run_in_pty(args: list[str], extra_path: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (120 columns); its exit status and what the
    terminal showed. stdout goes to /dev/null."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env=env(*extra_path),
        )
    finally:
        os.close(slave)
    shown = b""
    deadline = time.monotonic() + RUN_BOUND
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal has no writer left
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=RUN_BOUND)
    finally:
        proc.kill()
        os.close(master)
    return code, shown.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(numbered(50)) + b"\n")  # 51 lines, one blank
    code, shown = run_in_pty(kameo_cmd("map", "handlers.cli:double", "-i", str(src), "-w", "1"))
    assert code == 0, shown
    assert "lines" in shown
    assert "51/51" in shown  # the total, counted up front for a file
    code, forced = run_in_pty(
        kameo_cmd("map", "handlers.cli:double", "-i", str(src), "--progress", "-w", "1")
    )
    assert code == 0 and "51/51" in forced


def test_no_progress_on_a_terminal(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(numbered(50)))
    code, shown = run_in_pty(
        kameo_cmd("map", "handlers.cli:double", "-i", str(src), "--no-progress", "-w", "1")
    )
    assert code == 0
    assert shown.strip() == ""


def test_progress_without_tqdm(tmp_path: Path) -> None:
    fake = tmp_path / "no_tqdm"
    fake.mkdir()
    (fake / "tqdm.py").write_text('raise ImportError("no tqdm in this test")\n')
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(numbered(5)))
    # Forced: an error that says what to install, before anything runs.
    res = run("map", "handlers.cli:double", "-i", str(src), "--progress", extra_path=(str(fake),))
    assert res.returncode == 2
    assert b"pip install 'kameo[progress]'" in res.stderr
    assert res.stdout == b""
    # On a terminal by default: no bar, no error.
    code, shown = run_in_pty(
        kameo_cmd("map", "handlers.cli:double", "-i", str(src), "-w", "1"), extra_path=(str(fake),)
    )
    assert code == 0
    assert shown.strip() == ""


def test_no_bar_when_stderr_is_not_a_terminal() -> None:
    res = run("map", "handlers.cli:double", input=jsonl(numbered(5)))
    assert res.returncode == 0
    assert res.stderr == b""


# ------------------------------------------------------------------------------ Ctrl-C


def children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(int(p) for p in f.read().split())
    except OSError:
        pass
    return found


def test_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(jsonl(numbered(2000, sleep=0.02)))  # 20 s of work over two workers
    with open(dst, "wb") as out:
        proc = subprocess.Popen(
            kameo_cmd("map", "handlers.cli:slow", "-i", str(src), "-w", "2"),
            stdout=out,
            stderr=subprocess.PIPE,
            env=env(),
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    try:
        assert wait_until(lambda: dst.stat().st_size > 200, RUN_BOUND), "no output came"
        workers = children(proc.pid)
        assert len(workers) == 2
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=RUN_BOUND)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err, err
    data = dst.read_bytes()
    got = parse(data)  # complete lines, each valid JSON
    assert 0 < len(got) < 2000
    assert [r["i"] for r in got] == list(range(len(got)))
    assert {r["pid"] for r in got} <= workers
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), 10.0), "workers left"


def test_console_script_imports_from_the_current_directory(tmp_path: Path) -> None:
    # A console script's sys.path[0] is its own directory, not the current one: the command
    # adds the current directory, as `python -m` does (the README's example: `cd examples`).
    script = tmp_path / "kameo_script.py"
    script.write_text("import sys\nfrom kameo.cli import main\nsys.exit(main())\n")
    res = subprocess.run(
        [sys.executable, str(script), "map", "pricing:quote", "-w", "2"],
        input=b'{"symbol": "AAPL"}\n{"symbol": "MSFT"}\n',
        capture_output=True,
        env=env(),
        cwd=os.path.join(ROOT, "examples"),
        timeout=RUN_BOUND,
    )
    assert res.returncode == 0, res.stderr
    got = parse(res.stdout)
    assert [(r["symbol"], r["price"]) for r in got] == [("AAPL", 18.8508), ("MSFT", 41.2827)]
