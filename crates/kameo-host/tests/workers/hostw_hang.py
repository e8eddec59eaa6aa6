"""A handler module whose import hangs (host.rs: startup_timeout)."""

import time

time.sleep(600)


def handler(msg):  # pragma: no cover - never reached
    return msg
