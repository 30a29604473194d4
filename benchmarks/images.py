"""Image files end to end: JPEGs decoded, RandomResizedCrop(224), flip, normalize, batch 128, side by side.

Data (made once, cached under ``--data-dir``): 5,000 JPEGs at quality 90, sides
between 256 and 512 pixels, cut from the real photographs that scikit-learn
ships (and scikit-image, where it is installed) by random crops, rescales and
colour shifts, in 10 class folders; and the same folder packed (``ringfeed
pack``). The pipeline: decode, RandomResizedCrop(224, scale (0.08, 1), ratio
(3/4, 4/3)), random horizontal flip, normalize to float32, batch 128, NHWC;
and the same without normalize, uint8.

Contenders, each started and warmed once, then measured round-robin (the
order rotates between rounds) for ``--seconds`` each after a few untimed
batches, once the loader timed before has finished refilling its buffers:
tf.data (``decode_and_crop_jpeg`` decodes only the crop window,
``map(AUTOTUNE)``, prefetch); the PyTorch DataLoader, one worker per core,
with torchvision (``decode_jpeg`` + ``v2.RandomResizedCrop(antialias=True)``)
or with Pillow (full decode, then ``resize(box=...)``, antialiased bilinear as
ringfeed's); Keras ``image_dataset_from_directory`` (decode + resize to 224
only, a reference); the in-process limit: ringfeed's own ``BatchMaker`` on
the packed file in one process per core, nothing delivered, rates summed; and
ringfeed services (one worker per core) on the folder and on the packed file.
Reported: images/s (median over rounds), ratios of medians and medians of the
rounds' own ratios against contenders of the same run, images/s per core next
to FFCV's published per-vCPU figure, and the share of decode time that DCT
downscaling saves on the boxes the crop draws. ``--quick`` (a smoke run:
200 JPEGs, batch 32, ringfeed and the limit on one worker each, short rounds)
says nothing about speed.

    .venv/bin/python benchmarks/images.py [--quick] [--rounds N] [--seconds S] [--images N]
                                          [--batch-size N] [--data-dir DIR] [--out DIR | --write-results]
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

import benchlib
from benchlib import MEAN, SEED, STD, log

SIZE = 224
BATCH = 128
CLASSES = 10
JPEG_QUALITY = 90
SIDES = (256, 512)  # every generated JPEG's height and width lie in [256, 512]
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
NORMALIZE = {"op": "normalize", "mean": MEAN.tolist(), "std": STD.tolist()}
AUGMENT = {"float32": [{"op": "random_resized_crop", "size": SIZE}, {"op": "flip_lr"}, NORMALIZE],
           "uint8": [{"op": "random_resized_crop", "size": SIZE}, {"op": "flip_lr"}]}
DTYPES = ("float32", "uint8")
KERNEL_TARGET, TF_TARGET, DATALOADER_TARGET = 0.9, 1.3, 2.0
# FFCV's ImageNet figure: decode + RandomResizedCrop(224) + flip, 31,278 images/s on 96 vCPUs.
FFCV = {"images_per_s": 31278, "vcpus": 96, "per_vcpu": 31278 / 96,
        "what": "decode + RandomResizedCrop(224) + flip, 96 vCPUs (FFCV's published figure)"}
DATA_VERSION = 1  # bump when the generator changes: cached data of another version is remade
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringfeed-bench"
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "retina.jpg", "motorcycle_left.png", "ihc.png")


# -- the data -------------------------------------------------------------------------

def photographs() -> dict[str, np.ndarray]:
    """name -> uint8 RGB photograph, from the images packages ship (nothing is downloaded)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {f"sklearn/{Path(f).name}": np.asarray(im) for f, im in zip(sample.filenames, sample.images)}
    try:
        import skimage.data
    except ImportError:
        return photos
    folder = Path(skimage.data.__file__).parent
    for name in SKIMAGE_PHOTOS:
        if (folder / name).is_file():
            with Image.open(folder / name) as im:
                photos[f"skimage/{name}"] = np.asarray(im.convert("RGB"))
    return photos


def _make_jpeg(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    """A random crop of ``photo``, rescaled to sides in SIDES, colour-shifted, as a quality-90 JPEG."""
    import io

    from PIL import Image

    out_h, out_w = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
    ph, pw = photo.shape[:2]
    aspect = out_w / out_h
    full_h = min(ph, pw / aspect)  # the largest box of the output's aspect that fits
    box_h = full_h * rng.uniform(0.4, 1.0)
    box_w = box_h * aspect
    top, left = rng.uniform(0, ph - box_h), rng.uniform(0, pw - box_w)
    image = Image.fromarray(photo).resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
    pixels = np.asarray(image, np.float32)
    gain, offset = rng.uniform(0.75, 1.25, 3).astype(np.float32), rng.uniform(-25, 25, 3).astype(np.float32)
    pixels = np.clip(pixels * gain + offset, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def make_data(data_dir: Path, count: int) -> dict:
    """The image folder and its packed file under ``data_dir``, made unless a complete copy of
    the same kind is there (its manifest, written last, says so); returns the manifest."""
    from concurrent.futures import ThreadPoolExecutor

    from loader_server.pack import pack

    photos = photographs()
    root = data_dir / f"images-{count}-seed{SEED}"
    manifest_path = root / "manifest.json"
    want = {"version": DATA_VERSION, "images": count, "seed": SEED, "classes": CLASSES, "quality": JPEG_QUALITY,
            "sides": list(SIDES), "photographs": sorted(photos)}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in want} == want and (root / "train.rfpack").is_file():
            log(f"reusing {count:,} JPEGs and their pack in {root}")
            manifest.update(folder=str(root / "train"), pack=str(root / "train.rfpack"), made_s=0.0)
            return manifest
    started = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    folder = root / "train"
    for k in range(CLASSES):
        (folder / f"class_{k:02d}").mkdir(parents=True)
    names = sorted(photos)
    log(f"writing {count:,} JPEGs cut from {len(names)} photographs into {folder}")

    def write(i: int) -> int:
        rng = np.random.default_rng([SEED, i])
        data = _make_jpeg(photos[names[int(rng.integers(len(names)))]], rng)
        (folder / f"class_{i % CLASSES:02d}" / f"img_{i:06d}.jpg").write_bytes(data)
        return len(data)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # Pillow releases the GIL to resize and encode
        total = sum(pool.map(write, range(count)))
    packed = pack(str(folder), str(root / "train.rfpack"), progress=False)
    manifest = {**want, "jpeg_bytes": total, "pack_bytes": packed["bytes"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    manifest.update(folder=str(folder), pack=str(root / "train.rfpack"), made_s=round(time.monotonic() - started, 1))
    log(f"made the data in {manifest['made_s']:.1f} s ({total / count / 1e3:.0f} kB a JPEG)")
    return manifest


def listing(folder: str) -> tuple[list[str], np.ndarray]:
    """The folder's files and labels in ringfeed's order (sorted classes, sorted files)."""
    from loader_server.images.listing import list_folder

    images = list_folder(folder)
    return list(images.paths), images.labels


# -- contenders -----------------------------------------------------------------------

def settle(limit_s: float) -> float:
    """Wait, at most ``limit_s``, until this process and its children are idle: a loader refills
    its buffers after its round (a DataLoader's 2 batches per worker, a feed's prefetch), which
    would take the cores from the loader timed next. Returns the seconds waited."""
    start = time.monotonic()
    _, before = benchlib.cpu_snapshot()
    while time.monotonic() - start < limit_s:
        time.sleep(0.1)
        _, now = benchlib.cpu_snapshot()
        if now - before < 0.02:  # under a fifth of a core over the last 0.1 s
            break
        before = now
    return time.monotonic() - start


def plural(n: int, word: str, ending: str = "s") -> str:
    return f"{n} {word}{ending * (n != 1)}"


def shape_dtype(a) -> tuple[tuple, str]:
    """(shape, dtype name) of a numpy array or a TensorFlow or PyTorch tensor."""
    return tuple(a.shape), getattr(a.dtype, "name", None) or str(a.dtype).rsplit(".", 1)[-1]


def check_batch(name: str, x, dtype: str) -> list:
    """Every contender must deliver (128, 224, 224, 3) of its dtype, or the comparison means nothing."""
    shape, got = shape_dtype(x)
    if shape != (BATCH, SIZE, SIZE, 3) or got != dtype:
        raise RuntimeError(f"{name} delivered x of shape {shape} and dtype {got}, "
                           f"expected {(BATCH, SIZE, SIZE, 3)} {dtype}")
    return [list(shape), got]


class Contender:
    """One loader. ``start`` builds and warms it (untimed); ``round`` yields ``pull``, which
    fetches one batch and returns its x; ``measure`` times one round."""

    group = "peer"
    kind = "other"

    def __init__(self, name: str, label: str, dtype: str, workers: int | None = None):
        self.name, self.label, self.dtype, self.workers = name, label, dtype, workers
        self.rounds: list[dict] = []
        self.delivered: dict = {}

    def start(self, warmup: int) -> None:
        with self.round() as pull:
            self.delivered = {"x": check_batch(self.name, pull(), self.dtype)}
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
        return {"images_per_s": batches * BATCH / elapsed, "batches": batches, "seconds": elapsed}

    def stop(self) -> None:
        pass


# tf.data and Keras ---------------------------------------------------------------------

def tf_pipeline(paths, labels, dtype: str):
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
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH, drop_remainder=True) \
             .prefetch(tf.data.AUTOTUNE)


class TfContender(Contender):
    """A tf.data pipeline, iterated anew each round: left running between rounds, its AUTOTUNE map
    and prefetch keep filling buffers on the CPU of whichever loader is timed next."""

    def __init__(self, name, label, dtype, make):
        super().__init__(name, label, dtype)
        self.make = make

    def start(self, warmup: int) -> None:
        self.dataset = self.make()
        super().start(warmup)

    @contextmanager
    def round(self):
        self.it = iter(self.dataset)
        try:
            yield self.pull
        finally:
            self.it = None

    def pull(self):
        return next(self.it)[0]


def tf_data(paths, labels, dtype: str) -> TfContender:
    suffix = "" if dtype == "float32" else "-uint8"
    return TfContender(f"tf.data{suffix}", f"tf.data, decode_and_crop_jpeg, {dtype}", dtype,
                       lambda: tf_pipeline(paths, labels, dtype))


def keras_reference(folder: str) -> TfContender:
    def make():
        import keras
        import tensorflow as tf

        ds = keras.utils.image_dataset_from_directory(folder, labels="inferred", label_mode="int", batch_size=None,
                                                      image_size=(SIZE, SIZE), shuffle=True, seed=SEED, verbose=False)
        return ds.repeat().batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    return TfContender("keras-image-dataset", "Keras image_dataset_from_directory, decode + resize, float32",
                       "float32", make)


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

    def __init__(self, name, label, dtype, dataset, workers: int):
        super().__init__(name, label, dtype, workers)
        self.dataset = dataset
        self.kind = "dataloader"

    def start(self, warmup: int) -> None:
        from torch.utils.data import DataLoader, RandomSampler

        loader = DataLoader(self.dataset, batch_size=BATCH, num_workers=self.workers,
                            sampler=RandomSampler(self.dataset, replacement=True, num_samples=1 << 62),
                            worker_init_fn=_torch_worker_init, multiprocessing_context="fork",
                            timeout=benchlib.LOADER_TIMEOUT_S)
        self.it = iter(loader)
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


def torch_missing() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not importable ({exc}); pip install torch to include the DataLoader contenders"
    return None


# The in-process limit -------------------------------------------------------------------

def _limit_process(conn, data: str, augment: list, batch_size: int, index: int, count: int) -> None:
    """One core of the limit: ringfeed's BatchMaker on ``data`` in this process, making batches
    index, index + count, ... into one buffer, timed on the parent's word."""
    import numba

    numba.set_num_threads(1)
    from loader_server import Config
    from loader_server.batches import BatchMaker
    from loader_server.service import prepare_source

    config, ref, _ = prepare_source(Config(data=data, batch_size=batch_size, workers=1, seed=SEED, augment=augment),
                                    f"imglimit{index}")
    maker = BatchMaker(config, ref)
    out = maker.empty_batch()
    x = out[config.structure.inputs]
    steps = maker.sampler.steps_per_epoch
    batch = itertools.count(index, count)

    def make():
        epoch, step = divmod(next(batch), steps)
        maker.make(epoch, step, out)

    make()
    conn.send(shape_dtype(x))
    while (order := conn.recv()) is not None:
        conn.send(benchlib.timed(make, *order))


class InProcessLimit(Contender):
    """ringfeed's decode and kernels (``BatchMaker.make``) on the packed file, one process per
    core, each writing its batches into one buffer: nothing delivered. A round times all of them
    at once; the rate is their sum."""

    group = "limit"

    def __init__(self, data: str, dtype: str, cores: int):
        suffix = "" if dtype == "float32" else "-uint8"
        super().__init__(f"in-process-limit{suffix}",
                         f"in-process limit, {plural(cores, 'process', 'es')}, packed, {dtype}", dtype, cores)
        self.data = data

    def launch(self) -> None:
        """Start the processes; ``start`` waits for them (so they can start beside other things)."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fork would inherit this process's threads (TensorFlow's)
        self.conns, self.procs = [], []
        for k in range(self.workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_limit_process, daemon=True, name=f"image-limit-{k}",
                               args=(theirs, self.data, AUGMENT[self.dtype], BATCH, k, self.workers))
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def start(self, warmup: int) -> None:
        if not hasattr(self, "conns"):
            self.launch()
        for conn in self.conns:
            shape, dtype = conn.recv()
            check_batch(self.name, np.empty(shape, dtype), self.dtype)
            self.delivered = {"x": [list(shape), dtype]}
        self.measure(0.0, warmup)

    def measure(self, seconds: float, warmup: int) -> dict:
        for conn in self.conns:
            conn.send((seconds, warmup))
        timed = [conn.recv() for conn in self.conns]
        return {"images_per_s": sum(b * BATCH / s for b, s in timed), "batches": sum(b for b, _ in timed),
                "seconds": max(s for _, s in timed)}

    def stop(self) -> None:
        for conn in getattr(self, "conns", []):
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in getattr(self, "procs", []):
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# ringfeed ----------------------------------------------------------------------------------

class Ringfeed(Contender):
    """A feed of its own service (one worker per core), open for the whole run."""

    group = "ringfeed"

    def __init__(self, endpoint: str, source: str, dtype: str, workers: int, prefetch: int):
        suffix = "" if dtype == "float32" else "-uint8"
        super().__init__(f"ringfeed-{source}{suffix}",
                         f"ringfeed generator(), {plural(workers, 'worker')}, {source}, {dtype}", dtype, workers)
        self.endpoint, self.prefetch, self.source = endpoint, prefetch, source

    def start(self, warmup: int) -> None:
        from client import Feed

        self.feed = Feed(self.endpoint, prefetch=self.prefetch)
        self.it = self.feed.generator()
        super().start(warmup)

    def pull(self):
        return next(self.it)[0]

    def stop(self) -> None:
        self.it = None
        if hasattr(self, "feed"):
            self.feed.close()


def ringfeed_services(stack: ExitStack, wanted: list[tuple[str, str, str]], workers: int, slots: int) -> list[str]:
    """A service of its own for each (source, data, dtype), started side by side and stopped side by
    side (each waits for its server to exit); their endpoints, in order. The threads that start them
    live until they are stopped: a server dies with the thread that started it (PR_SET_PDEATHSIG
    follows the creating thread, not the process)."""
    from concurrent.futures import ThreadPoolExecutor

    from loader_server import Config, Service

    services = []
    for source, data, dtype in wanted:
        log(f"starting a ringfeed service with {plural(workers, 'worker')} on the {source} ({dtype})")
        services.append(Service(Config(data=data, batch_size=BATCH, workers=workers, slots=slots, seed=SEED,
                                       augment=AUGMENT[dtype],
                                       name=benchlib.service_name("images", f"{source}-{dtype}"))))

    pool = ThreadPoolExecutor(len(services), thread_name_prefix="ringfeed-service")

    def stop_all():
        list(pool.map(lambda s: s.stop(), services))
        pool.shutdown()

    stack.callback(stop_all)
    return [s.endpoint for s in pool.map(lambda s: s.start(), services)]


# -- DCT downscaling -------------------------------------------------------------------------

def dct_saving(pack_path: str, samples: int, rounds: int) -> dict:
    """Decode time, one thread, of the same sampled JPEGs at full size and with the ``min_size`` that
    the RandomResizedCrop boxes drawn for them allow (as ringfeed's image field decodes): the share
    of decode time DCT downscaling saves. Thread CPU time, median over interleaved rounds."""
    from loader_server.augment.ops import Frame
    from loader_server.augment.rng import sample_keys
    from loader_server.images.decode import Decoder, dct_factor, read_header
    from loader_server.images.ops import RandomResizedCrop
    from loader_server.packfile import PackedFile

    with PackedFile(pack_path) as pack:
        records = pack.records("image")
        idx = np.random.default_rng([SEED, 2]).choice(len(records), samples, replace=len(records) < samples)
        encoded = [bytes(records.get(int(i))) for i in idx]
    sizes = np.array([read_header(data) for data in encoded])
    op = RandomResizedCrop("random_resized_crop", {"size": SIZE}, Frame(0, 0, 3, True), 0)
    _, _, bh, bw = op.boxes(sizes[:, 0], sizes[:, 1], sample_keys(SEED, 0, 0, samples))
    min_sizes = [(math.ceil(h * SIZE / b_h), math.ceil(w * SIZE / b_w))
                 for (h, w), b_h, b_w in zip(sizes, bh, bw)]
    factors = [dct_factor(int(h), int(w), m) for (h, w), m in zip(sizes, min_sizes)]
    decoder = Decoder(3)
    for data, m in zip(encoded, min_sizes):  # warm: the buffer grows to its largest once
        decoder.decode(data)
        decoder.decode(data, min_size=m)
    full, scaled = [], []
    for r in range(rounds):
        for kind in (("full", "scaled") if r % 2 == 0 else ("scaled", "full")):
            start = time.thread_time()
            if kind == "full":
                for data in encoded:
                    decoder.decode(data)
                full.append((time.thread_time() - start) / samples * 1e6)
            else:
                for data, m in zip(encoded, min_sizes):
                    decoder.decode(data, min_size=m)
                scaled.append((time.thread_time() - start) / samples * 1e6)
    full_us, scaled_us = benchlib.median(full), benchlib.median(scaled)
    return {"samples": samples, "rounds": rounds, "full_us_per_image": full_us, "scaled_us_per_image": scaled_us,
            "share_saved": 1 - scaled_us / full_us,
            "median_round_share_saved": benchlib.median(1 - s / f for f, s in zip(full, scaled)),
            "factors": {str(f): factors.count(f) for f in (1, 2, 4, 8)},
            "rounds_full_us": full, "rounds_scaled_us": scaled}


# -- results ---------------------------------------------------------------------------------

def summarize(contenders: list[Contender], cores: int) -> list[dict]:
    rows = []
    for c in contenders:
        rate = benchlib.median(r["images_per_s"] for r in c.rounds)
        pixel_bytes = SIZE * SIZE * 3 * (4 if c.dtype == "float32" else 1)
        rows.append({"name": c.name, "label": c.label, "group": c.group, "kind": c.kind, "dtype": c.dtype,
                     "workers": c.workers, "delivered": c.delivered, "median_images_per_s": rate,
                     "median_mb_per_s": rate * pixel_bytes / 1e6, "images_per_s_per_core": rate / cores,
                     "rounds": c.rounds})
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        reference = by_name.get("tf.data" if row["dtype"] == "float32" else "tf.data-uint8", by_name["tf.data"])
        row["ratio_to_tf_data"] = benchlib.ratio(row["median_images_per_s"], reference["median_images_per_s"])
    return rows


def compare(contenders: list[Contender], what: str, name: str, reference: str | None, target: float | None) -> dict:
    """``name``'s median images/s over ``reference``'s, and the median of the rounds' own ratios."""
    by_name = {c.name: c for c in contenders}
    row = {"what": what, "contender": name, "reference": reference, "target": target, "ratio": None,
           "median_round_ratio": None, "met": None}
    if name in by_name and reference in by_name:
        mine = [r["images_per_s"] for r in by_name[name].rounds]
        theirs = [r["images_per_s"] for r in by_name[reference].rounds]
        row["ratio"] = benchlib.ratio(benchlib.median(mine), benchlib.median(theirs))
        row["median_round_ratio"] = benchlib.median(a / b for a, b in zip(mine, theirs))
        row["met"] = None if target is None else row["ratio"] >= target
    return row


def comparisons(contenders: list[Contender]) -> list[dict]:
    rows = []
    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "-uint8"
        loaders = [c for c in contenders if c.kind == "dataloader" and c.dtype == dtype]
        best = max(loaders, key=lambda c: benchlib.median(r["images_per_s"] for r in c.rounds)).name \
            if loaders else None
        packed = f"ringfeed-packed{suffix}"
        rows += [compare(contenders, f"ringfeed packed vs the in-process limit, {dtype}", packed,
                         f"in-process-limit{suffix}", KERNEL_TARGET),
                 compare(contenders, f"ringfeed packed vs tf.data, {dtype}", packed, f"tf.data{suffix}", TF_TARGET),
                 compare(contenders, f"ringfeed packed vs the best PyTorch DataLoader setup, {dtype}", packed, best,
                         DATALOADER_TARGET),
                 compare(contenders, f"ringfeed folder vs the in-process limit, {dtype}", f"ringfeed-folder{suffix}",
                         f"in-process-limit{suffix}", None)]
    return rows


def per_core(rows: list[dict], cores: int) -> dict:
    """ringfeed's images/s per core next to FFCV's published per-vCPU figure."""
    by_name = {r["name"]: r for r in rows}
    out = {"ffcv": FFCV, "cores": cores}
    for name in ("ringfeed-packed", "ringfeed-packed-uint8", "in-process-limit", "in-process-limit-uint8"):
        if name in by_name:
            rate = by_name[name]["images_per_s_per_core"]
            out[name] = {"images_per_s_per_core": rate, "ratio_to_ffcv_per_vcpu": rate / FFCV["per_vcpu"]}
    return out


def plot(rows: list[dict], skipped: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cores_ax) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"width_ratios": [3, 2]},
                                         layout="constrained")
    ordered = sorted(rows, key=lambda r: r["median_images_per_s"])
    medians = [r["median_images_per_s"] for r in ordered]
    lows = [m - min(x["images_per_s"] for x in r["rounds"]) for m, r in zip(medians, ordered)]
    highs = [max(x["images_per_s"] for x in r["rounds"]) - m for m, r in zip(medians, ordered)]
    palette = {"ringfeed": "tab:orange", "limit": "tab:green", "peer": "tab:blue"}
    colors = [palette[r["group"]] for r in ordered]
    bars.barh([r["label"] for r in ordered], medians, xerr=[lows, highs], color=colors, capsize=3)
    for y, (m, high, r) in enumerate(zip(medians, highs, ordered)):
        bars.text(m + high, y, f"  {r['ratio_to_tf_data']:.2f}x", va="center", fontsize=8)
    bars.set_xlabel("images/s (median; whiskers: min-max over rounds; label: x tf.data of the same dtype)")
    bars.tick_params(axis="y", labelsize=7)
    if skipped:
        bars.set_title("skipped: " + ", ".join(s["name"] for s in skipped), fontsize=8)
    per = sorted(rows, key=lambda r: r["images_per_s_per_core"])
    cores_ax.barh([r["name"] for r in per], [r["images_per_s_per_core"] for r in per],
                  color=[palette[r["group"]] for r in per])
    cores_ax.axvline(FFCV["per_vcpu"], color="gray", linestyle="--",
                     label=f"FFCV, {FFCV['per_vcpu']:.0f} per vCPU (published, 96 vCPUs, no normalize)")
    cores_ax.set_xlabel("images/s per core (median)")
    cores_ax.tick_params(axis="y", labelsize=7)
    cores_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    global BATCH
    p = benchlib.parser(__doc__.split("\n\n")[0], rounds=5, quick_rounds=2)
    p.add_argument("--seconds", type=float, help="timed seconds per contender per round (default 4, 0.1 quick)")
    p.add_argument("--images", type=int, help="JPEGs to generate (default 5000, 200 quick)")
    p.add_argument("--batch-size", type=int, help=f"images per batch (default {BATCH}, 32 quick)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"where the generated JPEGs and their pack are cached (default {DEFAULT_DATA_DIR})")
    args = benchlib.parse(p)
    seconds = args.seconds if args.seconds is not None else (0.1 if args.quick else 4.0)
    count = args.images or (200 if args.quick else 5000)
    BATCH = args.batch_size or (32 if args.quick else BATCH)
    if not 1 <= BATCH <= count:
        p.error(f"--batch-size must be between 1 and the number of images, {count}")
    cores = os.cpu_count() or 1
    # ringfeed's workers and the limit's processes: one per core; one in a quick run, whose
    # numbers mean nothing and whose time goes mostly to starting processes
    workers = 1 if args.quick else cores
    prefetch = max(4, 2 * workers)  # batches in flight per feed: two per worker
    slots = 4 * prefetch
    # Untimed batches per round: more than a feed's prefetch and a DataLoader's 2 per worker,
    # which fill while the loader waits its turn.
    warmup = 1 if args.quick else prefetch + cores + 2
    settle_s = 0.0 if args.quick else 20.0
    data = make_data(args.data_dir, count)
    paths, labels = listing(data["folder"])
    dct = dct_saving(data["pack"], 32 if args.quick else 1024, 3 if args.quick else 9)
    log(f"DCT downscaling saves {dct['share_saved']:.1%} of the decode time "
        f"({dct['full_us_per_image']:.0f} -> {dct['scaled_us_per_image']:.0f} us a JPEG; factors {dct['factors']})")

    result = benchlib.header("images", args, images=count, batch_size=BATCH, size=SIZE, ringfeed_workers=workers,
                             seconds_per_round=seconds,
                             warmup_batches_per_round=warmup, settle_s=settle_s, augment=AUGMENT,
                             rrc_scale=list(RRC_SCALE), rrc_ratio=list(RRC_RATIO), feed_prefetch=prefetch,
                             slots=slots, data={k: v for k, v in data.items() if k not in ("folder", "pack")},
                             data_dir=str(args.data_dir))
    result["versions"].update({name: benchlib._version(*dists) for name, dists in (
        ("pillow", ("pillow",)), ("simplejpeg", ("simplejpeg",)), ("torchvision", ("torchvision",)),
        ("scikit_image", ("scikit-image",)), ("scikit_learn", ("scikit-learn",)))})
    skipped, forking = [], []
    reason = torch_missing()
    vision = reason or torchvision_missing()
    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "-uint8"
        if vision:
            skipped.append({"name": f"torch-torchvision{suffix}", "reason": vision})
        else:
            forking.append(TorchLoader(f"torch-torchvision{suffix}", f"PyTorch DataLoader, torchvision decode_jpeg + "
                                       f"v2, {plural(cores, 'worker')}, {dtype}", dtype,
                                       TorchvisionDataset(paths, labels, dtype), cores))
    for dtype in DTYPES:
        suffix = "" if dtype == "float32" else "-uint8"
        if reason:
            skipped.append({"name": f"torch-pillow{suffix}", "reason": reason})
        else:
            forking.append(TorchLoader(f"torch-pillow{suffix}",
                                       f"PyTorch DataLoader, Pillow, {plural(cores, 'worker')}, {dtype}", dtype,
                                       PillowDataset(paths, labels, dtype), cores))
    for s in skipped:
        log(f"skipping {s['name']}: {s['reason']}")
    with ExitStack() as stack:
        # Forked workers first: no loader should inherit the others' threads.
        for c in forking:
            log(f"starting {c.label}")
            stack.callback(c.stop)
            c.start(warmup)
        limits = [InProcessLimit(data["pack"], dtype, workers) for dtype in DTYPES]
        for c in limits:  # its processes start beside the services
            stack.callback(c.stop)
            c.launch()
        wanted = [(source, where, dtype) for source, where in (("folder", data["folder"]), ("packed", data["pack"]))
                  for dtype in DTYPES]
        endpoints = ringfeed_services(stack, wanted, workers, slots)
        ringfeed = [Ringfeed(endpoint, source, dtype, workers, prefetch)
                    for endpoint, (source, _, dtype) in zip(endpoints, wanted)]
        peers = [tf_data(paths, labels, dtype) for dtype in DTYPES] + [keras_reference(data["folder"])]
        for c in limits + peers + ringfeed:
            log(f"starting {c.label}")
            stack.callback(c.stop)
            c.start(warmup)
        contenders = peers + forking + limits + ringfeed  # report order: peers, limit, ringfeed
        for r in range(args.rounds):
            shift = r % len(contenders)
            for c in contenders[shift:] + contenders[:shift]:
                waited = settle(settle_s)
                with benchlib.OtherLoad() as load:
                    measured = c.measure(seconds, warmup)
                measured.update(other_load=load.share, settled_s=round(waited, 2))
                c.rounds.append(measured)
                log(f"[round {r + 1}/{args.rounds}] {c.name:<26} {measured['images_per_s']:>9,.0f} images/s"
                    f"  (other processes: {load.share:.0%} of the cores; settled {waited:.1f} s)")

    rows = summarize(contenders, cores)
    result.update(contenders=rows, skipped=skipped, comparisons=comparisons(contenders),
                  per_core=per_core(rows, cores), dct=dct)
    machine = result["machine"]
    benchlib.write_json(args.out / "images.json", result)
    plot(rows, skipped, args.out / "images.png",
         f"JPEGs -> RandomResizedCrop {SIZE}, flip (, normalize), batch {BATCH}; {count:,} JPEGs of 256-512 px; "
         f"{machine['cpu']}, {machine['cores']} cores; median of {args.rounds} rounds")
    log(f"wrote {args.out / 'images.png'}")
    print(f"{'contender':<30}{'images/s':>10}{'per core':>10}{'x tf.data':>11}")
    for row in rows:
        print(f"{row['name']:<30}{row['median_images_per_s']:>10,.0f}{row['images_per_s_per_core']:>10,.0f}"
              f"{row['ratio_to_tf_data']:>11.2f}")
    for s in skipped:
        print(f"{s['name']:<30} skipped: {s['reason']}")
    for c in result["comparisons"]:
        shown = "not measured" if c["ratio"] is None else \
            f"{c['ratio']:.2f}x (per round {c['median_round_ratio']:.2f}x)"
        target = "" if c["target"] is None else f", target >= {c['target']:g}x"
        print(f"{c['what']}: {shown}{target}")
    for name, value in result["per_core"].items():
        if isinstance(value, dict) and "images_per_s_per_core" in value:
            print(f"{name}: {value['images_per_s_per_core']:,.0f} images/s per core, "
                  f"{value['ratio_to_ffcv_per_vcpu']:.2f}x FFCV's {FFCV['per_vcpu']:.0f} per vCPU")
    print(f"DCT downscaling: {dct['full_us_per_image']:.0f} -> {dct['scaled_us_per_image']:.0f} us per JPEG, "
          f"{dct['share_saved']:.1%} of the decode time saved (factors {dct['factors']})")


if __name__ == "__main__":
    main()
