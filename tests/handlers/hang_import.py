"""A handler module whose import never completes in a reasonable time."""

import time

time.sleep(60.0)


def handler(msg):  # pragma: no cover - never reached
    return msg
