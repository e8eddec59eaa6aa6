"""A handler module whose import fails (host.rs startup tests)."""

import hostw_missing_dependency  # noqa: F401  (there is no such module)


def handler(msg):  # pragma: no cover - never reached
    return msg
