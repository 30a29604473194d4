"""Loader-only throughput: how many augmented samples per second each loader hands its consumer.

Workload (benchlib): 20,000 synthetic 64x64x3 uint8 images, random 56x56 crop,
random horizontal flip, (x/255 - mean)/std to float32, batch 256. Every
contender delivers the same (256, 56, 56, 3) float32 batches; the consumer
takes each one and drops it at once.

Contenders are started and warmed up once, outside the timed region, then
measured round-robin: each round times every contender once (the order
rotates between rounds), each for ``--seconds`` after a few untimed batches.
Reported: the median over rounds of samples/s and MB/s of delivered x, and the
ratio to tf.data measured in the same invocation.

Three comparisons of issue #13 ride along, measured in the same rounds:
ringfeed serving samples of several fields (x a dict of the images and a
float32 (16,) ``meta`` vector, plus a float32 ``sample_weight``) against the
in-process numba kernel, as the two-field service is; ringfeed running the
augmentation as per-sample numpy in a ``python`` op (``python_ops.py``)
against the PyTorch DataLoader running the same function; and, in-process on
one thread, the cost per sample of that python op against the numba ops.

    .venv/bin/python benchmarks/throughput.py [--quick] [--rounds N] [--out DIR | --write-results]
"""

from __future__ import annotations

import itertools
import os
from contextlib import ExitStack, contextmanager

import numpy as np

import benchlib
import python_ops
from benchlib import AUGMENT, BATCH, CROP, IMAGE, META, SEED, log

SAMPLE_BYTES = CROP[0] * CROP[1] * IMAGE[2] * 4  # one float32 output sample
PYTHON_AUGMENT = [{"op": "python", "fn": python_ops.FN}]  # AUGMENT as per-sample numpy
MULTI_FIELD = {"inputs": ["features", "meta"], "targets": "labels", "sample_weight": "weight"}
KERNEL_TARGET = 0.9  # the bar: ringfeed delivers at least 0.9x the in-process kernel


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


def shape_dtype(a) -> tuple[tuple, str]:
    """(shape, dtype name) of a numpy array or a TensorFlow or PyTorch tensor."""
    return tuple(a.shape), getattr(a.dtype, "name", None) or str(a.dtype).rsplit(".", 1)[-1]


def described(**arrays) -> dict:
    """name -> [shape, dtype] of each array; a dict's entries are named ``name.key``."""
    out = {}
    for name, a in arrays.items():
        for key, v in (a.items() if isinstance(a, dict) else [(None, a)]):
            shape, dtype = shape_dtype(v)
            out[name if key is None else f"{name}.{key}"] = [list(shape), dtype]
    return out


def check_batch(name: str, x) -> None:
    """Every contender must deliver the same thing, or the comparison means nothing. A dict x
    (several inputs) is checked by its image field, ``features``."""
    if isinstance(x, dict):
        x = x["features"]
    shape, dtype = shape_dtype(x)
    if shape != (BATCH, *CROP, IMAGE[2]) or dtype != "float32":
        raise RuntimeError(f"{name} delivered x of shape {shape} and dtype {dtype}, "
                           f"expected {(BATCH, *CROP, IMAGE[2])} float32")


class ClassicGenerator(Contender):
    def __init__(self, features, labels):
        super().__init__("classic-generator", "classic Python generator, 1 process")
        self.gen = benchlib.classic_generator(features, labels)

    def pull(self):
        return next(self.gen)[0]


class NumbaInProcess(Contender):
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
        from loader_server.augment import Pipeline
        from loader_server.ring import aligned_empty
        from loader_server.sampler import Sampler

        self.pipe = Pipeline(AUGMENT, IMAGE, np.uint8, compiled=True)
        self.sampler = Sampler(len(self.features), BATCH, SEED, "shuffle")
        self.x = aligned_empty((BATCH, *self.pipe.out_shape), self.pipe.out_dtype)  # as a slot's
        self.y = np.empty(BATCH, self.labels.dtype)
        super().start(warmup)

    @contextmanager
    def round(self):
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(self.workers)
        try:
            yield self.pull
        finally:
            numba.set_num_threads(before)

    def pull(self):
        from loader_server.augment.rng import sample_keys

        epoch, index = divmod(self.batch, self.sampler.steps_per_epoch)
        self.batch += 1
        idx = self.sampler.indices(epoch, index)
        self.pipe.run(self.features, idx, sample_keys(SEED, epoch, index, BATCH), self.x)
        np.take(self.labels, idx, axis=0, out=self.y)
        return self.x


class SampleCost(Contender):
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
        from loader_server.augment.rng import sample_keys
        from loader_server.augment.sample import SamplePipeline
        from loader_server.ring import aligned_empty
        from loader_server.sampler import Sampler

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

    @contextmanager
    def round(self):
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            yield self.pull
        finally:
            numba.set_num_threads(before)

    def pull(self):
        from loader_server.augment.rng import sample_keys

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


class TfData(Contender):
    def __init__(self, features, labels):
        super().__init__("tf.data", "tf.data map(AUTOTUNE)")
        self.features, self.labels = features, labels

    def start(self, warmup: int) -> None:
        self.dataset = benchlib.tf_pipeline(self.features, self.labels)
        super().start(warmup)

    @contextmanager
    def round(self):
        # A pipeline per round: left running between rounds, its AUTOTUNE map and prefetch keep
        # filling buffers in this process's threads, on the CPU of whichever loader is timed next.
        self.it = iter(self.dataset)
        try:
            yield self.pull
        finally:
            self.it = None

    def pull(self):
        return next(self.it)[0]


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
        from loader_server.augment import Pipeline
        from loader_server.sampler import Sampler

        self.features, self.labels = features, labels
        self.pipe = Pipeline(AUGMENT, IMAGE, np.uint8, compiled=True)
        self.sampler = Sampler(len(features), BATCH, SEED, "shuffle")

    def __getitem__(self, b):
        from loader_server.augment.rng import sample_keys

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
        from torch.utils.data import DataLoader, RandomSampler

        if self.batch_level:
            loader = DataLoader(NumbaBatchDataset(self.features, self.labels), batch_size=None,
                                sampler=itertools.count(), num_workers=self.workers,
                                worker_init_fn=_torch_worker_init, multiprocessing_context="fork",
                                timeout=benchlib.LOADER_TIMEOUT_S)
        else:
            dataset = PerSampleDataset(self.features, self.labels)
            loader = DataLoader(dataset, batch_size=BATCH, num_workers=self.workers,
                                sampler=RandomSampler(dataset, replacement=True, num_samples=1 << 62),
                                worker_init_fn=_torch_worker_init, multiprocessing_context="fork",
                                timeout=benchlib.LOADER_TIMEOUT_S)
        self.it = iter(loader)
        super().start(warmup)

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None  # shuts the workers down


class RingfeedGenerator(Contender):
    """A feed of its own service, open for the whole run: an idle feed holds slots of its
    service, so feeds never share one."""

    group = "ringfeed"

    def __init__(self, endpoint: str, workers: int):
        super().__init__(*benchlib.ringfeed_contender("generator", workers), workers)
        self.endpoint = endpoint

    def start(self, warmup: int) -> None:
        from client import Feed

        self.feed = Feed(self.endpoint)
        self.it = self.batches()
        super().start(warmup)

    def batches(self):
        return self.feed.generator()

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None  # stop TensorFlow's reader, if any, before the feed closes
        self.feed.close()


class RingfeedPrivate(RingfeedGenerator):
    """The generator of a service whose workers read their own copies of the dataset
    (``private_data``), in transparent huge pages."""

    @staticmethod
    def named(workers: int) -> str:
        return f"ringfeed-private-generator-w{workers}"

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = self.named(workers)
        self.label = f"ringfeed generator(), {workers} workers, private_data"


class RingfeedPlainStores(RingfeedGenerator):
    """The generator of a service whose workers write slots with plain stores
    (``streaming_stores = false``): what streaming stores save."""

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = f"ringfeed-plain-stores-generator-w{workers}"
        self.label = f"ringfeed generator(), {workers} workers, plain stores"


class RingfeedTfDataset(RingfeedGenerator):
    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name, self.label = benchlib.ringfeed_contender("tf-dataset", workers)

    def batches(self):
        return iter(self.feed.as_tf_dataset())


class RingfeedMultiField(RingfeedGenerator):
    """The generator of a service with four fields: x = {"features", "meta"}, y = labels and
    w = weight (``MULTI_FIELD``); the numba ops run on features, the rest is gathered."""

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = f"ringfeed-multi-field-generator-w{workers}"
        self.label = f"ringfeed generator(), {workers} workers, x: image + meta ({META},), sample_weight"

    def start(self, warmup: int) -> None:
        from client import Feed

        self.feed = Feed(self.endpoint)
        self.it = self.batches()
        x, y, w = next(self.it)
        check_batch(self.name, x)
        self.delivered = described(x=x, y=y, w=w)
        want = {"x.features": [[BATCH, *CROP, IMAGE[2]], "float32"], "x.meta": [[BATCH, META], "float32"],
                "y": [[BATCH], "int64"], "w": [[BATCH], "float32"]}
        if self.delivered != want:
            raise RuntimeError(f"{self.name} delivered {self.delivered}, expected {want}")
        Contender.start(self, warmup)


class RingfeedPythonOp(RingfeedGenerator):
    """The generator of a service whose workers run the augmentation as per-sample numpy in a
    ``python`` op (``PYTHON_AUGMENT``): the same function as the per-sample DataLoader."""

    def __init__(self, endpoint: str, workers: int):
        super().__init__(endpoint, workers)
        self.name = f"ringfeed-python-op-generator-w{workers}"
        self.label = f"ringfeed generator(), {workers} workers, python op (per-sample numpy)"


def torch_missing() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not importable ({exc}); pip install torch to include the DataLoader contenders"
    return None


def summarize(contenders: list[Contender]) -> list[dict]:
    rows = []
    for c in contenders:
        rows.append({"name": c.name, "label": c.label, "group": c.group, "workers": c.workers,
                     "delivered": c.delivered,
                     "median_samples_per_s": benchlib.median(r["samples_per_s"] for r in c.rounds),
                     "median_mb_per_s": benchlib.median(r["mb_per_s"] for r in c.rounds),
                     "rounds": c.rounds})
    reference = next(r["median_samples_per_s"] for r in rows if r["name"] == "tf.data")
    for row in rows:
        row["ratio_to_tf_data"] = benchlib.ratio(row["median_samples_per_s"], reference)
    return rows


def compare(contenders: list[Contender], what: str, name: str, reference: str, target: float | None) -> dict:
    """``name``'s median samples/s over ``reference``'s, and the median of the rounds' own ratios
    (both were timed in every round); None where either was not measured."""
    by_name = {c.name: c for c in contenders}
    row = {"what": what, "contender": name, "reference": reference, "target": target, "ratio": None,
           "median_round_ratio": None}
    if name in by_name and reference in by_name:
        mine, theirs = by_name[name].samples_per_s, by_name[reference].samples_per_s
        row["ratio"] = benchlib.ratio(benchlib.median(mine), benchlib.median(theirs))
        row["median_round_ratio"] = benchlib.median(a / b for a, b in zip(mine, theirs))
    return row


def comparisons(contenders: list[Contender], cores: int) -> list[dict]:
    return [compare(contenders, "several fields (x: image + meta, sample_weight) vs the in-process kernel",
                    f"ringfeed-multi-field-generator-w{cores}", "numba-all-cores", KERNEL_TARGET),
            compare(contenders, "two fields (features, labels) vs the in-process kernel",
                    f"ringfeed-generator-w{cores}", "numba-all-cores", KERNEL_TARGET),
            compare(contenders, "python op vs PyTorch DataLoader, same per-sample function and workers",
                    f"ringfeed-python-op-generator-w{cores}", "torch-per-sample", 1.0)]


def per_sample_cost(costs: list[SampleCost]) -> dict:
    rows = [{"name": c.name, "label": c.label, "delivered": c.delivered,
             "median_us_per_sample": benchlib.median(1e6 / r["samples_per_s"] for r in c.rounds),
             "rounds": c.rounds} for c in costs]
    us = {row["name"]: row["median_us_per_sample"] for row in rows}
    return {"rows": rows, "python_op_over_numba": benchlib.ratio(us["per-sample-python-op"], us["per-sample-numba"]),
            "python_op_overhead_us": us["per-sample-python-op"] - us["per-sample-python-fn"]}


def plot(rows: list[dict], skipped: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, line) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    ordered = sorted(rows, key=lambda r: r["median_samples_per_s"])
    medians = [r["median_samples_per_s"] / 1e3 for r in ordered]
    lows = [m - min(x["samples_per_s"] for x in r["rounds"]) / 1e3 for m, r in zip(medians, ordered)]
    highs = [max(x["samples_per_s"] for x in r["rounds"]) / 1e3 - m for m, r in zip(medians, ordered)]
    colors = ["tab:orange" if r["group"] == "ringfeed" else "tab:blue" for r in ordered]
    bars.barh([r["label"] for r in ordered], medians, xerr=[lows, highs], color=colors, capsize=3)
    for y, (m, high, r) in enumerate(zip(medians, highs, ordered)):
        bars.text(m + high, y, f"  {r['ratio_to_tf_data']:.1f}x", va="center", fontsize=8)
    bars.set_xlabel("thousand samples/s (median; whiskers: min-max over rounds; label: x tf.data)")
    if skipped:
        bars.set_title("skipped: " + ", ".join(s["name"] for s in skipped), fontsize=8)

    by_name = {r["name"]: r for r in rows}
    for prefix, label, marker in (("ringfeed-generator-w", "ringfeed generator()", "o"),
                                  ("ringfeed-tf-dataset-w", "ringfeed as_tf_dataset()", "s")):
        points = sorted((r["workers"], r["median_samples_per_s"] / 1e3) for r in rows
                        if r["name"].startswith(prefix))
        line.plot(*zip(*points), marker=marker, label=label)
    for name, style in (("numba-all-cores", "--"), ("numba-1-thread", ":"), ("tf.data", "-.")):
        line.axhline(by_name[name]["median_samples_per_s"] / 1e3, color="gray", linestyle=style,
                     label=by_name[name]["label"])
    line.set_xlabel("ringfeed workers")
    line.set_ylabel("thousand samples/s (median)")
    line.set_xticks(sorted({r["workers"] for r in rows if r["group"] == "ringfeed"}))
    line.set_ylim(bottom=0)
    line.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--seconds", type=float, help="timed seconds per contender per round (default 3, 0.25 quick)")
    p.add_argument("--samples", type=int, help="dataset size (default 20000, 2048 quick)")
    args = benchlib.parse(p)
    seconds = args.seconds or (0.25 if args.quick else 3.0)
    samples = args.samples or (2048 if args.quick else 20000)
    warmup = 2 if args.quick else 16  # untimed batches per round: covers ringfeed's prefetch
    cores = os.cpu_count() or 1

    features, labels = benchlib.make_images(samples)
    fields = benchlib.make_fields(features, labels)
    result = benchlib.header("throughput", args, samples=samples, batch_size=BATCH, seconds_per_round=seconds,
                             warmup_batches_per_round=warmup, image=list(IMAGE), crop=list(CROP),
                             augment=AUGMENT, sample_bytes=SAMPLE_BYTES, multi_field=MULTI_FIELD,
                             multi_field_shapes={k: [list(v.shape[1:]), v.dtype.name] for k, v in fields.items()},
                             python_augment=PYTHON_AUGMENT)
    skipped = []
    forking = [KerasPyDataset(features, labels, cores)]
    reason = torch_missing()
    if reason:
        log(f"skipping the PyTorch DataLoader contenders: {reason}")
        skipped = [{"name": name, "reason": reason} for name in ("torch-per-sample", "torch-numba-batch")]
    else:
        forking = [TorchLoader(features, labels, cores, False), TorchLoader(features, labels, cores, True)] \
            + forking
    with ExitStack() as stack:
        # Forked workers first: numba's OpenMP layer aborts a child forked after the parent ran a
        # parallel kernel, and no loader should inherit the others' threads.
        for c in forking:
            log(f"starting {c.label}")
            stack.callback(c.stop)
            c.start(warmup)
        ringfeed: list[Contender] = []
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedGenerator, RingfeedTfDataset),
                                                            features, labels):
            ringfeed.append(kind(endpoint, w))
        from loader_server import ConfigError

        try:
            for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedPrivate,), features,
                                                                labels, counts=[cores], private_data=True):
                ringfeed.append(kind(endpoint, w))
        except ConfigError as exc:  # one copy per worker may not fit in this host's memory
            log(f"skipping the private_data contender: {exc}")
            skipped.append({"name": RingfeedPrivate.named(cores), "reason": str(exc)})
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedPlainStores,), features, labels,
                                                            counts=[cores], streaming_stores=False):
            ringfeed.append(kind(endpoint, w))
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedMultiField,), None, None,
                                                            counts=[cores], fields=fields, **MULTI_FIELD):
            ringfeed.append(kind(endpoint, w))
        for kind, w, endpoint in benchlib.ringfeed_services(stack, "tp", (RingfeedPythonOp,), features, labels,
                                                            counts=[cores], augment=PYTHON_AUGMENT):
            ringfeed.append(kind(endpoint, w))
        costs = [SampleCost(features, labels, kind) for kind in SampleCost.KINDS]
        rest = [ClassicGenerator(features, labels), NumbaInProcess(features, labels, False),
                NumbaInProcess(features, labels, True), TfData(features, labels)] + ringfeed + costs
        for c in rest:
            log(f"starting {c.label}")
            stack.callback(c.stop)
            c.start(warmup)
        contenders = rest[:4] + forking[::-1] + ringfeed  # report order: simplest first, ringfeed last
        measured = contenders + costs

        for r in range(args.rounds):
            shift = r % len(measured)
            for c in measured[shift:] + measured[:shift]:
                with benchlib.OtherLoad() as load, c.round() as pull:
                    batches, elapsed = benchlib.timed(pull, seconds, warmup)
                rate = batches * BATCH / elapsed
                c.rounds.append({"samples_per_s": rate, "mb_per_s": rate * SAMPLE_BYTES / 1e6,
                                 "batches": batches, "seconds": elapsed, "other_load": load.share})
                log(f"[round {r + 1}/{args.rounds}] {c.name:<24} {rate:>10,.0f} samples/s"
                    f"  (other processes: {load.share:.0%} of the cores)")

    rows = summarize(contenders)
    result.update(contenders=rows, skipped=skipped, comparisons=comparisons(contenders, cores),
                  per_sample_cost=per_sample_cost(costs))
    machine = result["machine"]
    benchlib.write_json(args.out / "throughput.json", result)
    plot(rows, skipped, args.out / "throughput.png",
         f"Loader throughput, 64x64x3 uint8 -> crop 56, flip, normalize, batch {BATCH}; "
         f"{machine['cpu']}, {machine['cores']} cores; median of {args.rounds} rounds")
    log(f"wrote {args.out / 'throughput.png'}")
    print(f"{'contender':<36}{'samples/s':>12}{'MB/s':>9}{'x tf.data':>11}")
    for row in rows:
        print(f"{row['name']:<36}{row['median_samples_per_s']:>12,.0f}{row['median_mb_per_s']:>9,.0f}"
              f"{row['ratio_to_tf_data']:>11.2f}")
    for s in skipped:
        print(f"{s['name']:<36} skipped: {s['reason']}")
    for c in result["comparisons"]:
        shown = "not measured" if c["ratio"] is None else f"{c['ratio']:.2f}x (per round {c['median_round_ratio']:.2f}x)"
        print(f"{c['what']}: {shown}, target >= {c['target']:g}x")
    cost = result["per_sample_cost"]
    for row in cost["rows"]:
        print(f"{row['label']:<64}{row['median_us_per_sample']:>8.2f} us/sample")
    print(f"python op / numba ops: {cost['python_op_over_numba']:.1f}x per sample")


if __name__ == "__main__":
    main()
