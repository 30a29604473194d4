"""``ringfeed pack SRC OUT``: write a dataset into one packed file (format: ``packfile.py``).

Reading a million small image files per epoch is slow; ``pack`` copies a
dataset once into a single file that every worker memory-maps. It streams:
records are written as they are read, to a temporary name that is renamed
only once the file is complete and checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ringfeed.layout import DTYPE_SIZES, FIELD_NAME

from .config import ConfigError
from .images.listing import ImageList, is_image_folder, list_folder, read_list
from .packfile import MAGIC, MAX_HEADER_BYTES, MAX_NDIM, PREAMBLE, VERSION, PackedFile, aligned
from .sources import field_names

JPEG_QUALITY = 90
_CHUNK = 16 * 2**20
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}
_PLACEHOLDER = 2**64 - 1  # as wide as any offset, size or checksum the final header holds

@dataclass
class _Array:
    name: str
    dtype: str
    shape: tuple[int, ...]  # per sample
    nbytes: int
    chunks: Callable[[], Iterator[bytes]]  # the C-order bytes, in pieces


@dataclass
class _Plan:
    samples: int
    classes: list[str] | None
    arrays: list[_Array]
    images: tuple[str, ...] | None  # the ``image`` field's files, or no such field


def pack(src, out, *, max_side: int | None = None, reencode_png: bool = False,
         progress: bool = True) -> dict:
    """Pack ``src`` (an image folder, a ``.csv`` list file, a folder of ``.npy`` files or an
    ``.npz``) into the file ``out``; returns ``{"samples", "bytes", "seconds", "reencoded"}``.

    Written to ``.{name}.tmp-{pid}`` next to ``out``, synced, then renamed over ``out``: on
    any error or interrupt the temporary file is removed and ``out`` is left as it was.
    """
    started = time.monotonic()
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int)
                                 or max_side < 1):
        raise ConfigError(f"max_side must be an integer >= 1 (or None), got {max_side!r}")
    plan = _plan(src)
    out_path = Path(os.path.abspath(out))
    if out_path.is_dir():
        raise ConfigError(f"pack output {str(out_path)!r} is a folder; name the file to write")
    if not out_path.parent.is_dir():
        raise ConfigError(f"pack output folder {str(out_path.parent)!r} does not exist")
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    try:
        f = open(tmp, "xb")
    except FileExistsError:
        raise ConfigError(f"temporary file {str(tmp)!r} already exists; remove it if no pack "
                          "is writing it") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {str(tmp)!r}: {exc.strerror or exc}") from None
    try:
        try:
            with f:
                reencoded = _write(f, plan, max_side, reencode_png, progress)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            PackedFile(tmp).close()  # the structure as a reader sees it
            os.replace(tmp, out_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise ConfigError(f"writing {str(out_path)!r}: {exc.strerror or exc}") from None
    _fsync_folder(out_path.parent)
    return {"samples": plan.samples, "bytes": size, "seconds": time.monotonic() - started,
            "reencoded": reencoded}


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _plan(src) -> _Plan:
    path = Path(src)
    if not path.exists():
        raise ConfigError(f"pack source {str(src)!r} does not exist")
    if is_image_folder(path):
        return _image_plan(list_folder(path))
    if path.is_file() and path.suffix.lower() == ".csv":
        return _image_plan(read_list(path))
    return _array_plan(path)


def _image_plan(listing: ImageList) -> _Plan:
    labels = np.ascontiguousarray(listing.labels, "<i8")
    label = _Array("label", labels.dtype.str, (), labels.nbytes, lambda: iter((labels.tobytes(),)))
    classes = list(listing.classes) if listing.classes is not None else None
    return _Plan(len(listing.paths), classes, [label], tuple(listing.paths))


def _array_plan(path: Path) -> _Plan:
    names = field_names(str(path))  # refuses anything that is neither a folder nor an .npz
    if not names:
        raise ConfigError(f"folder {str(path)!r} holds neither .npy fields nor class subfolders of images")
    arrays, first = [], None
    for name in names:
        fp, where, shape, dtype = _open_npy(path, name)
        fp.close()
        if not FIELD_NAME.fullmatch(name):
            raise ConfigError(f"{where}: field name {name!r} is not an identifier of at most 64 "
                              "characters (letters, digits, '_')")
        if len(shape) < 1 or len(shape) > MAX_NDIM + 1 or dtype.str not in DTYPE_SIZES:
            raise ConfigError(f"{where}: a field must be a numeric or bool array with one entry per "
                              f"sample (at most {MAX_NDIM} dimensions each; no objects, strings or "
                              f"records), got dtype {dtype} and shape {shape}")
        if first is None:
            first = (name, shape[0])
        elif shape[0] != first[1]:
            raise ConfigError(f"{str(path)!r}: fields differ in length: {name!r} has {shape[0]} samples, "
                              f"{first[0]!r} has {first[1]}")
        nbytes = math.prod(shape) * dtype.itemsize
        arrays.append(_Array(name, dtype.str, tuple(shape[1:]), nbytes,
                             lambda name=name, nbytes=nbytes: _npy_chunks(path, name, nbytes)))
    if first[1] == 0:
        raise ConfigError(f"{str(path)!r} holds no samples (its fields have length 0)")
    return _Plan(first[1], None, arrays, None)


def _open_npy(path: Path, name: str):
    """(stream at the data, where, shape, dtype) of field ``name`` of a folder or .npz."""
    where = str(path / f"{name}.npy") if path.is_dir() else f"{str(path)!r} member {name + '.npy'!r}"
    fp = None
    try:
        if path.is_dir():
            fp = open(path / f"{name}.npy", "rb")
        else:
            with zipfile.ZipFile(path) as archive:  # the member keeps the file open
                fp = archive.open(name + ".npy")
        version = np.lib.format.read_magic(fp)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ConfigError(f"{where} is .npy format version {version}; expected one of "
                              f"{sorted(_NPY_HEADER_READERS)}")
        shape, fortran, dtype = read_header(fp)
    except ConfigError:
        if fp is not None:
            fp.close()
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        if fp is not None:
            fp.close()
        raise ConfigError(f"{where} is not a readable .npy array: {exc}") from None
    if fortran and len(shape) > 1:
        fp.close()
        raise ConfigError(f"{where} is stored in Fortran order; expected C order "
                          "(save it with np.save(path, np.ascontiguousarray(array)))")
    return fp, where, shape, dtype


def _npy_chunks(path: Path, name: str, nbytes: int) -> Iterator[bytes]:
    fp, where, _, _ = _open_npy(path, name)
    with fp:
        left = nbytes
        while left:
            try:
                chunk = fp.read(min(left, _CHUNK))
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise ConfigError(f"{where}: cannot read its data: {exc}") from None
            if not chunk:
                raise ConfigError(f"{where} is truncated: its data ends after {nbytes - left} of "
                                  f"the {nbytes} bytes its header announces")
            left -= len(chunk)
            yield chunk


def _header(plan: _Plan, placed: dict) -> bytes:
    fields = {}
    if plan.images is not None:
        fields["image"] = {"kind": "encoded_image", **placed.get("image", dict.fromkeys(
            ("index_offset", "payload_offset", "payload_bytes"), _PLACEHOLDER))}
    for a in plan.arrays:
        where = placed.get(a.name, {"offset": _PLACEHOLDER, "crc32": _PLACEHOLDER})
        fields[a.name] = {"kind": "array", "dtype": a.dtype, "shape": list(a.shape),
                          "offset": where["offset"], "nbytes": a.nbytes, "crc32": where["crc32"]}
    schema = {"samples": plan.samples, "classes": plan.classes, "fields": fields}
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode()


def _pad_to(f, offset: int) -> None:
    gap = offset - f.tell()
    assert gap >= 0, (gap, offset)
    f.write(bytes(gap))


def _write(f, plan: _Plan, max_side, reencode_png, progress) -> int:
    """Preamble, a placeholder header as long as the final one can be, the sections; then the
    final header over the placeholder, padded with spaces. Returns the re-encoded count."""
    header_len = len(_header(plan, {}))
    if header_len > MAX_HEADER_BYTES:
        raise ConfigError(f"the pack's header would be {header_len} bytes, over {MAX_HEADER_BYTES} "
                          "(too many class names?)")
    f.write(PREAMBLE.pack(MAGIC, VERSION, header_len))
    _pad_to(f, aligned(PREAMBLE.size + header_len))
    placed, reencoded = {}, 0
    total = sum(a.nbytes for a in plan.arrays) if plan.images is None else plan.samples
    unit = dict(unit="B", unit_scale=True, unit_divisor=1024) if plan.images is None else dict(unit="img")
    with tqdm(total=total, desc="packing", file=sys.stderr, disable=not progress, **unit) as bar:
        for a in plan.arrays:
            _pad_to(f, aligned(f.tell()))
            offset, crc, written = f.tell(), 0, 0
            for chunk in a.chunks():
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
                written += len(chunk)
                if plan.images is None:
                    bar.update(len(chunk))
            assert written == a.nbytes, (a.name, written, a.nbytes)
            placed[a.name] = {"offset": offset, "crc32": crc}
        if plan.images is not None:
            placed["image"], reencoded = _write_images(f, plan.images, max_side, reencode_png, bar)
    final = _header(plan, placed)
    assert len(final) <= header_len
    f.seek(PREAMBLE.size)
    f.write(final.ljust(header_len, b" "))
    f.seek(0, os.SEEK_END)
    return reencoded


def _write_images(f, paths, max_side, reencode_png, bar) -> tuple[dict, int]:
    n = len(paths)
    _pad_to(f, aligned(f.tell()))
    payload_offset = f.tell()
    offsets = np.zeros(n + 1, "<u8")
    crcs = np.zeros(n, "<u4")
    position = reencoded = 0
    with contextlib.closing(_loaded(paths, max_side, reencode_png)) as records:
        for i, (data, changed) in enumerate(records):
            f.write(data)
            crcs[i] = zlib.crc32(data)
            position += len(data)
            offsets[i + 1] = position
            reencoded += changed
            bar.update(1)
    _pad_to(f, aligned(f.tell()))
    index_offset = f.tell()
    f.write(offsets.tobytes())
    f.write(crcs.tobytes())
    return {"index_offset": index_offset, "payload_offset": payload_offset,
            "payload_bytes": position}, reencoded


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return min(16, max(4, cpus))  # reads wait on the disk, re-encoding on a CPU


def _loaded(paths, max_side, reencode_png) -> Iterator[tuple[bytes, bool]]:
    """Each file's record, in order, from a pool of threads with a bounded number in flight."""
    threads = _threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="ringfeed-pack") as pool:
        window = deque()
        try:
            for path in paths:
                window.append(pool.submit(_record, path, max_side, reencode_png))
                if len(window) >= 4 * threads:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def _read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as image:
            data = image.read()
    except OSError as exc:
        raise ConfigError(f"cannot read image file {path!r}: {exc.strerror or exc}") from None
    if not data:
        raise ConfigError(f"image file {path!r} is empty (0 bytes)")
    return data


def _fit(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The size whose longer side is ``max_side``, or None when ``size`` already fits."""
    w, h = size
    if max_side is None or max(w, h) <= max_side:
        return None
    if w >= h:
        return max_side, max(1, round(h * max_side / w))
    return max(1, round(w * max_side / h)), max_side


def _record(path: str, max_side: int | None, reencode_png: bool) -> tuple[bytes, bool]:
    """The bytes to store for ``path`` and whether they were re-encoded."""
    data = _read_image(path)
    png = data.startswith(_PNG_MAGIC)
    if not png and not data.startswith(_JPEG_MAGIC):
        raise ConfigError(f"image file {path!r} is neither a JPEG nor a PNG (it starts with {data[:8]!r})")
    convert = png and reencode_png
    if max_side is None and not convert:
        return data, False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            target = _fit(image.size, max_side)
            if target is None and not convert:
                return data, False
            if target is not None and not png:
                image.draft("RGB", target)  # decode at a reduced scale still >= target
            rgb = image.convert("RGB")
        if target is not None:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS)
        encoded = io.BytesIO()
        rgb.save(encoded, "JPEG", quality=JPEG_QUALITY)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ConfigError(f"cannot decode image file {path!r} to re-encode it: "
                          f"{type(exc).__name__}: {exc}") from None
    return encoded.getvalue(), True


