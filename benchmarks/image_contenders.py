"""images.py's workload and its peers' contenders: tf.data, Keras image_dataset_from_directory and
the PyTorch DataLoader (torchvision or Pillow), each behind ``Contender``'s start/round/pull.

Heavy imports (tensorflow, keras, torch, PIL) stay inside the functions: the benchmark's
spawned servers and processes re-import this module.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager

import numpy as np

import benchlib
from benchlib import MEAN, SEED, STD

SIZE = 224
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
NORMALIZE = {"op": "normalize", "mean": MEAN.tolist(), "std": STD.tolist()}
AUGMENT = {"float32": [{"op": "random_resized_crop", "size": SIZE}, {"op": "flip_lr"}, NORMALIZE],
           "uint8": [{"op": "random_resized_crop", "size": SIZE}, {"op": "flip_lr"}]}
DTYPES = ("float32", "uint8")


def plural(n: int, word: str, ending: str = "s") -> str:
    return f"{n} {word}{ending * (n != 1)}"


def check_batch(name: str, x, dtype: str, batch: int) -> list:
    """Every contender must deliver (batch, 224, 224, 3) of its dtype, or the comparison means nothing."""
    shape, got = benchlib.shape_dtype(x)
    if shape != (batch, SIZE, SIZE, 3) or got != dtype:
        raise RuntimeError(f"{name} delivered x of shape {shape} and dtype {got}, "
                           f"expected {(batch, SIZE, SIZE, 3)} {dtype}")
    return [list(shape), got]


class Contender:
    """One loader. ``start`` builds and warms it (untimed); ``round`` yields ``pull``, which
    fetches one batch of ``batch`` images and returns its x; ``measure`` times one round."""

    group = "peer"
    kind = "other"

    def __init__(self, name: str, label: str, dtype: str, batch: int, workers: int | None = None):
        self.name, self.label, self.dtype, self.batch, self.workers = name, label, dtype, batch, workers
        self.rounds: list[dict] = []
        self.delivered: dict = {}

    def start(self, warmup: int) -> None:
        with self.round() as pull:
            self.delivered = {"x": check_batch(self.name, pull(), self.dtype, self.batch)}
            for _ in range(warmup):
                pull()

    @contextmanager
    def round(self):
        yield self.pull

    def pull(self):
        raise NotImplementedError

    def measure(self, seconds: float, warmup: int) -> dict:
        with self.round() as pull:
            batches, elapsed = benchlib.timed(pull, seconds, warmup)
        return {"images_per_s": batches * self.batch / elapsed, "batches": batches, "seconds": elapsed}

    def stop(self) -> None:
        pass


# tf.data and Keras ---------------------------------------------------------------------

def tf_pipeline(paths, labels, dtype: str, batch: int):
    """read_file -> sample_distorted_bounding_box -> decode_and_crop_jpeg -> resize 224
    (bilinear, antialiased) -> flip -> normalize (or round to uint8), map(AUTOTUNE), batch, prefetch."""
    import tensorflow as tf

    mean, std = tf.constant(MEAN), tf.constant(STD)
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=(1, 1, 4))

    def load(path, label):
        data = tf.io.read_file(path)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.io.extract_jpeg_shape(data), bounding_boxes=whole, min_object_covered=0.0,
            aspect_ratio_range=RRC_RATIO, area_range=RRC_SCALE, max_attempts=10, use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, (SIZE, SIZE), method="bilinear", antialias=True)
        image = tf.image.random_flip_left_right(image)
        if dtype == "float32":
            image = (image / 255.0 - mean) / std
        else:
            image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        return image, label

    tf.random.set_seed(SEED)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=SEED).repeat()
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True) \
             .prefetch(tf.data.AUTOTUNE)


class TfContender(benchlib.IteratorPerRound, Contender):
    """A tf.data pipeline, iterated anew each round (``benchlib.IteratorPerRound``)."""

    def __init__(self, name, label, dtype, batch, make):
        super().__init__(name, label, dtype, batch)
        self.make = make

    def start(self, warmup: int) -> None:
        self.dataset = self.make()
        super().start(warmup)


def tf_data(paths, labels, dtype: str, batch: int) -> TfContender:
    suffix = "" if dtype == "float32" else "-uint8"
    return TfContender(f"tf.data{suffix}", f"tf.data, decode_and_crop_jpeg, {dtype}", dtype, batch,
                       lambda: tf_pipeline(paths, labels, dtype, batch))


def keras_reference(folder: str, batch: int) -> TfContender:
    def make():
        import keras
        import tensorflow as tf

        ds = keras.utils.image_dataset_from_directory(folder, labels="inferred", label_mode="int", batch_size=None,
                                                      image_size=(SIZE, SIZE), shuffle=True, seed=SEED, verbose=False)
        return ds.repeat().batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    return TfContender("keras-image-dataset", "Keras image_dataset_from_directory, decode + resize, float32",
                       "float32", batch, make)


# PyTorch DataLoader ----------------------------------------------------------------------

def rrc_box(rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        h, w = height, int(round(height * RRC_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PillowDataset:
    """Map-style: ``Image.open().convert("RGB")`` (a full decode), a torchvision-rule box,
    ``resize(box=...)`` (antialiased bilinear), flip, then normalize to float32 or stay uint8."""

    def __init__(self, paths, labels, dtype: str):
        self.paths, self.labels, self.dtype = paths, labels, dtype
        self.scale, self.shift = (1 / (255 * STD)).astype(np.float32), (-MEAN / STD).astype(np.float32)
        self.rng = random.Random(SEED)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB")
        top, left, h, w = rrc_box(self.rng, image.height, image.width)
        image = image.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + w, top + h))
        if self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image)
        # a writable array for collate: normalized, or a copy of Pillow's read-only view
        pixels = pixels * self.scale + self.shift if self.dtype == "float32" else pixels.copy()
        return pixels, int(self.labels[i])


class TorchvisionDataset:
    """Map-style: ``read_file`` + ``decode_jpeg`` + ``v2.RandomResizedCrop(224, antialias=True)`` +
    flip (+ ``ToDtype(float32, scale=True)`` + ``Normalize``), then channels last (NHWC, as the others)."""

    def __init__(self, paths, labels, dtype: str):
        self.paths, self.labels, self.dtype = paths, labels, dtype
        self.transform = None

    def __len__(self):
        return len(self.paths)

    def _transform(self):
        import torch
        from torchvision.transforms import v2

        steps = [v2.RandomResizedCrop(SIZE, scale=RRC_SCALE, ratio=RRC_RATIO, antialias=True),
                 v2.RandomHorizontalFlip()]
        if self.dtype == "float32":
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN.tolist(), STD.tolist())]
        return v2.Compose(steps)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        if self.transform is None:
            self.transform = self._transform()
        image = self.transform(decode_jpeg(read_file(self.paths[i]), mode=ImageReadMode.RGB))
        return image.permute(1, 2, 0), int(self.labels[i])


def _torch_worker_init(worker_id: int) -> None:
    import torch
    from torch.utils.data import get_worker_info

    torch.manual_seed(SEED * 1000 + worker_id)
    dataset = get_worker_info().dataset
    if isinstance(dataset, PillowDataset):  # forked workers would share one RNG state otherwise
        dataset.rng = random.Random(SEED * 1000 + worker_id)


class TorchLoader(Contender):
    """PyTorch DataLoader, one forked worker per core, persistent, over an endless sampler."""

    def __init__(self, name, label, dtype, batch, dataset, workers: int):
        super().__init__(name, label, dtype, batch, workers)
        self.dataset = dataset
        self.kind = "dataloader"

    def start(self, warmup: int) -> None:
        self.it = iter(benchlib.torch_loader(self.dataset, self.workers, _torch_worker_init, self.batch))
        super().start(warmup)

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None  # shuts the workers down


def torchvision_missing() -> str | None:
    """Why the torchvision contenders cannot run here, or None."""
    import torch

    try:
        import torchvision  # noqa: F401
        from torchvision.io import decode_jpeg  # noqa: F401
        from torchvision.transforms import v2  # noqa: F401
    except ModuleNotFoundError:
        reason = f"torchvision is not installed; it needs the build that matches torch {torch.__version__}"
        if "+cpu" in torch.__version__:
            reason += " (PyPI's torchvision wheels are CUDA builds, which fail to load beside a +cpu torch)"
        return reason
    except Exception as exc:  # a wheel built for another torch fails with RuntimeError or OSError
        return f"torchvision is not importable beside torch {torch.__version__} ({type(exc).__name__}: {exc})"
    return None
