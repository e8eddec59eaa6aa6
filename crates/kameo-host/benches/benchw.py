"""The worker handler of kameo-host's benchmarks (benches/host.rs, benches/bench_host.py)."""

from __future__ import annotations

from typing import Any


def echo(x: Any) -> Any:
    return x
