"""kameo: pools of Python worker processes driven from asyncio, with a Rust core.

>>> async with kameo.Pool("pkg.mod:handler", size=4) as pool:
...     reply = await pool.ask({"symbol": "AAPL"}, timeout=5.0)
"""

from kameo._native import PROTOCOL_VERSION, decode, encode
from kameo.errors import (
    CallTimeout,
    KameoError,
    PoolClosed,
    ProtocolError,
    RemoteError,
    SerializationError,
    WorkerCrashed,
    WorkerStartupError,
)
from kameo.pool import Pool, WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "CallTimeout",
    "KameoError",
    "Pool",
    "PoolClosed",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerStartupError",
    "__version__",
    "decode",
    "encode",
]
