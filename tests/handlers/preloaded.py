"""A handler module that records which process imported it (a zygote preloads it)."""

import contextlib
import os
import random

try:  # numpy's global generator is made at import: a fork copies its state
    import numpy
except ImportError:
    numpy = None

IMPORTED_BY = os.getpid()


def info(msg):
    out = {
        "imported_by": IMPORTED_BY,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "random": random.random(),
    }
    if numpy is not None:
        out["numpy"] = float(numpy.random.random())
    if msg == "fds":
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        out["fds"] = fds
    return out
