"""Handlers for the demo and the README: run inside kameo worker processes."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterator
from typing import Any

# Last prices the quotes start from when an order names none (a real handler would load them).
SPOT = {"AAPL": 189.5, "MSFT": 415.0, "TSLA": 242.0}
_loaded: dict[str, float] = {}


def setup() -> None:
    """The pool's `init` hook: runs once in each worker before it takes work."""
    _loaded.update(SPOT)


def quote(order: dict[str, Any]) -> dict[str, Any]:
    """A CPU-bound sync handler: a Black-Scholes call price (at the money for a year by default)."""
    symbol = order["symbol"]
    s = order.get("spot") or _loaded.get(symbol) or SPOT[symbol]
    k, t, v = order.get("strike", s), order.get("years", 1.0), order.get("vol", 0.25)
    d1 = (math.log(s / k) + 0.5 * v * v * t) / (v * math.sqrt(t))
    d2 = d1 - v * math.sqrt(t)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    price = s * cdf(d1) - k * cdf(d2)
    return {"symbol": symbol, "price": round(price, 4), "worker_pid": os.getpid()}


def ticks(req: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A generator handler: `pool.stream(...)` gets its items as they are made."""
    s = SPOT[req["symbol"]]
    for i in range(req.get("n", 10)):
        yield {"symbol": req["symbol"], "seq": i, "price": round(s * (1 + 0.001 * i), 2)}


async def enrich(order: dict[str, Any]) -> dict[str, Any]:
    """An async handler: many of these run concurrently in one worker."""
    await asyncio.sleep(0.05)  # an I/O call, say
    return {**order, "enriched": True, "worker_pid": os.getpid()}


def reject(order: dict[str, Any]) -> None:
    raise ValueError(f"order for {order['symbol']} rejected: quantity {order['qty']} is too large")
