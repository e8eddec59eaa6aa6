"""A handler module that imports numpy (its BLAS may start threads at import)."""

import numpy


def mean(xs):
    return float(numpy.mean(xs))
