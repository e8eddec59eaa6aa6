"""A handler module that imports nothing but ``sys``, and ``logging`` only when asked to log
(kameo defers its log forwarding until then)."""

import sys


def imported(_msg=None):
    return sorted(m for m in ("logging", "traceback", "inspect", "typing") if m in sys.modules)


def modules(_msg=None):
    return sorted(sys.modules)


def log_now(msg):
    import logging

    logger = logging.getLogger("kameo_test.late")
    logger.debug("debug %s", msg)
    logger.warning("warning %s", msg)
    return logger.getEffectiveLevel()
