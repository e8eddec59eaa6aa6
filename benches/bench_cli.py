"""W11: ``kameo map`` over JSON lines against the I/O floor (issue 14's CLI target).

    python benches/bench_cli.py [--quick] [--rounds R]

Writes 1,000,000 small JSON lines (``{"id": i, "name": "x" * 16}``; 100,000 with ``--quick``)
to a temporary file, then in interleaved rounds times, each as a whole process from start to
exit:

* the I/O floor: ``python -c`` reading the file line by line (text mode, the faster of the two:
  ``floor_binary`` is the same in binary mode) and writing each line to an output file, no JSON;
* ``python -m kameo map bench_handlers:echo -i IN -o OUT -w 2 --no-progress`` (each line decoded,
  given to ``echo``, encoded again, in two workers);
* ``kameo map`` over one line: the fixed cost (interpreter, imports, two workers, the check).

The kameo records say which JSON path the workers took (``json_path``: ``orjson`` with
``kameo[json]`` installed, else ``stdlib``; ``KAMEO_JSONL_STDLIB=1`` in the environment forces
the stdlib one, to compare).

Reports lines/s of each (best round) and ``kameo / floor`` (target >= 0.5), one JSON object per
line as the other benches (``_report``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import kameo  # noqa: E402
from _report import emit, emit_env  # noqa: E402

FLOOR_TEXT = """
import sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for line in f:
        out.write(line)
"""
FLOOR_BINARY = FLOOR_TEXT.replace("open(sys.argv[1])", 'open(sys.argv[1], "rb")').replace(
    '"w"', '"wb"'
)
TARGET = 0.5


def child_env() -> dict[str, str]:
    """The benches' handlers and this kameo importable in the children."""
    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(kameo.__file__)))
    paths = [HERE, pkg] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({res.returncode}): {res.stderr.decode()[-2000:]}")
    return elapsed


def json_path(env: dict[str, str]) -> str:
    """The JSON path the workers take ("orjson" or "stdlib", ``kameo._jsonl.JSON_PATH``): asked
    of a ``kameo map`` run itself, so with the workers' interpreter and environment."""
    res = subprocess.run(
        [sys.executable, "-m", "kameo", "map", "bench_handlers:json_path", "-w", "1"],
        input=b"{}\n",
        env=env,
        capture_output=True,
        timeout=120,
    )
    if res.returncode != 0:
        raise SystemExit(f"kameo map failed ({res.returncode}): {res.stderr.decode()[-2000:]}")
    path: str = json.loads(res.stdout)["path"]
    return path


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 lines, not 1,000,000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = 100_000 if args.quick else 1_000_000
    emit_env(kameo, lines=n, rounds=args.rounds)
    env = child_env()
    path = json_path(env)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="kameo-bench-cli-") as tmp:
        src, dst, one = (os.path.join(tmp, name) for name in ("in.jsonl", "out.jsonl", "one"))
        with open(src, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": i, "name": "x" * 16}) + "\n")
        with open(one, "w") as f:
            f.write(json.dumps({"id": 0, "name": "x" * 16}) + "\n")
        size = os.path.getsize(src)
        kameo_map = [py, "-m", "kameo", "map", "bench_handlers:echo", "-w", "2", "--no-progress"]
        commands = {
            "floor": [py, "-c", FLOOR_TEXT, src, dst],
            "floor_binary": [py, "-c", FLOOR_BINARY, src, dst],
            "kameo_map": [*kameo_map, "-i", src, "-o", dst],
            "kameo_map_one_line": [*kameo_map, "-i", one, "-o", dst],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        timed(commands["kameo_map_one_line"], env)  # warm the page cache and .pyc files
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(timed(cmd, env))
                if name == "kameo_map":
                    assert count_lines(dst) == n, "kameo map wrote a wrong number of lines"
        for name, samples in times.items():
            best = min(samples)
            lines = 1 if name == "kameo_map_one_line" else n
            emit(
                "W11",
                name,
                "seconds",
                round(best, 3),
                "s",
                median=round(statistics.median(samples), 3),
                lines_per_s=round(lines / best),
                bytes=size if lines == n else None,
                **({"json_path": path} if name.startswith("kameo") else {}),
            )
        floor, ours = min(times["floor"]), min(times["kameo_map"])
        ratio = floor / ours  # (n / ours) / (n / floor): kameo's lines/s over the floor's
        emit(
            "W11",
            "summary",
            "kameo_map/floor",
            round(ratio, 3),
            "ratio",
            target=TARGET,
            passed=ratio >= TARGET,
            json_path=path,
            kameo_lines_per_s=round(n / ours),
            floor_lines_per_s=round(n / floor),
            kameo_without_startup_lines_per_s=round(
                n / max(1e-9, ours - min(times["kameo_map_one_line"]))
            ),
        )


if __name__ == "__main__":
    main()
