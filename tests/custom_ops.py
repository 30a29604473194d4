"""A user op for the custom-op tests, imported by path as 'custom_ops:solarize'."""

import numpy as np
from numba import njit


@njit(cache=True)
def solarize(x, keys, params):
    threshold = params[0]
    flat = x.reshape(-1)
    for k in range(flat.size):
        if flat[k] > threshold:
            flat[k] = np.float32(1.0) - flat[k]


def not_jitted(x, keys, params):
    pass


@njit(cache=True)
def explode(x, keys, params):
    """Raises on any batch holding a value above params[0]: a 'poisoned' sample."""
    if x.max() > params[0]:
        raise ValueError("poisoned sample")


@njit(cache=True)
def segfault(x, keys, params):
    """Kills its worker (a write far out of bounds) on any batch holding a value above params[0]."""
    if x.max() > params[0]:
        flat = x.reshape(-1)
        flat[1 << 40] = 1.0
