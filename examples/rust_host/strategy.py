"""Worker side of the Rust host's trading example (examples/rust_host).

The Rust program asks ``execute_trade`` with an order; the worker streams ticks from the
host's ``trading.DataFetch`` callback (a Rust ``CallbackHandler``) and stops reading as soon
as a tick reaches the order's limit: breaking out of the loop cancels the callback in the
host, whose stream is dropped.
"""

from __future__ import annotations

from typing import Any

import kameo


async def execute_trade(order: dict[str, Any]) -> dict[str, Any]:
    """Buy at the first tick whose price reaches the order's limit; skip if none does."""
    ticks_seen = 0
    price = None
    action = "skip"
    async for tick in kameo.trading.DataFetch({"symbol": order["symbol"]}):
        ticks_seen += 1
        price = tick["price"]
        if price >= order["limit"]:
            action = "buy"
            break  # cancels the host's stream
    return {"symbol": order["symbol"], "action": action, "price": price, "ticks_seen": ticks_seen}
