"""Datasets: load, validate, and share with workers without a copy per process.

A folder with ``features.npy`` and ``labels.npy`` is memory-mapped by each
worker. An ``.npz`` file or in-memory arrays are copied once into a shared
data segment, which every worker maps. Workers receive a small ``SourceRef``,
never the arrays themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import shm
from .config import Config, ConfigError

FEATURE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
_ALIGN = 64


@dataclass(frozen=True)
class ArrayRef:
    offset: int
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class SourceRef:
    """How a worker finds the dataset: two .npy paths, or a shared data segment."""

    features_path: str | None = None
    labels_path: str | None = None
    segment: str | None = None
    features: ArrayRef | None = None
    labels: ArrayRef | None = None


def load_path(data: str) -> tuple[np.ndarray, np.ndarray]:
    """Open ``data`` (folder of .npy files, or .npz) and return (features, labels)."""
    path = Path(data)
    if path.is_dir():
        arrays = []
        for name in ("features.npy", "labels.npy"):
            try:
                arrays.append(np.load(path / name, mmap_mode="r", allow_pickle=False))
            except FileNotFoundError:
                raise ConfigError(f"data folder {data!r} has no {name}") from None
            except ValueError as exc:
                raise ConfigError(f"{path / name} is not a readable .npy array: {exc}") from None
            if name == "features.npy" and not arrays[-1].flags.c_contiguous:  # kernels read flat rows
                raise ConfigError(f"{path / name} is stored in Fortran order; expected C order "
                                  "(save it with np.save(path, np.ascontiguousarray(array)))")
        return arrays[0], arrays[1]
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = {"features", "labels"} - set(npz.files)
                if missing:
                    raise ConfigError(f"{data!r} lacks array(s) {sorted(missing)}; it has {npz.files}")
                return npz["features"], npz["labels"]
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{data!r} is not a readable .npz file: {exc}") from None
    raise ConfigError(f"data {data!r} does not exist or is neither a folder with features.npy "
                      "and labels.npy nor an .npz file")


def validate(features: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
    if not isinstance(features, np.ndarray) or not isinstance(labels, np.ndarray):
        raise ConfigError(f"features and labels must be numpy arrays, got "
                          f"{type(features).__name__} and {type(labels).__name__}")
    if features.dtype not in FEATURE_DTYPES:
        raise ConfigError(f"features dtype {features.dtype} is not supported; expected uint8 or float32")
    if features.ndim not in (2, 4):
        raise ConfigError(f"features must be shaped (N, H, W, C) or (N, D), got shape {features.shape}")
    if labels.ndim < 1 or not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise ConfigError(f"labels must be a numeric array with one entry per sample, got dtype "
                          f"{labels.dtype} and shape {labels.shape}")
    if len(features) != len(labels):
        raise ConfigError(f"features and labels differ in length: {len(features)} != {len(labels)}")
    if len(features) < batch_size:
        raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({len(features)} samples)")


def validate_for(config: Config, features: np.ndarray, labels: np.ndarray) -> None:
    validate(features, labels, config.batch_size)
    if config.private_data:
        check_private_copies(features.nbytes, config.workers)


def check_private_copies(nbytes: int, workers: int, available: int | None = None) -> None:
    """Refuse ``private_data`` when the workers' copies and the shared one would take over half
    the available memory (the shared one is not made yet when this runs)."""
    available = _mem_available() if available is None else available
    copies = workers + 1
    if copies * nbytes > available // 2:
        raise ConfigError(f"private_data: {workers} workers' copies and the shared one of "
                          f"{nbytes / 2**20:,.0f} MiB of features take {copies * nbytes / 2**20:,.0f} MiB, "
                          f"more than half the {available / 2**20:,.0f} MiB of available memory; "
                          "turn private_data off")


def _mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("private_data needs /proc/meminfo (Linux) to check that the copies fit")


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def publish(features: np.ndarray, labels: np.ndarray, segment: str) -> SourceRef:
    """Copy both arrays once into a new shared data segment named ``segment``."""
    feats_bytes = _aligned(features.nbytes)
    total = feats_bytes + _aligned(labels.nbytes)
    shm.check_space(total, "the data segment")
    mm = shm.create(segment, max(total, 1))
    ref = SourceRef(segment=segment,
                    features=ArrayRef(0, tuple(features.shape), features.dtype.str),
                    labels=ArrayRef(feats_bytes, tuple(labels.shape), labels.dtype.str))
    for arr, aref in ((features, ref.features), (labels, ref.labels)):
        view = np.ndarray(aref.shape, np.dtype(aref.dtype), buffer=mm, offset=aref.offset)
        view[...] = arr
        del view
    mm.close()
    return ref


def open_ref(ref: SourceRef) -> tuple[np.ndarray, np.ndarray]:
    """Map the dataset in a worker; nothing is copied."""
    if ref.segment is None:
        return (np.load(ref.features_path, mmap_mode="r", allow_pickle=False),
                np.load(ref.labels_path, mmap_mode="r", allow_pickle=False))
    mm = shm.attach(ref.segment, writable=False)
    return tuple(np.ndarray(a.shape, np.dtype(a.dtype), buffer=mm, offset=a.offset)
                 for a in (ref.features, ref.labels))
