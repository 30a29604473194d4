"""What batch (epoch, index) is: sample ids, augmentation and labels, written into a slot.

If the pipeline raises, the batch is re-run one sample at a time to find the
sample at fault. ``on_error="raise"`` reports it (``SampleError``, with the
dataset index and the original traceback); ``on_error="skip"`` replaces it with
another sample chosen by the counter-based RNG, so the result is still a pure
function of (seed, epoch, index).
"""

from __future__ import annotations

import traceback

import numpy as np

from .augment import Pipeline
from .augment.rng import sample_keys, uniform
from .config import Config
from .sampler import Sampler
from .sources import SourceRef, open_ref

REPLACEMENT_STREAM = 1 << 20  # far from any op's streams
MAX_REPLACEMENT_TRIES = 8


class SampleError(Exception):
    """An op failed on one sample; carries where, and the original traceback."""

    def __init__(self, sample: int, position: int, cause: BaseException, trace: str):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.sample, self.position, self.cause, self.trace = sample, position, cause, trace


class BatchMaker:
    def __init__(self, config: Config, source: SourceRef):
        self.features, self.labels = open_ref(source)
        if config.private_data:  # numpy puts large arrays in huge pages; /dev/shm may not have them
            self.features = np.array(self.features)
            self.features.flags.writeable = False  # as the shared view: the kernels compiled for it serve
        self.config = config
        self.sampler = Sampler(len(self.features), config.batch_size, config.seed, config.sampling,
                               config.steps_per_epoch)
        self.pipeline = Pipeline(config.augment, self.features.shape[1:], self.features.dtype, config.jit)
        self._one = None

    def make(self, epoch: int, index: int, x: np.ndarray, y: np.ndarray, stream: bool = False) -> int:
        """Write batch (epoch, index) into ``x`` and ``y``; return how many samples were skipped.
        ``stream``: ``x`` is a ring slot, which nobody reads soon (``Pipeline.run``)."""
        idx = self.sampler.indices(epoch, index)
        keys = sample_keys(self.config.seed, epoch, index, self.config.batch_size)
        skipped = 0
        try:
            self.pipeline.run(self.features, idx, keys, x, stream)
        except Exception as exc:
            bad = self._failing_sample(idx, keys, x)
            if bad is None:
                raise
            if self.config.on_error == "raise":
                raise bad from exc
            idx = idx.copy()
            while bad is not None:
                idx[bad.position] = self._replacement(idx, keys, bad)
                skipped += 1
                bad = self._failing_sample(idx, keys, x)
            self.pipeline.run(self.features, idx, keys, x, stream)
        np.take(self.labels, idx, axis=0, out=y)
        return skipped

    def _run_one(self, idx: np.ndarray, keys: np.ndarray, x: np.ndarray, position: int) -> None:
        if self._one is None:
            self._one = np.empty((1, *x.shape[1:]), x.dtype)
        self.pipeline.run(self.features, idx[position:position + 1], keys[position:position + 1], self._one)

    def _failing_sample(self, idx, keys, x) -> SampleError | None:
        for position in range(len(idx)):
            try:
                self._run_one(idx, keys, x, position)
            except Exception as exc:
                return SampleError(int(idx[position]), position, exc, traceback.format_exc())
        return None

    def _replacement(self, idx, keys, bad: SampleError) -> int:
        n = len(self.features)
        for attempt in range(MAX_REPLACEMENT_TRIES):
            u = uniform(keys[bad.position:bad.position + 1], REPLACEMENT_STREAM + attempt)[0]
            candidate = min(int(u * n), n - 1)
            trial = idx.copy()
            trial[bad.position] = candidate
            try:
                self._run_one(trial, keys, self._one, bad.position)
            except Exception:
                continue
            return candidate
        raise bad
