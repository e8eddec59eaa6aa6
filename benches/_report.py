"""JSON-lines output shared by the benchmark scripts: one record per line on stdout."""

from __future__ import annotations

import json
from typing import Any


def emit(workload: str, impl: str, metric: str, value: Any, unit: Any, **extra: Any) -> dict:
    rec = {"workload": workload, "impl": impl, "metric": metric, "value": value, "unit": unit}
    rec.update(extra)
    print(json.dumps(rec), flush=True)
    return rec
