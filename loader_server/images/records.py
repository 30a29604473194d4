"""Encoded image records: each sample's bytes, read when its batch is made.

``FileRecords`` reads one file per sample; its paths travel to the workers as
two arrays in the shared data segment (the UTF-8 paths end to end, and their
offsets), so a million paths cost two arrays, not a pickled list per worker.
``ringfeed.server.pack.PackedRecords`` reads a record of a packed file instead.
Both name a sample's source in errors with ``describe``.
"""

from __future__ import annotations

import numpy as np


class RecordError(ValueError):
    """A record that cannot be read; the message names the file or record."""


def encode_paths(paths) -> tuple[np.ndarray, np.ndarray]:
    """(blob, offsets): path i is ``blob[offsets[i]:offsets[i + 1]]``, UTF-8."""
    encoded = [p.encode() for p in paths]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


class Records:
    """Encoded images, one record per sample: ``len``, ``get(i)`` (bytes, or a ``RecordError``
    naming the source) and ``describe(i)`` (the source, for error messages)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int):
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError


class FileRecords(Records):
    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self._blob, self._offsets = blob, offsets

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The (blob, offsets) this was made from, to publish."""
        return self._blob, self._offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def path(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode()

    def describe(self, i: int) -> str:
        return f"image file {self.path(i)!r}"

    def get(self, i: int) -> bytes:
        try:
            with open(self.path(i), "rb") as image:
                data = image.read()
        except OSError as exc:
            raise RecordError(f"{self.describe(i)}: {exc.strerror or exc}") from None
        if not data:
            raise RecordError(f"{self.describe(i)} is empty (0 bytes)")
        return data
