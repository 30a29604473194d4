"""The packed random-access dataset file (``ringfeed pack SRC OUT``, written by ``pack.py``): its
format, and its reader.

Reading a million small image files per epoch is slow; ``pack`` copies a
dataset once into a single file that every worker memory-maps.

Format, version 1 (every integer little-endian; every offset absolute, from the
start of the file)::

    offset  size      what
    0       8         magic b"RINGFEED"
    8       4  u32    format version (1)
    12      8  u64    H: the header's length in bytes (at most 16 MiB)
    20      H         the header: UTF-8 JSON, maybe padded with trailing spaces
    ...               sections, each starting at a multiple of 64, zero bytes between

The header is the schema::

    {"samples": N,
     "classes": ["cat", "dog", ...] or null,     # label k is classes[k] (image folders)
     "fields": {name: field, ...}}

and each field is one of

``{"kind": "array", "dtype": D, "shape": S, "offset": O, "nbytes": B, "crc32": C}``
    N samples of per-sample shape ``S`` (a list) and dtype ``D`` (numpy's
    ``dtype.str``, e.g. ``"<i8"``, ``"|u1"``), dense in C order in bytes
    ``[O, O + B)``, ``B = N * prod(S) * itemsize``; ``C`` is ``zlib.crc32`` of
    those bytes.

``{"kind": "encoded_image", "index_offset": I, "payload_offset": P, "payload_bytes": L}``
    N encoded images (JPEG or PNG), end to end without padding in the payload,
    bytes ``[P, P + L)``. The index at ``I`` is ``uint64 offsets[N + 1]`` (into
    the payload: record i is ``payload[offsets[i]:offsets[i + 1]]``,
    ``offsets[0] == 0``, never decreasing, ``offsets[N] == L``) followed by
    ``uint32 crc32[N]`` (``zlib.crc32`` of each record): ``12 N + 8`` bytes.

An image folder or list file packs to the fields ``image`` (encoded_image, each
file's bytes unchanged unless ``max_side`` or ``reencode_png`` re-encode it) and
``label`` (``<i8`` array, shape ``[]``); a folder of ``.npy`` files or an
``.npz`` packs to one array field per array. ``pack`` writes array fields first,
then each encoded field's payload and its index (the file's last section);
readers rely on the offsets alone.

``PackedFile`` checks the preamble, the header and every section's bounds (and
the index) when it opens a file, an array's checksum the first time it is asked
for, and a record's checksum each time it is read. It maps the file read-only
and reads only what is asked for, so packs larger than memory work. It pickles
as its path (and the file's identity, checked when a worker reopens it).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import operator
import os
import struct
import zlib

import numpy as np

from ringfeed.layout import DTYPE_SIZES, FIELD_NAME

from .images.records import RecordError, Records

MAGIC = b"RINGFEED"
VERSION = 1
PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length: 20 bytes
ALIGN = 64
MAX_HEADER_BYTES = 16 * 2**20
MAX_NDIM = 8
KINDS = ("array", "encoded_image")



class PackError(RecordError):
    """A file that is not a sound ringfeed pack; the message names the file (and record)."""


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def is_pack(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file starting with the pack magic (nothing else is checked)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False



def _reopen(path: str, file_id: tuple) -> "PackedFile":
    packed = PackedFile(path)
    if packed.file_id != file_id:
        packed.close()
        raise PackError(f"{path} changed after it was opened (it was rewritten or replaced); "
                        "restart the service to read the new pack")
    return packed


def _reopen_records(path: str, file_id: tuple, name: str) -> "PackedRecords":
    return _reopen(path, file_id).records(name)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PackedFile:
    """A pack, mapped read-only; its structure checked at open (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                self.size = st.st_size
                self.file_id = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                header_len = self._check_preamble(f.read(PREAMBLE.size))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise PackError(f"cannot open pack {self.path}: {exc.strerror or exc}") from None
        self._view = memoryview(self._mm)
        self._arrays: dict[str, np.ndarray] = {}
        self._records: dict[str, PackedRecords] = {}
        try:
            self._check_schema(self._read_header(header_len), PREAMBLE.size + header_len)
        except BaseException:
            self.close()
            raise

    # -- checks at open

    def _bad(self, message: str) -> PackError:
        return PackError(f"{self.path}: {message}")

    def _check_preamble(self, head: bytes) -> int:
        if not head:
            raise PackError(f"{self.path} is not a ringfeed pack: it is empty (0 bytes)")
        if not (head.startswith(MAGIC) or MAGIC.startswith(head)):
            raise PackError(f"{self.path} is not a ringfeed pack: it starts with {head[:16]!r}, "
                            f"not {MAGIC!r}")
        if len(head) < PREAMBLE.size:
            raise PackError(f"{self.path} is truncated: it is {self.size} bytes, but the preamble "
                            f"ends at byte {PREAMBLE.size}")
        _, version, header_len = PREAMBLE.unpack(head)
        if version != VERSION:
            raise self._bad(f"pack format version {version}; this ringfeed reads version {VERSION} "
                            "(pack the dataset again with this version)")
        if header_len > MAX_HEADER_BYTES:
            raise self._bad(f"header length {header_len} is over the limit of {MAX_HEADER_BYTES} bytes")
        self._check_within("the header", PREAMBLE.size + header_len)
        return header_len

    def _check_within(self, what: str, end: int) -> None:
        if end > self.size:
            raise PackError(f"{self.path} is truncated: it is {self.size} bytes, but {what} ends "
                            f"at byte {end}")

    def _read_header(self, header_len: int) -> dict:
        try:
            schema = json.loads(bytes(self._view[PREAMBLE.size:PREAMBLE.size + header_len]).decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._bad(f"the header is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise self._bad(f"the header is a JSON {type(schema).__name__}, expected an object")
        return schema

    def _check_schema(self, schema: dict, header_end: int) -> None:
        samples, classes, fields = schema.get("samples"), schema.get("classes"), schema.get("fields")
        if not _is_count(samples):
            raise self._bad(f"header: samples must be an integer >= 0, got {samples!r}")
        if classes is not None and not (isinstance(classes, list)
                                        and all(isinstance(c, str) for c in classes)):
            raise self._bad(f"header: classes must be a list of names or null, got {classes!r:.200}")
        if not isinstance(fields, dict) or not fields:
            raise self._bad(f"header: fields must be an object of at least one field, got {fields!r:.200}")
        self.samples, self.classes, self.fields = samples, classes, fields
        for name, spec in fields.items():
            if not FIELD_NAME.fullmatch(name):
                raise self._bad(f"header: field name {name!r:.80} is not an identifier")
            if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
                raise self._bad(f"header: field {name!r} must be an object whose kind is one of "
                                f"{KINDS}, got {spec!r:.200}")
            if spec["kind"] == "array":
                self._check_array(name, spec, header_end)
            else:
                self._check_encoded(name, spec, header_end)

    def _offset(self, name: str, spec: dict, key: str, header_end: int) -> int:
        value = spec.get(key)
        if not _is_count(value) or value % ALIGN or value < header_end:
            raise self._bad(f"header: field {name!r}: {key} must be a multiple of {ALIGN} past the "
                            f"header (byte {header_end}), got {value!r}")
        return value

    def _check_array(self, name: str, spec: dict, header_end: int) -> None:
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if dtype not in DTYPE_SIZES:
            raise self._bad(f"header: field {name!r}: dtype {dtype!r} is not a plain numeric dtype "
                            f"(one of {sorted(DTYPE_SIZES)})")
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(map(_is_count, shape))):
            raise self._bad(f"header: field {name!r}: shape must be a list of at most {MAX_NDIM} "
                            f"integers >= 0, got {shape!r}")
        offset = self._offset(name, spec, "offset", header_end)
        nbytes = self.samples * math.prod(shape) * DTYPE_SIZES[dtype]
        if spec.get("nbytes") != nbytes:
            raise self._bad(f"header: field {name!r}: nbytes is {spec.get('nbytes')!r}, but "
                            f"{self.samples} samples of shape {shape} and dtype {dtype} take {nbytes}")
        crc = spec.get("crc32")
        if not _is_count(crc) or crc >= 2**32:
            raise self._bad(f"header: field {name!r}: crc32 must be an integer in [0, 2**32), got {crc!r}")
        self._check_within(f"field {name!r} (array)", offset + nbytes)

    def _check_encoded(self, name: str, spec: dict, header_end: int) -> None:
        n = self.samples
        payload = self._offset(name, spec, "payload_offset", header_end)
        index = self._offset(name, spec, "index_offset", header_end)
        length = spec.get("payload_bytes")
        if not _is_count(length):
            raise self._bad(f"header: field {name!r}: payload_bytes must be an integer >= 0, got {length!r}")
        self._check_within(f"field {name!r} payload", payload + length)
        self._check_within(f"field {name!r} index", index + 12 * n + 8)
        offsets = np.ndarray((n + 1,), "<u8", buffer=self._mm, offset=index)
        crcs = np.ndarray((n,), "<u4", buffer=self._mm, offset=index + 8 * (n + 1))
        where = f"field {name!r}: index"
        if offsets[0] != 0:
            raise self._bad(f"{where}: record 0 starts at payload offset {offsets[0]}, expected 0")
        past = np.flatnonzero(offsets > length)
        if past.size:
            i = int(past[0])
            raise self._bad(f"{where}: offset {i} (record {min(i, n - 1)}) is {offsets[i]}, past the "
                            f"end of the {length}-byte payload")
        back = np.flatnonzero(offsets[1:] < offsets[:-1])
        if back.size:
            i = int(back[0])
            raise self._bad(f"{where}: record {i} ends at payload offset {offsets[i + 1]}, before it "
                            f"starts ({offsets[i]})")
        if offsets[n] != length:
            raise self._bad(f"{where}: the records end at payload offset {offsets[n]}, but the payload "
                            f"is {length} bytes")
        self._records[name] = PackedRecords(self, name, offsets, crcs, payload)

    # -- access

    def _spec(self, name: str, kind: str) -> dict:
        if self._mm is None:
            raise PackError(f"{self.path} is closed")
        spec = self.fields.get(name)
        if spec is None:
            raise PackError(f"{self.path} has no field {name!r}; it has {list(self.fields)}")
        if spec["kind"] != kind:
            raise PackError(f"field {name!r} of {self.path} is {spec['kind']}, not {kind}")
        return spec

    def array(self, name: str) -> np.ndarray:
        """Field ``name``, (samples, *shape), a read-only view of the file; checksum checked once."""
        spec = self._spec(name, "array")
        array = self._arrays.get(name)
        if array is None:
            offset, nbytes = spec["offset"], spec["nbytes"]
            computed = zlib.crc32(self._view[offset:offset + nbytes])
            if computed != spec["crc32"]:
                raise PackError(f"field {name!r} of {self.path}: checksum mismatch (stored "
                                f"0x{spec['crc32']:08x}, computed 0x{computed:08x})")
            array = np.ndarray((self.samples, *spec["shape"]), np.dtype(spec["dtype"]),
                               buffer=self._mm, offset=offset)
            self._arrays[name] = array
        return array

    def records(self, name: str) -> "PackedRecords":
        self._spec(name, "encoded_image")
        return self._records[name]

    def close(self) -> None:
        """Unmap now, unless arrays or records handed out still point into the map: then it is
        unmapped when the last of them goes."""
        if self._mm is None:
            return
        for records in self._records.values():
            records._release()
        self._arrays.clear()
        with contextlib.suppress(BufferError):
            self._view.release()
        mm, self._mm = self._mm, None
        with contextlib.suppress(BufferError):
            mm.close()

    def __enter__(self) -> "PackedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        return _reopen, (self.path, self.file_id)

    def __repr__(self) -> str:
        return f"PackedFile({self.path!r}, samples={self.samples}, fields={list(self.fields)})"


class PackedRecords(Records):
    """The records of one encoded field of a ``PackedFile``."""

    def __init__(self, packed: PackedFile, name: str, offsets: np.ndarray, crcs: np.ndarray, base: int):
        self._packed, self.name = packed, name
        self._offsets, self._crcs, self._base = offsets, crcs, base
        self._view = packed._view
        self._n = len(crcs)

    def __len__(self) -> int:
        return self._n

    def describe(self, i: int) -> str:
        return f"record {i} of {self._packed.path}"

    def get(self, i: int) -> memoryview:
        """Record ``i``'s bytes, a view of the map, after checking its crc32."""
        i = operator.index(i)
        if self._view is None:
            raise PackError(f"{self._packed.path} is closed")
        if not 0 <= i < self._n:
            raise IndexError(f"{self.describe(i)}: out of range (the pack holds {self._n} records)")
        start, end = self._base + int(self._offsets[i]), self._base + int(self._offsets[i + 1])
        record = self._view[start:end]
        stored, computed = int(self._crcs[i]), zlib.crc32(record)
        if computed != stored:
            raise PackError(f"{self.describe(i)}: checksum mismatch (stored 0x{stored:08x}, "
                            f"computed 0x{computed:08x})")
        return record

    def _release(self) -> None:
        self._offsets = self._crcs = self._view = None

    def __reduce__(self):
        return _reopen_records, (self._packed.path, self._packed.file_id, self.name)
