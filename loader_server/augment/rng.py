"""Counter-based random numbers: a pure hash of (seed, epoch, batch, sample, draw).

No generator state exists anywhere: the k-th random number of sample b in
batch (epoch, index) is ``uniform(sample_keys(seed, epoch, index, B)[b], k)``,
so a batch is identical whichever worker computes it, and in whatever order.
The mixer is SplitMix64's finaliser; it works on numpy uint64 arrays
(vectorised, wrapping) and inside numba kernels alike.
"""

from __future__ import annotations

import numpy as np

from .jit import kernel

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


def mix64(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def sample_keys(seed: int, epoch: int, index: int, batch_size: int) -> np.ndarray:
    """One uint64 key per sample position of batch (epoch, index)."""
    with np.errstate(over="ignore"):
        base = mix64(mix64(mix64(np.uint64(seed) ^ _GOLDEN) ^ np.uint64(epoch)) ^ np.uint64(index))
        return mix64(base ^ (np.arange(batch_size, dtype=np.uint64) * _GOLDEN))


def uniform(keys: np.ndarray, draw: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per key, for random choice number ``draw``."""
    with np.errstate(over="ignore"):
        bits = mix64(keys ^ mix64(np.uint64(draw + 1) * _GOLDEN))
    return (bits >> _S11).astype(np.float64) * _TO_UNIT


mix64_scalar = kernel(parallel=False)(mix64)


@kernel(parallel=False)
def uniform_at(key, counter):
    """The scalar form of ``uniform`` for use inside kernels (e.g. per pixel)."""
    bits = mix64_scalar(key ^ mix64_scalar((np.uint64(counter) + np.uint64(1)) * _GOLDEN))
    return np.float64(bits >> _S11) * _TO_UNIT
