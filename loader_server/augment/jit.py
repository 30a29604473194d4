"""The one place that decides how kernels are compiled.

Every kernel is built with ``kernel(...)``: numba ``njit`` with an on-disk
cache (so workers start warm), ``nogil`` and, by default, ``parallel=True``.
A parallel build run on one thread (``numba.set_num_threads(1)`` in each
worker) vectorised better here than a plain build. ``python_version`` gives
the same kernel as plain Python: the JIT "off" switch used by ``Config.jit``
and by the tests that compare both builds.
"""

from __future__ import annotations

import numba


def kernel(parallel: bool = True):
    def wrap(fn):
        return numba.njit(cache=True, nogil=True, parallel=parallel, error_model="numpy")(fn)
    return wrap


def python_version(fn):
    """The plain-Python function behind a compiled kernel (``fn`` itself if not compiled)."""
    return getattr(fn, "py_func", fn)


def select(fn, compiled: bool):
    return fn if compiled else python_version(fn)
