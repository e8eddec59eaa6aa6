"""A handler module whose import fails."""

raise RuntimeError("kameo-import-boom-7f3a")


def handler(msg):  # pragma: no cover - never reached
    return msg
