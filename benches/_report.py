"""JSON-lines output shared by the benchmark scripts: one record per line on stdout."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any


def emit(workload: str, impl: str, metric: str, value: Any, unit: Any, **extra: Any) -> dict:
    rec = {"workload": workload, "impl": impl, "metric": metric, "value": value, "unit": unit}
    rec.update(extra)
    print(json.dumps(rec), flush=True)
    return rec


def emit_env(kameo: Any, **extra: Any) -> dict:
    """The header record every script starts with: interpreter, CPUs, kameo version."""
    return emit(
        "env",
        "python",
        "info",
        None,
        None,
        python=sys.version.split()[0],
        implementation=platform.python_implementation(),
        executable=sys.executable,
        cpus=os.cpu_count(),
        affinity=sorted(os.sched_getaffinity(0)),
        kameo=getattr(kameo, "__version__", "unknown") if kameo else None,
        **extra,
    )
