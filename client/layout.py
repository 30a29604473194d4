"""The ring segment's layout: planned by the server, checked by the client, defined once here.

The segment starts with a header (the token, the proof, the client mailboxes;
see ``loader_server/ring.py``) that ends on a page boundary. Slot ``k`` starts
at ``header + k * slot_bytes``. A slot holds one batch: every field of the
sample (``FieldLayout``), each at its own 64-byte-aligned offset, so
TensorFlow can alias any of them without a copy. WELCOME carries the layout
as JSON (``to_json``); a client takes it only through ``parse``, which checks
every name, offset, shape and dtype before anything is mapped.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass

from .paths import SEGMENT_NAME

# The batch record: what a BATCHES message carries and a mailbox holds, one per batch.
BATCH_RECORD = struct.Struct("<IIqqQ")  # slot, flags, epoch, index, seq
MAILBOX_CONTROL = 128  # a mailbox's control words (client/mailbox.py), before its records

ALIGN = 64
PAGE = mmap.PAGESIZE
TOKEN_BYTES = 16  # the segment starts with its token, which WELCOME names
MAX_SLOTS = 1 << 16
MAX_FIELDS = 64
MAX_SEGMENT_BYTES = 1 << 46
MAX_NDIM = 8
MAX_MAILBOXES = 1024
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TOKEN_HEX = re.compile(r"[0-9a-f]{32}")
# Plain numeric dtypes, spelled as numpy's ``dtype.str``: nothing with objects, fields or strings.
DTYPE_SIZES = {f"{order}{kind}{size}": size
               for kind, sizes in (("b", (1,)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)),
                                   ("f", (2, 4, 8)), ("c", (8, 16)))
               for size in sizes for order in (("|",) if size == 1 else ("<", ">"))}


class LayoutError(ValueError):
    """A layout that breaks one of the rules above; the message names the field."""


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class FieldLayout:
    """One field of every batch in a slot: ``shape`` is the batch's, (batch_size, *sample shape)."""

    name: str
    offset: int  # within the slot
    shape: tuple[int, ...]
    dtype: str  # numpy's ``dtype.str``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True, slots=True)
class RingLayout:
    segment: str  # a name in /dev/shm matching ``paths.SEGMENT_NAME``
    token: bytes  # the TOKEN_BYTES the segment starts with
    header: int
    slots: int
    slot_bytes: int
    fields: tuple[FieldLayout, ...]  # in slot order
    mailboxes: int
    mailbox_offset: int  # of mailbox 0, within the header
    mailbox_capacity: int

    @classmethod
    def plan(cls, segment: str, token: bytes, slots: int, fields: list[tuple[str, tuple, str]],
             header: int, mailboxes: int, mailbox_offset: int) -> "RingLayout":
        """Fields ``(name, batch shape, dtype.str)`` one after another, each 64-byte aligned."""
        placed, offset = [], 0
        for name, shape, dtype in fields:
            field = FieldLayout(name, offset, tuple(int(n) for n in shape), dtype)
            placed.append(field)
            offset = round_up(offset + field.nbytes, ALIGN)
        layout = cls(segment, token, header, slots, round_up(max(offset, 1), PAGE), tuple(placed),
                     mailboxes, mailbox_offset, slots)
        layout.check(batch_size=placed[0].shape[0] if placed else 1)
        return layout

    @property
    def nbytes(self) -> int:
        return self.header + self.slots * self.slot_bytes

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(field.name for field in self.fields)

    def slot_start(self, slot: int) -> int:
        return self.header + slot * self.slot_bytes

    def to_json(self) -> dict:
        return {"segment": self.segment, "token": self.token.hex(), "header": self.header,
                "slots": self.slots, "slot_bytes": self.slot_bytes,
                "fields": [{"name": f.name, "offset": f.offset, "shape": list(f.shape), "dtype": f.dtype}
                           for f in self.fields],
                "mailboxes": self.mailboxes, "mailbox_offset": self.mailbox_offset,
                "mailbox_capacity": self.mailbox_capacity}

    @classmethod
    def parse(cls, obj, batch_size: int) -> "RingLayout":
        """The layout a WELCOME states, checked field by field (``LayoutError``)."""
        if not isinstance(obj, dict):
            raise LayoutError(f"layout must be a JSON object, got {type(obj).__name__}")
        slots = _int(obj, "slots", 1, MAX_SLOTS)
        capacity = _int(obj, "mailbox_capacity", 0, MAX_SLOTS)
        if capacity != slots:
            raise LayoutError(f"field 'mailbox_capacity' must equal slots ({slots}), got {capacity}")
        layout = cls(segment=_segment(obj), token=_token(obj), header=_aligned(obj, "header", ALIGN),
                     slots=slots, slot_bytes=_aligned(obj, "slot_bytes", ALIGN),
                     fields=_fields(obj, batch_size), mailboxes=_int(obj, "mailboxes", 0, MAX_MAILBOXES),
                     mailbox_offset=_aligned(obj, "mailbox_offset", TOKEN_BYTES), mailbox_capacity=capacity)
        layout.check(batch_size)
        return layout

    def check(self, batch_size: int) -> None:
        """Every field inside the slot and apart from the others, the mailboxes inside the header."""
        spans = []
        for field in self.fields:
            if field.shape[0] != batch_size:
                raise LayoutError(f"field {field.name!r}: shape {list(field.shape)} must start with "
                                  f"batch_size {batch_size}")
            end = field.offset + field.nbytes
            if end > self.slot_bytes:
                raise LayoutError(f"field {field.name!r}: its array [{field.offset}, {end}) does not fit "
                                  f"in slot_bytes {self.slot_bytes}")
            spans.append((field.offset, end, field.name))
        spans = sorted(span for span in spans if span[0] < span[1])
        for (start, end, name), (other_start, other_end, other) in zip(spans, spans[1:]):
            if other_start < end:
                raise LayoutError(f"fields {name!r} [{start}, {end}) and {other!r} [{other_start}, "
                                  f"{other_end}) overlap in the slot")
        mailboxes_end = self.mailbox_offset + self.mailboxes * mailbox_bytes(self.mailbox_capacity)
        if mailboxes_end > self.header:
            raise LayoutError(f"field 'mailbox_offset': {self.mailboxes} mailboxes from byte "
                              f"{self.mailbox_offset} end at byte {mailboxes_end}, beyond the header's "
                              f"{self.header} bytes")
        if self.nbytes > MAX_SEGMENT_BYTES:
            raise LayoutError(f"the ring of {self.slots} slots of {self.slot_bytes} bytes after a "
                              f"{self.header}-byte header exceeds {MAX_SEGMENT_BYTES} bytes")


def _value(obj: dict, key: str, kind: type):
    if key not in obj:
        raise LayoutError(f"missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise LayoutError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int(obj: dict, key: str, low: int, high: int) -> int:
    value = _value(obj, key, int)
    if not low <= value <= high:
        raise LayoutError(f"field {key!r} must be in [{low}, {high}], got {value}")
    return value


def _aligned(obj: dict, key: str, low: int) -> int:
    value = _int(obj, key, low, MAX_SEGMENT_BYTES)
    if value % ALIGN:
        raise LayoutError(f"field {key!r} must be a multiple of {ALIGN}, got {value}")
    return value


def _segment(obj: dict) -> str:
    segment = _value(obj, "segment", str)
    match = SEGMENT_NAME.fullmatch(segment)
    if match is None or match.group(4) != "ring":
        raise LayoutError(f"field 'segment' must be a ring segment name matching {SEGMENT_NAME.pattern} "
                          f"and ending in '-ring', got {segment!r:.80}")
    return segment


def _token(obj: dict) -> bytes:
    token = _value(obj, "token", str)
    if not _TOKEN_HEX.fullmatch(token):
        raise LayoutError(f"field 'token' must be {2 * TOKEN_BYTES} lowercase hex digits, got {token!r:.80}")
    return bytes.fromhex(token)


def _fields(obj: dict, batch_size: int) -> tuple[FieldLayout, ...]:
    items = _value(obj, "fields", list)
    if not 1 <= len(items) <= MAX_FIELDS:
        raise LayoutError(f"field 'fields' must list 1 to {MAX_FIELDS} fields, got {len(items)}")
    fields: list[FieldLayout] = []
    for position, item in enumerate(items):
        where = f"fields[{position}]"
        if not isinstance(item, dict) or set(item) != {"name", "offset", "shape", "dtype"}:
            raise LayoutError(f"{where} must be an object with exactly name, offset, shape and dtype, "
                              f"got {item!r:.120}")
        name = _name(item, where, fields)
        try:
            fields.append(FieldLayout(name, _aligned(item, "offset", 0), _shape(item, batch_size), _dtype(item)))
        except LayoutError as exc:  # say which of the fields it is
            raise LayoutError(f"{where} ({name!r}): {exc}") from None
    return tuple(fields)


def _name(item: dict, where: str, before: list[FieldLayout]) -> str:
    try:
        name = _value(item, "name", str)
    except LayoutError as exc:
        raise LayoutError(f"{where}: {exc}") from None
    if not FIELD_NAME.fullmatch(name):
        raise LayoutError(f"{where}: field 'name' must be an identifier of at most 64 characters "
                          f"(letters, digits, '_'), got {name!r:.80}")
    if any(field.name == name for field in before):
        raise LayoutError(f"{where}: field 'name' {name!r} is given to an earlier field too")
    return name


def _shape(item: dict, batch_size: int) -> tuple[int, ...]:
    shape = _value(item, "shape", list)
    if (not 1 <= len(shape) <= MAX_NDIM
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_SEGMENT_BYTES
                       for n in shape)):
        raise LayoutError(f"field 'shape' must be 1 to {MAX_NDIM} non-negative ints, got {shape!r:.80}")
    if shape[0] != batch_size:
        raise LayoutError(f"field 'shape' must start with batch_size {batch_size}, got {shape!r:.80}")
    return tuple(shape)


def _dtype(item: dict) -> str:
    dtype = _value(item, "dtype", str)
    if dtype not in DTYPE_SIZES:
        raise LayoutError(f"field 'dtype' must be a bool, int, uint, float or complex dtype as numpy "
                          f"spells it ('<f4', '|u1', ...), got {dtype!r:.40}")
    return dtype


def mailbox_bytes(capacity: int) -> int:
    """The bytes of one mailbox of ``capacity`` records."""
    return MAILBOX_CONTROL + capacity * BATCH_RECORD.size
