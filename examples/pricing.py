"""Handlers for the demo: run inside kameo worker processes."""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any


def quote(order: dict[str, Any]) -> dict[str, Any]:
    """A CPU-bound sync handler: price an option with a small Monte-Carlo-free closed form."""
    s, k, t, v = order["spot"], order["strike"], order["years"], order["vol"]
    d1 = (math.log(s / k) + 0.5 * v * v * t) / (v * math.sqrt(t))
    d2 = d1 - v * math.sqrt(t)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    price = s * cdf(d1) - k * cdf(d2)
    return {"symbol": order["symbol"], "price": round(price, 4), "worker_pid": os.getpid()}


async def enrich(order: dict[str, Any]) -> dict[str, Any]:
    """An async handler: many of these run concurrently in one worker."""
    await asyncio.sleep(0.05)  # an I/O call, say
    return {**order, "enriched": True, "worker_pid": os.getpid()}


def reject(order: dict[str, Any]) -> None:
    raise ValueError(f"order for {order['symbol']} rejected: quantity {order['qty']} is too large")
