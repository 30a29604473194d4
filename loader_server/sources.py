"""Datasets: load, validate, and share with workers without a copy per process.

A folder with ``features.npy`` and ``labels.npy`` is memory-mapped by each
worker. An ``.npz`` file or in-memory arrays are copied once into a shared
data segment, which every worker maps; an ``.npz`` file's member headers are
read first, so members too large to copy are refused before they are loaded.
Workers receive a small ``SourceRef``, never the arrays themselves.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import shm
from .config import Config, ConfigError

FEATURE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
NPZ_MEMBERS = ("features", "labels")
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
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
    segment_id: shm.FileId | None = None  # the data segment's file, which workers check on attach
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
        return _load_npz(path, data)
    raise ConfigError(f"data {data!r} does not exist or is neither a folder with features.npy "
                      "and labels.npy nor an .npz file")


def _load_npz(path: Path, data: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the members' .npy headers first: a header can claim any shape, and loading it
    would allocate that much before anything else is checked."""
    _check_fits(data, _npz_headers(path, data))
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["features"], npz["labels"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{data!r} is not a readable .npz file: {exc}") from None


def _npz_headers(path: Path, data: str) -> dict[str, tuple[tuple, np.dtype]]:
    """member -> (shape, dtype) of the members ``load_path`` uses, from their headers alone."""
    try:
        with zipfile.ZipFile(path) as archive:
            files = [n[:-len(".npy")] if n.endswith(".npy") else n for n in archive.namelist()]
            missing = set(NPZ_MEMBERS) - set(files)
            if missing:
                raise ConfigError(f"{data!r} lacks array(s) {sorted(missing)}; it has {files}")
            return {member: _npy_header(archive, data, member) for member in NPZ_MEMBERS}
    except ConfigError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{data!r} is not a readable .npz file: {exc}") from None


def _npy_header(archive: zipfile.ZipFile, data: str, member: str) -> tuple[tuple, np.dtype]:
    with archive.open(member + ".npy") as fp:
        version = np.lib.format.read_magic(fp)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ConfigError(f"{data!r}: member {member!r} is .npy format version {version}; "
                              f"expected one of {sorted(_NPY_HEADER_READERS)}")
        shape, _, dtype = read_header(fp)
    if dtype.hasobject:
        raise ConfigError(f"{data!r}: member {member!r} has dtype {dtype}, which holds Python objects; "
                          "expected plain numbers (object arrays need pickle, which is never loaded)")
    return shape, dtype


def _check_fits(data: str, members: dict[str, tuple[tuple, np.dtype]]) -> None:
    """The members are loaded, then copied into a shared segment: refuse them when they exceed
    the free shared memory or half the available memory."""
    sizes = {member: math.prod(shape) * dtype.itemsize for member, (shape, dtype) in members.items()}
    total = sum(sizes.values())
    free, available = shm.free_bytes(), _mem_available(f"loading {data!r}")
    limit = min(free, available // 2)
    if total > limit:
        described = ", ".join(f"{member!r} of shape {shape} and dtype {dtype} ({sizes[member]} bytes)"
                              for member, (shape, dtype) in members.items())
        raise ConfigError(f"{data!r} is too large to load: {described} make {total} bytes, over the limit "
                          f"of {limit} bytes (the smaller of {free} bytes free in {shm.SHM_DIR} and half "
                          f"the {available} bytes of MemAvailable)")


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
    available = _mem_available("private_data") if available is None else available
    copies = workers + 1
    if copies * nbytes > available // 2:
        raise ConfigError(f"private_data: {workers} workers' copies and the shared one of "
                          f"{nbytes / 2**20:,.0f} MiB of features take {copies * nbytes / 2**20:,.0f} MiB, "
                          f"more than half the {available / 2**20:,.0f} MiB of available memory; "
                          "turn private_data off")


def _mem_available(purpose: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ConfigError(f"{purpose} needs MemAvailable in /proc/meminfo (Linux) to check that the data fits")


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def publish(features: np.ndarray, labels: np.ndarray, segment: str) -> SourceRef:
    """Copy both arrays once into a new shared data segment named ``segment``."""
    feats_bytes = _aligned(features.nbytes)
    total = feats_bytes + _aligned(labels.nbytes)
    shm.check_space(total, "the data segment")
    mm, segment_id = shm.create(segment, max(total, 1))
    ref = SourceRef(segment=segment, segment_id=segment_id,
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
    mm = shm.attach(ref.segment, ref.segment_id, writable=False)
    return tuple(np.ndarray(a.shape, np.dtype(a.dtype), buffer=mm, offset=a.offset)
                 for a in (ref.features, ref.labels))
