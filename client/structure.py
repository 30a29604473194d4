"""Which fields of a batch go where in what the trainer receives: ``(x, y)`` or ``(x, y, w)``.

``inputs`` and ``targets`` each name one field (the element is that array) or
a list of fields (the element is a dict keyed by field name, as Keras expects
for models with several named inputs or outputs); ``sample_weight`` names one
field or none. Every field is used once. The server states the structure in
WELCOME; the client builds every batch, its tf.data spec and its torch
tensors from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .layout import FIELD_NAME, MAX_FIELDS

DEFAULT_INPUTS, DEFAULT_TARGETS = "features", "labels"


class StructureError(ValueError):
    """A structure that names a field badly, twice, or not at all."""


def _names(role: str, value) -> str | tuple[str, ...]:
    if isinstance(value, str):
        names = (value,)
    elif isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_FIELDS:
        names = tuple(value)
    else:
        raise StructureError(f"{role} must be a field name or a list of 1 to {MAX_FIELDS} field names, "
                             f"got {value!r:.120}")
    for name in names:
        if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
            raise StructureError(f"{role}: {name!r:.80} is not a field name (an identifier of at most "
                                 "64 characters: letters, digits, '_')")
    return value if isinstance(value, str) else names


@dataclass(frozen=True)
class Structure:
    inputs: str | tuple[str, ...] = DEFAULT_INPUTS
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    sample_weight: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", _names("inputs", self.inputs))
        object.__setattr__(self, "targets", _names("targets", self.targets))
        if self.sample_weight is not None:
            _names("sample_weight", self.sample_weight)
            if not isinstance(self.sample_weight, str):
                raise StructureError(f"sample_weight must be one field name, got {self.sample_weight!r:.80}")
        seen: dict[str, str] = {}
        for role, name in self._roles():
            if name in seen:
                raise StructureError(f"field {name!r} is listed twice: in {seen[name]} and in {role}")
            seen[name] = role

    def _roles(self):
        for role in ("inputs", "targets", "sample_weight"):
            value = getattr(self, role)
            for name in (() if value is None else (value,) if isinstance(value, str) else value):
                yield role, name

    @property
    def names(self) -> tuple[str, ...]:
        """Every field used, in slot order: inputs, targets, then the sample weight."""
        return tuple(name for _, name in self._roles())

    def check_fields(self, available) -> None:
        """Every name is one of ``available`` (the fields a dataset or a layout has)."""
        for role, name in self._roles():
            if name not in available:
                raise StructureError(f"{role} names field {name!r}, which is not a field; the fields are "
                                     f"{sorted(available)}")

    def assemble(self, arrays: dict[str, Any]) -> tuple:
        """``(x, y)`` or ``(x, y, w)`` from one value per field name."""
        def part(value):
            return arrays[value] if isinstance(value, str) else {name: arrays[name] for name in value}

        element = (part(self.inputs), part(self.targets))
        return element if self.sample_weight is None else (*element, arrays[self.sample_weight])

    def map(self, fn: Callable, element: tuple) -> tuple:
        """``element`` with ``fn`` applied to every array in it, the structure kept."""
        return tuple({k: fn(v) for k, v in part.items()} if isinstance(part, dict) else fn(part)
                     for part in element)

    def to_json(self) -> dict:
        def plain(value):
            return value if value is None or isinstance(value, str) else list(value)

        return {"inputs": plain(self.inputs), "targets": plain(self.targets),
                "sample_weight": plain(self.sample_weight)}

    @classmethod
    def parse(cls, obj) -> "Structure":
        if not isinstance(obj, dict) or set(obj) != {"inputs", "targets", "sample_weight"}:
            raise StructureError(f"structure must be an object with exactly inputs, targets and "
                                 f"sample_weight, got {obj!r:.120}")
        return cls(obj["inputs"], obj["targets"], obj["sample_weight"])
