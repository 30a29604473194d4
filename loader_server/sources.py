"""Datasets of named fields: load, validate, and share with workers without a copy per process.

A dataset is a set of fields with one entry per sample each (the same number
for all): arrays, or encoded images. A folder holds one ``.npy`` file per
field, named after the file, and is memory-mapped by each worker; an ``.npz``
file's arrays are fields by their names, and they, like in-memory arrays, are
copied once into a shared data segment, which every worker maps. An image
folder (one subfolder per class) or a ``.csv`` list file gives the fields
``image`` (the files, read and decoded when a batch needs them; their paths
travel in the data segment) and ``label``; a packed file (``ringfeed pack``)
gives the fields it was packed with, and each worker maps it. Only the fields
a config uses are opened. An ``.npz`` file's member headers are read first, so
members too large to copy are refused before they are loaded. Workers receive
a small ``SourceRef``, never the arrays themselves.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ringfeed.layout import DTYPE_SIZES, FIELD_NAME
from ringfeed.structure import Structure, StructureError

from . import shm
from .config import Config, ConfigError
from .images.listing import LIST_SUFFIX, is_image_folder, list_folder, read_list
from .images.records import FileRecords, Records, encode_paths
from .packfile import PackedFile, is_pack

IMAGE_FIELDS = ("image", "label")
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
    """How a worker finds the dataset: one .npy path per field, or a shared data segment."""

    paths: tuple[tuple[str, str], ...] = ()  # (field, .npy path)
    segment: str | None = None
    segment_id: shm.FileId | None = None  # the data segment's file, which workers check on attach
    arrays: tuple[tuple[str, ArrayRef], ...] = ()  # (field, where it is in the segment)
    files: tuple[str, ...] = ()  # encoded image fields read from files: paths in arrays FIELD/paths, FIELD/offsets
    pack: str | None = None  # a packed file, whose fields are read from its mapping
    pack_fields: tuple[str, ...] = ()


def field_names(data: str) -> list[str]:
    """The fields ``data`` holds, without loading any."""
    path = Path(data)
    if is_image_folder(path) or path.suffix == LIST_SUFFIX and path.is_file():
        return list(IMAGE_FIELDS)
    if is_pack(path):
        with PackedFile(path) as pack:
            return list(pack.fields)
    if path.is_dir():
        return sorted(p.stem for p in path.glob("*.npy"))
    if path.suffix == ".npz" and path.is_file():
        try:
            with zipfile.ZipFile(path) as archive:
                return [n[:-len(".npy")] if n.endswith(".npy") else n for n in archive.namelist()]
        except (OSError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{data!r} is not a readable .npz file: {exc}") from None
    raise ConfigError(f"data {data!r} does not exist or is none of: a folder of .npy files (one per "
                      "field, e.g. features.npy and labels.npy), an .npz file, an image folder (one "
                      f"subfolder per class), a {LIST_SUFFIX} list file of path,label rows, a packed file")


def with_default_roles(config: Config, available) -> Config:
    """``config`` with unset ``inputs``/``targets`` named: features and labels, or, for a dataset
    without them (image files), image and label."""
    roles = {}
    for role, (usual, image) in (("inputs", ("features", "image")), ("targets", ("labels", "label"))):
        if getattr(config, role) is None:
            roles[role] = image if usual not in available and image in available else usual
    return replace(config, **roles)


def check_structure(structure: Structure, available, where: str) -> None:
    try:
        structure.check_fields(available)
    except StructureError as exc:
        raise ConfigError(f"{where}: {exc} (set inputs, targets and sample_weight to field names)") from None


def load_path(data: str, names) -> dict:
    """Open the fields ``names`` of ``data``: memory-mapped from a folder or a pack, loaded from
    an .npz, listed from image files."""
    path = Path(data)
    _require_fields(data, names)
    if is_image_folder(path) or path.suffix == LIST_SUFFIX:
        images = list_folder(path) if path.is_dir() else read_list(path)
        fields = {"image": FileRecords(*encode_paths(images.paths)), "label": images.labels}
        return {name: fields[name] for name in names}
    if is_pack(path):
        return {name: _packed(PackedFile(path), name) for name in names}
    if path.is_dir():
        return {name: _open_npy(path / f"{name}.npy") for name in names}
    return _load_npz(path, data, names)


def _packed(pack, name: str):
    return pack.records(name) if pack.fields[name]["kind"] == "encoded_image" else pack.array(name)


def _require_fields(data: str, names) -> None:
    available = field_names(data)
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(f"data {data!r} has no field(s) {missing}; it has {available}")


def _open_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a readable .npy array: {exc}") from None
    if not array.flags.c_contiguous:  # kernels read flat rows
        raise ConfigError(f"{path} is stored in Fortran order; expected C order "
                          "(save it with np.save(path, np.ascontiguousarray(array)))")
    return array


def _load_npz(path: Path, data: str, names) -> dict[str, np.ndarray]:
    """Read the members' .npy headers first: a header can claim any shape, and loading it
    would allocate that much before anything else is checked."""
    _check_fits(data, _npz_headers(path, data, names))
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in names}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{data!r} is not a readable .npz file: {exc}") from None


def _npz_headers(path: Path, data: str, names) -> dict[str, tuple[tuple, np.dtype]]:
    """member -> (shape, dtype) of the members ``names``, from their headers alone."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {member: _npy_header(archive, data, member) for member in names}
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


def validate(fields: dict, batch_size: int) -> None:
    """Every field a numeric array, named by an identifier, all of the same length."""
    first = None
    for name, array in fields.items():
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            raise ConfigError(f"field name {name!r} is not an identifier of at most 64 characters "
                              "(letters, digits, '_')")
        if is_records(array):
            pass
        elif not isinstance(array, np.ndarray):
            raise ConfigError(f"field {name!r} must be a numpy array, got {type(array).__name__}")
        elif array.ndim < 1 or array.dtype.str not in DTYPE_SIZES:
            raise ConfigError(f"field {name!r} must be a numeric or bool array with one entry per sample "
                              f"(no objects, strings or records), got dtype {array.dtype} and shape {array.shape}")
        if first is None:
            first = (name, len(array))
        elif len(array) != first[1]:
            raise ConfigError(f"fields differ in length: {name!r} has {len(array)} samples, "
                              f"{first[0]!r} has {first[1]}")
    if first is not None and first[1] < batch_size:
        raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({first[1]} samples)")


def is_records(field) -> bool:
    """Encoded images (files or a pack's records), rather than an array."""
    return isinstance(field, Records)


def validate_for(config: Config, fields: dict) -> None:
    check_structure(config.structure, fields, "the dataset")
    validate(fields, config.batch_size)
    if config.private_data:
        check_private_copies(sum(a.nbytes for a in fields.values() if isinstance(a, np.ndarray)), config.worker_processes)


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


def publish(fields: dict, segment: str) -> SourceRef:
    """Copy every field once into a new shared data segment named ``segment``; a field of image
    files as its paths."""
    files = tuple(name for name, field in fields.items() if isinstance(field, FileRecords))
    fields = dict(fields)
    for name in files:
        fields[f"{name}/paths"], fields[f"{name}/offsets"] = fields.pop(name).arrays()
    arrays, offset = [], 0
    for name, array in fields.items():
        arrays.append((name, ArrayRef(offset, tuple(array.shape), array.dtype.str)))
        offset += _aligned(array.nbytes)
    shm.check_space(offset, "the data segment")
    mm, segment_id = shm.create(segment, max(offset, 1))
    for (name, ref) in arrays:
        view = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=mm, offset=ref.offset)
        view[...] = fields[name]
        del view
    mm.close()
    return SourceRef(segment=segment, segment_id=segment_id, arrays=tuple(arrays), files=files)


def open_ref(ref: SourceRef) -> dict:
    """Map the dataset's fields in a worker; nothing is copied."""
    if ref.pack is not None:
        pack = PackedFile(ref.pack)
        return {name: _packed(pack, name) for name in ref.pack_fields}
    if ref.segment is None:
        return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in ref.paths}
    mm = shm.attach(ref.segment, ref.segment_id, writable=False)
    fields = {name: np.ndarray(a.shape, np.dtype(a.dtype), buffer=mm, offset=a.offset) for name, a in ref.arrays}
    for name in ref.files:
        fields[name] = FileRecords(fields.pop(f"{name}/paths"), fields.pop(f"{name}/offsets"))
    return fields
