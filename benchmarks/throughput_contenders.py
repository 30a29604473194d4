"""throughput.py's contenders other than ringfeed's: the in-process kernels, the classic generator,
tf.data, Keras PyDataset and the PyTorch DataLoader, each behind ``Contender``'s start/round/pull.

Heavy imports (tensorflow, keras, torch, numba) stay inside the functions: the benchmark's
spawned server and workers re-import this module.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager

import numpy as np

import benchlib
import python_ops
from benchlib import AUGMENT, BATCH, CROP, IMAGE, SEED

PYTHON_AUGMENT = [{"op": "python", "fn": python_ops.FN}]  # AUGMENT as per-sample numpy


class Contender:
    """One loader. ``start`` builds and warms it (untimed); ``round`` yields ``pull``,
    which fetches one batch and returns its x."""

    group = "peer"

    def __init__(self, name: str, label: str, workers: int | None = None):
        self.name, self.label, self.workers = name, label, workers
        self.rounds: list[dict] = []
        self.delivered: dict = {}  # what the first batch held: name -> [shape, dtype]

    def start(self, warmup: int) -> None:
        with self.round() as pull:
            x = pull()
            check_batch(self.name, x)
            self.delivered = self.delivered or described(x=x)
            for _ in range(warmup):
                pull()

    @property
    def samples_per_s(self) -> list[float]:
        return [r["samples_per_s"] for r in self.rounds]

    @contextmanager
    def round(self):
        yield self.pull

    def pull(self):
        raise NotImplementedError

    def stop(self) -> None:
        pass


def described(**arrays) -> dict:
    """name -> [shape, dtype] of each array; a dict's entries are named ``name.key``."""
    out = {}
    for name, a in arrays.items():
        for key, v in (a.items() if isinstance(a, dict) else [(None, a)]):
            shape, dtype = benchlib.shape_dtype(v)
            out[name if key is None else f"{name}.{key}"] = [list(shape), dtype]
    return out


def check_batch(name: str, x) -> None:
    """Every contender must deliver the same thing, or the comparison means nothing. A dict x
    (several inputs) is checked by its image field, ``features``."""
    if isinstance(x, dict):
        x = x["features"]
    shape, dtype = benchlib.shape_dtype(x)
    if shape != (BATCH, *CROP, IMAGE[2]) or dtype != "float32":
        raise RuntimeError(f"{name} delivered x of shape {shape} and dtype {dtype}, "
                           f"expected {(BATCH, *CROP, IMAGE[2])} float32")


class ClassicGenerator(Contender):
    def __init__(self, features, labels):
        super().__init__("classic-generator", "classic Python generator, 1 process")
        self.gen = benchlib.classic_generator(features, labels)

    def pull(self):
        return next(self.gen)[0]


class NumbaThreads(Contender):
    """A contender that runs numba kernels in this process, on ``workers`` threads while timed."""

    @contextmanager
    def round(self):
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(self.workers)
        try:
            yield self.pull
        finally:
            numba.set_num_threads(before)


class NumbaInProcess(NumbaThreads):
    """ringfeed's own kernels called in the consumer's process: the compute limit, no delivery."""

    def __init__(self, features, labels, all_cores: bool):
        import numba

        cores = min(os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS)
        if all_cores:
            super().__init__("numba-all-cores", f"numba Pipeline in-process, {cores} threads", cores)
        else:
            super().__init__("numba-1-thread", "numba Pipeline in-process, 1 thread", 1)
        self.features, self.labels = features, labels
        self.batch = 0

    def start(self, warmup: int) -> None:
        from ringfeed.server.augment import Pipeline
        from ringfeed.server.ring import aligned_empty
        from ringfeed.server.sampler import Sampler

        self.pipe = Pipeline(AUGMENT, IMAGE, np.uint8, compiled=True)
        self.sampler = Sampler(len(self.features), BATCH, SEED, "shuffle")
        self.x = aligned_empty((BATCH, *self.pipe.out_shape), self.pipe.out_dtype)  # as a slot's
        self.y = np.empty(BATCH, self.labels.dtype)
        super().start(warmup)

    def pull(self):
        from ringfeed.server.augment.rng import sample_keys

        epoch, index = divmod(self.batch, self.sampler.steps_per_epoch)
        self.batch += 1
        idx = self.sampler.indices(epoch, index)
        self.pipe.run(self.features, idx, sample_keys(SEED, epoch, index, BATCH), self.x)
        np.take(self.labels, idx, axis=0, out=self.y)
        return self.x


class SampleCost(NumbaThreads):
    """One core's cost per sample, in-process: ``SamplePipeline.run`` over the images and labels
    with the numba ops (``AUGMENT``) or the python op (``PYTHON_AUGMENT``), as a worker makes a
    batch, but into one buffer; or the python op's function alone, called in a loop with one
    Generator (the DataLoader's way). Measured in the rounds, reported apart from the loaders."""

    KINDS = {"numba": "numba ops (SamplePipeline.run)", "python-op": "python op (SamplePipeline.run)",
             "python-fn": "python_ops.crop_flip_normalize alone, one Generator"}

    def __init__(self, features, labels, kind: str):
        super().__init__(f"per-sample-{kind}", f"{self.KINDS[kind]}, 1 thread", 1)
        self.features, self.labels, self.kind = features, labels, kind
        self.batch = 0

    def start(self, warmup: int) -> None:
        from ringfeed.server.augment.rng import sample_keys
        from ringfeed.server.augment.sample import SamplePipeline
        from ringfeed.server.ring import aligned_empty
        from ringfeed.server.sampler import Sampler

        self.source = {"features": self.features, "labels": self.labels}
        self.sampler = Sampler(len(self.features), BATCH, SEED, "shuffle")
        if self.kind == "python-fn":
            self.rng = np.random.default_rng(SEED)
            self.x = aligned_empty((BATCH, *CROP, IMAGE[2]), np.float32)
        else:
            specs = AUGMENT if self.kind == "numba" else PYTHON_AUGMENT
            self.pipe = SamplePipeline(specs, self.source, "features", True, sample_keys(SEED, 0, 0, 1)[0])
            self.out = {name: aligned_empty((BATCH, *shape), dtype)
                        for name, (shape, dtype) in self.pipe.out_fields.items()}
        super().start(warmup)

    def pull(self):
        from ringfeed.server.augment.rng import sample_keys

        epoch, index = divmod(self.batch, self.sampler.steps_per_epoch)
        self.batch += 1
        idx = self.sampler.indices(epoch, index)
        if self.kind == "python-fn":
            for k, i in enumerate(idx):
                self.x[k] = python_ops.crop_flip_normalize(
                    {"features": self.features[i], "labels": self.labels[i]}, self.rng)["features"]
            return self.x
        self.pipe.run(self.source, idx, sample_keys(SEED, epoch, index, BATCH), self.out)
        return self.out["features"]


class TfData(benchlib.IteratorPerRound, Contender):
    def __init__(self, features, labels):
        super().__init__("tf.data", "tf.data map(AUTOTUNE)")
        self.features, self.labels = features, labels

    def start(self, warmup: int) -> None:
        self.dataset = benchlib.tf_pipeline(self.features, self.labels)
        super().start(warmup)


def make_pydataset(features, labels, workers: int):
    """A Keras PyDataset whose ``__getitem__`` is the classic per-sample batch, infinite."""
    import keras

    class ClassicPyDataset(keras.utils.PyDataset):
        @property
        def num_batches(self):
            return None

        def __getitem__(self, index):
            return benchlib.classic_batch(features, labels, np.random.default_rng([SEED, index]))

    return ClassicPyDataset(workers=workers, use_multiprocessing=True)


class KerasPyDataset(Contender):
    def __init__(self, features, labels, workers: int):
        super().__init__("keras-pydataset", f"Keras PyDataset, {workers} processes", workers)
        self.features, self.labels = features, labels

    def start(self, warmup: int) -> None:
        # The adapter model.fit wraps a PyDataset in; its enqueuer runs the process pool.
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

        self.adapter = PyDatasetAdapter(make_pydataset(self.features, self.labels, self.workers))
        self.it = self.adapter.get_numpy_iterator()
        super().start(warmup)

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None
        self.adapter.enqueuer.stop()


class PerSampleDataset:
    """Map-style dataset: one augmented sample per index (the common PyTorch recipe), made by
    the function ringfeed's python op contender runs, with one Generator per worker."""

    def __init__(self, features, labels):
        self.features, self.labels = features, labels
        self.rng = np.random.default_rng(SEED)

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        sample = python_ops.crop_flip_normalize({"features": self.features[i], "labels": self.labels[i]},
                                                self.rng)
        return sample["features"], sample["labels"]


class NumbaBatchDataset:
    """Batch-level dataset: batch number b is ringfeed's batch (epoch, index), made by its kernels."""

    def __init__(self, features, labels):
        from ringfeed.server.augment import Pipeline
        from ringfeed.server.sampler import Sampler

        self.features, self.labels = features, labels
        self.pipe = Pipeline(AUGMENT, IMAGE, np.uint8, compiled=True)
        self.sampler = Sampler(len(features), BATCH, SEED, "shuffle")

    def __getitem__(self, b):
        from ringfeed.server.augment.rng import sample_keys

        epoch, index = divmod(b, self.sampler.steps_per_epoch)
        idx = self.sampler.indices(epoch, index)
        x = np.empty((BATCH, *self.pipe.out_shape), self.pipe.out_dtype)
        self.pipe.run(self.features, idx, sample_keys(SEED, epoch, index, BATCH), x)
        return x, self.labels[idx]


def _torch_worker_init(worker_id: int) -> None:
    import numba
    from torch.utils.data import get_worker_info

    numba.set_num_threads(1)  # one process per core, as ringfeed's workers
    dataset = get_worker_info().dataset
    if isinstance(dataset, PerSampleDataset):  # forked workers would share one RNG state otherwise
        dataset.rng = np.random.default_rng([SEED, worker_id])


class TorchLoader(Contender):
    """PyTorch DataLoader with persistent forked workers and an endless sampler (no epoch gaps)."""

    def __init__(self, features, labels, workers: int, batch_level: bool):
        if batch_level:
            super().__init__("torch-numba-batch", f"PyTorch DataLoader, numba batches, {workers} workers",
                             workers)
        else:
            super().__init__("torch-per-sample", f"PyTorch DataLoader, per-sample, {workers} workers", workers)
        self.features, self.labels, self.batch_level = features, labels, batch_level

    def start(self, warmup: int) -> None:
        if self.batch_level:
            loader = benchlib.torch_loader(NumbaBatchDataset(self.features, self.labels), self.workers,
                                           _torch_worker_init, None, sampler=itertools.count())
        else:
            loader = benchlib.torch_loader(PerSampleDataset(self.features, self.labels), self.workers,
                                           _torch_worker_init, BATCH)
        self.it = iter(loader)
        super().start(warmup)

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None  # shuts the workers down
