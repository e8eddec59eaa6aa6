"""A handler module that imports numpy (``bench_start.py``'s W7 with a heavy import)."""

import numpy


def echo(msg):
    return msg


def total(xs):
    return float(numpy.asarray(xs).sum())
