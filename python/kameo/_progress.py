"""Progress bars (``progress=True`` of ``Pool.map``, ``Executor.map`` and ``kameo map``).

tqdm is an optional dependency (extra ``kameo[progress]``): imported only when a bar is asked
for, and a clear error says how to install it when it is missing.
"""

from __future__ import annotations

import importlib
from typing import IO, Any

from kameo.errors import ExtraMissing

__all__ = ["bar"]


def bar(
    total: int | None,
    *,
    desc: str | None = None,
    file: IO[str] | None = None,
    disable: bool | None = False,
    unit: str = "item",
) -> Any:
    """A tqdm bar counting ``unit`` (``total`` None when the input has no length); raises
    :class:`ExtraMissing` without tqdm."""
    try:
        tqdm = importlib.import_module("tqdm")
    except ImportError:
        raise ExtraMissing(
            "progress=True needs tqdm, which is not installed: pip install 'kameo[progress]' "
            "(or pip install tqdm)"
        ) from None
    return tqdm.tqdm(
        total=total, desc=desc, file=file, disable=disable, unit=unit, dynamic_ncols=True
    )
