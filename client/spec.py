"""What a stream serves, as WELCOME states it: ``FeedSpec`` and its ``FieldSpec``s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocol import WelcomeMsg
from .structure import Structure


@dataclass(frozen=True)
class FieldSpec:
    """One field of every sample: its batches are arrays of ``(batch_size, *shape)``."""

    name: str
    shape: tuple[int, ...]  # of one sample
    dtype: np.dtype


@dataclass(frozen=True)
class FeedSpec:
    """What a stream serves, as WELCOME states it: ``fields`` in slot order, put together as
    ``structure`` says into each ``(x, y)`` or ``(x, y, w)``."""

    batch_size: int
    steps_per_epoch: int
    samples: int
    fields: tuple[FieldSpec, ...]
    structure: Structure

    def field(self, name: str) -> FieldSpec:
        for field in self.fields:
            if field.name == name:
                return field
        raise KeyError(f"no field {name!r}; the fields are {[field.name for field in self.fields]}")


def feed_spec(welcome: WelcomeMsg) -> FeedSpec:
    fields = tuple(FieldSpec(field.name, field.shape[1:], np.dtype(field.dtype)) for field in welcome.layout.fields)
    return FeedSpec(welcome.batch_size, welcome.steps_per_epoch, welcome.samples, fields, welcome.structure)
