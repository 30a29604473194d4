"""What batch (epoch, index) is: sample ids, then every field through the augmentation, into a slot.

If the pipeline raises, the batch is re-run one sample at a time to find the
sample at fault. ``on_error="raise"`` reports it (``SampleError``, with the
dataset index and the original traceback); ``on_error="skip"`` replaces it with
another sample chosen by the counter-based RNG, so the result is still a pure
function of (seed, epoch, index).
"""

from __future__ import annotations

import traceback

import numpy as np

from .augment import SamplePipeline
from .augment.rng import sample_keys, uniform
from .config import Config
from .ring import aligned_empty
from .sampler import Sampler
from .sources import SourceRef, open_ref

REPLACEMENT_DRAW = 1 << 20  # far from any op's draws
MAX_REPLACEMENT_TRIES = 8


class SampleError(Exception):
    """An op failed on one sample; carries where, and the original traceback."""

    def __init__(self, sample: int, position: int, cause: BaseException, trace: str):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.sample, self.position, self.cause, self.trace = sample, position, cause, trace


class BatchMaker:
    def __init__(self, config: Config, source: SourceRef):
        structure = config.structure
        opened = open_ref(source)
        self.fields = {name: opened[name] for name in structure.names}  # in slot order
        if config.private_data:  # numpy puts large arrays in huge pages; /dev/shm may not have them
            for name, array in self.fields.items():
                self.fields[name] = np.array(array)
                self.fields[name].flags.writeable = False  # as the shared view: the same kernels serve
        self.config = config
        self.samples = len(next(iter(self.fields.values())))
        self.sampler = Sampler(self.samples, config.batch_size, config.seed, config.sampling,
                               config.steps_per_epoch)
        inputs = structure.inputs
        self.pipeline = SamplePipeline(config.augment, self.fields, inputs if isinstance(inputs, str) else inputs[0],
                                       config.jit, sample_keys(config.seed, 0, 0, 1)[0], config.image_channels)
        self._one = None

    def empty_batch(self, batch: int | None = None) -> dict[str, np.ndarray]:
        """One array per output field, aligned as a ring slot's (so the same kernels compile)."""
        batch = self.config.batch_size if batch is None else batch
        return {name: aligned_empty((batch, *shape), dtype) for name, (shape, dtype) in self.pipeline.out_fields.items()}

    def make(self, epoch: int, index: int, out: dict[str, np.ndarray], streaming: bool = False) -> int:
        """Write batch (epoch, index) into ``out`` (one array per field); return how many samples
        were skipped. ``streaming``: ``out`` is a ring slot, which nobody reads soon."""
        idx = self.sampler.indices(epoch, index)
        keys = sample_keys(self.config.seed, epoch, index, self.config.batch_size)
        skipped = 0
        try:
            self.pipeline.run(self.fields, idx, keys, out, streaming)
        except Exception as exc:
            bad = self._failing_sample(idx, keys)
            if bad is None:
                raise
            if self.config.on_error == "raise":
                raise bad from exc
            idx = idx.copy()
            while bad is not None:
                idx[bad.position] = self._replacement(idx, keys, bad)
                skipped += 1
                bad = self._failing_sample(idx, keys)
            self.pipeline.run(self.fields, idx, keys, out, streaming)
        return skipped

    def _run_one(self, idx: np.ndarray, keys: np.ndarray, position: int) -> None:
        if self._one is None:
            self._one = self.empty_batch(1)
        self.pipeline.run(self.fields, idx[position:position + 1], keys[position:position + 1], self._one)

    def _failing_sample(self, idx, keys) -> SampleError | None:
        for position in range(len(idx)):
            try:
                self._run_one(idx, keys, position)
            except Exception as exc:
                return SampleError(int(idx[position]), position, exc, traceback.format_exc())
        return None

    def _replacement(self, idx, keys, bad: SampleError) -> int:
        n = self.samples
        for attempt in range(MAX_REPLACEMENT_TRIES):
            u = uniform(keys[bad.position:bad.position + 1], REPLACEMENT_DRAW + attempt)[0]
            candidate = min(int(u * n), n - 1)
            trial = idx.copy()
            trial[bad.position] = candidate
            try:
                self._run_one(trial, keys, bad.position)
            except Exception:
                continue
            return candidate
        raise bad
