"""Every field of a sample through the ``[[augment]]`` list, in stages.

Each numba op names its field (``field``; default: the first input) or
fields (``fields``: the op runs on each with the same random choices, so an
image and its mask get the same crop and flip). Consecutive numba ops form one
stage: a ``Pipeline`` per field that has ops, a plain gather (``np.take``)
for a field that has none and cannot take ops, and an ``ImageField`` (decode
and resample) for a field of encoded images, which must be in the first stage. A ``python`` op is a stage of
its own, over whole samples. The first stage reads the dataset by sample id;
each stage writes the next one's input into a scratch batch, and the last
writes straight into the ring slot.
"""

from __future__ import annotations

import numpy as np

from ..config import ConfigError
from .pipeline import Pipeline, takes_ops
from .python_op import PythonOp, is_python

Fields = dict  # field name -> (per-sample shape, dtype); (None, None): encoded images of any size


def _encoded(fields: Fields) -> list[str]:
    return [name for name, (shape, _) in fields.items() if shape is None]


def _targets(where: str, spec: dict, default: str, fields: Fields) -> list[str]:
    """The fields an op runs on; ``spec`` loses its ``field``/``fields`` keys."""
    if "field" in spec and "fields" in spec:
        raise ConfigError(f"{where}: give field or fields, not both")
    names = spec.pop("fields") if "fields" in spec else [spec.pop("field", default)]
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise ConfigError(f"{where}: fields must be a list of distinct field names, got {names!r}")
    for name in names:
        if name not in fields:
            raise ConfigError(f"{where}: {name!r} is not a field; the fields are {sorted(fields)}")
    if len(names) == 1:
        return names
    encoded = _encoded({name: fields[name] for name in names})
    if encoded:
        raise ConfigError(f"{where}: an op on several fields cannot include the encoded image field(s) {encoded}")
    sizes = {name: tuple(fields[name][0][:2]) for name in names}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"{where}: fields {names} must have the same height and width to move together, "
                          f"got {sizes}")
    return names


class NumbaStage:
    """``channels``: what encoded images decode to (1 or 3)."""

    def __init__(self, entries: list[tuple[int, dict]], fields: Fields, default: str, compiled: bool,
                 channels: int = 3):
        per_field: dict[str, list[tuple[int, dict]]] = {name: [] for name in fields}
        for position, spec in entries:
            spec = dict(spec)
            where = f"augment[{position}] ({spec['op']})"
            for name in _targets(where, spec, default, fields):
                per_field[name].append((position, spec))
        self.pipelines: dict = {}  # field -> Pipeline, ImageField, or None (a plain gather)
        self.out_fields: Fields = {}
        for name, (shape, dtype) in fields.items():
            ops = per_field[name]
            if shape is None:
                from ..images.field import ImageField  # here: array datasets never load the decoders

                image = ImageField(ops, name, channels, compiled)
                self.pipelines[name], self.out_fields[name] = image, (image.out_shape, image.out_dtype)
            elif ops or takes_ops(shape, dtype):
                pipe = Pipeline([spec for _, spec in ops], shape, dtype, compiled,
                                [position for position, _ in ops], name)
                self.pipelines[name], self.out_fields[name] = pipe, (pipe.out_shape, pipe.out_dtype)
            else:
                self.pipelines[name], self.out_fields[name] = None, (shape, np.dtype(dtype))

    def run(self, src: dict, idx, keys, dst: dict, streaming: bool = False) -> None:
        for name, pipe in self.pipelines.items():
            if pipe is None:
                np.take(src[name], idx, axis=0, out=dst[name])
            elif not isinstance(pipe, Pipeline):  # an ImageField
                pipe.run(src[name], idx, keys, dst[name])
            else:
                pipe.run(src[name], idx, keys, dst[name], streaming)


class SamplePipeline:
    """``source``: the dataset's fields (used to probe python ops on sample 0, with ``probe_key``)."""

    def __init__(self, specs, source: dict, default: str, compiled: bool, probe_key, channels: int = 3):
        fields: Fields = {name: (array.shape[1:], array.dtype) if isinstance(array, np.ndarray) else (None, None)
                          for name, array in source.items()}
        self.stages: list = []
        self._scratch: dict[int, list[dict]] = {}
        numba_ops: list[tuple[int, dict]] = []
        for position, spec in enumerate(specs):
            if not is_python(spec):
                numba_ops.append((position, spec))
                continue
            if numba_ops or _encoded(fields):  # a python op gets decoded images, of one shape
                fields = self._add(NumbaStage(numba_ops, fields, default, compiled, channels))
                numba_ops = []
            op = PythonOp(f"augment[{position}] (python)", spec, position, fields)
            op.probe(self._sample_zero(source, op, probe_key), probe_key)
            fields = self._add(op)
        if numba_ops or not self.stages:
            fields = self._add(NumbaStage(numba_ops, fields, default, compiled, channels))
        self.out_fields = fields
        self._scratch.clear()  # the probes' buffers were sized for fewer stages

    def _add(self, stage) -> Fields:
        self.stages.append(stage)
        return stage.out_fields

    def _sample_zero(self, source: dict, op: PythonOp, key) -> dict:
        """Sample 0 as ``op`` receives it: through the stages before it."""
        if not self.stages:
            return {name: source[name][0] for name in op.in_fields}
        out = {name: np.empty((1, *shape), dtype) for name, (shape, dtype) in op.in_fields.items()}
        self.run(source, np.zeros(1, np.int64), np.array([key], np.uint64), out)
        return {name: out[name][0] for name in op.in_fields}

    def run(self, source: dict, idx, keys, out: dict, streaming: bool = False) -> None:
        """Write samples ``idx`` of ``source`` through every stage into ``out`` (one array per
        field, (B, *shape)). ``streaming``: ``out`` is a ring slot, which nobody reads soon."""
        scratch = self._buffers(len(idx))
        src, at = source, idx
        for k, stage in enumerate(self.stages):
            last = k == len(self.stages) - 1
            dst = out if last else scratch[k]
            stage.run(src, at, keys, dst, streaming and last)
            if last:
                return
            src, at = dst, np.arange(len(idx))

    def _buffers(self, batch: int) -> list:
        """Scratch batches between stages, one set per batch size (a whole batch, and the single
        samples that ``BatchMaker`` re-runs to find a failing one)."""
        if batch not in self._scratch:
            self._scratch[batch] = [{name: np.empty((batch, *shape), dtype)
                                     for name, (shape, dtype) in stage.out_fields.items()}
                                    for stage in self.stages[:-1]] + [None]
        return self._scratch[batch]
