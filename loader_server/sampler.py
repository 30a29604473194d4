"""Which samples make up batch (epoch, index): pure index math.

``shuffle``: a fresh permutation per epoch (Philox keyed by seed and epoch);
batch ``index`` is the ``index``-th run of ``batch_size`` ids, and the last
partial batch is dropped, so every sample appears exactly once per epoch.
``replacement``: ids drawn uniformly with replacement, keyed by
(seed, epoch, index), as the classic Keras ``fit_generator`` recipe does.

``steps_per_epoch`` defaults to ``n // batch_size``; when shuffling, more is
refused (an epoch holds no more full batches), never clamped.
"""

from __future__ import annotations

import numpy as np

from .config import ConfigError


class Sampler:
    def __init__(self, n: int, batch_size: int, seed: int, mode: str, steps_per_epoch: int | None = None):
        self.n, self.batch_size, self.seed, self.mode = n, batch_size, seed, mode
        full_batches = n // batch_size
        if mode == "shuffle" and steps_per_epoch is not None and steps_per_epoch > full_batches:
            raise ConfigError(f"steps_per_epoch {steps_per_epoch} is more than an epoch holds: {n} samples "
                              f"in batches of {batch_size} make at most {full_batches} (N // batch_size) "
                              "when shuffling")
        self.steps_per_epoch = steps_per_epoch or full_batches
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.Philox(key=[self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm

    def indices(self, epoch: int, index: int) -> np.ndarray:
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch index {index} is outside the epoch [0, {self.steps_per_epoch})")
        if self.mode == "shuffle":
            start = index * self.batch_size
            return self._permutation(epoch)[start:start + self.batch_size]
        rng = np.random.Generator(np.random.Philox(key=[self.seed, (epoch << 32) | index]))
        return rng.integers(0, self.n, self.batch_size, dtype=np.int64)
