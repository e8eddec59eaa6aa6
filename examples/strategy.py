"""Worker-side handlers for the trading part of the demo: they call back into the parent."""

from __future__ import annotations

from typing import Any

import kameo


async def execute_trade(order: dict[str, Any]) -> dict[str, Any]:
    """Stream prices from the parent's market-data handler, then ask it for the weather."""
    prices = []
    async for tick in kameo.trading.DataFetch({"symbol": order["symbol"]}):
        prices.append(tick["price"])
        if tick["price"] >= order["limit"]:
            break  # stops the parent's generator: its finally runs
    conditions = await kameo.callback_handle("weather.CurrentConditions", {"city": "NYC"})
    weather = [c async for c in conditions]
    return {
        "symbol": order["symbol"],
        "filled_at": prices[-1],
        "ticks": len(prices),
        "weather": weather,
    }


def execute_trade_sync(order: dict[str, Any]) -> float:
    """A plain function iterates a callback with a normal for loop."""
    return max(t["price"] for t in kameo.trading.DataFetch({"symbol": order["symbol"]}))
