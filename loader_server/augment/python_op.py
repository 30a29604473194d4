"""``op = "python"``: a plain Python function over each sample, run in the workers.

``fn(sample, rng, **kwargs) -> sample``: ``sample`` is a dict of the sample's
fields as numpy arrays (views of the dataset, which are read-only, or of the
stage before: return new arrays rather than writing into them), ``rng`` a
``numpy.random.Generator`` keyed by (the sample's counter-based key, the op's
position), that is by (seed, epoch, batch index, position in the batch): the
stream stays a pure function of the seed for any worker count, and a batch
recomputed after a worker dies is the same batch. What ``fn`` returns for
dataset sample 0 at start-up fixes each field's output shape and dtype; every
later sample must match them, or it fails naming the field, what was expected
and what came back. Nothing is pickled: each worker imports ``fn`` itself and
writes its results straight into the ring slot.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ringfeed.layout import DTYPE_SIZES

from ..config import ConfigError
from .ops import import_target

PARAMETERS = ("op", "fn", "kwargs")


def is_python(spec: dict) -> bool:
    return spec.get("op") == "python"


class PythonOp:
    def __init__(self, where: str, spec: dict, position: int, fields: dict[str, tuple[tuple, np.dtype]]):
        extra = sorted(set(spec) - set(PARAMETERS))
        if extra:
            raise ConfigError(f"{where}: unknown parameter(s) {extra}; a python op takes fn and kwargs "
                              "(it sees every field, so it takes no field or fields)")
        if "fn" not in spec:
            raise ConfigError(f"{where}: missing parameter 'fn' ('package.module:function')")
        self.where, self.position, self.target = where, position, spec["fn"]
        self.fn = import_target(where, self.target)
        if not callable(self.fn):
            raise ConfigError(f"{where}: fn {self.target!r} is a {type(self.fn).__name__}, not a function")
        self.kwargs = spec.get("kwargs", {})
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ConfigError(f"{where}: kwargs must be a table of keyword arguments, got {self.kwargs!r:.120}")
        self.in_fields = fields
        self.out_fields: dict[str, tuple[tuple, np.dtype]] = {}

    def rng(self, key) -> np.random.Generator:
        return np.random.Generator(np.random.Philox(key=np.array([key, self.position], np.uint64)))

    def probe(self, sample: dict, key) -> dict[str, tuple[tuple, np.dtype]]:
        """Run ``fn`` on dataset sample 0; its outputs fix each field's shape and dtype."""
        try:
            result = self.fn(sample, self.rng(key), **self.kwargs)
        except Exception as exc:
            raise ConfigError(f"{self.where}: fn {self.target!r} failed on sample 0: "
                              f"{type(exc).__name__}: {exc}") from exc
        try:
            arrays = self._fields_of(result)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{exc} (for sample 0)") from None
        for name, array in arrays.items():
            if array.dtype.str not in DTYPE_SIZES:
                raise ConfigError(f"{self.where}: fn {self.target!r} returned field {name!r} of dtype "
                                  f"{array.dtype} for sample 0; expected a numeric or bool dtype")
        self.out_fields = {name: (arrays[name].shape, arrays[name].dtype) for name in self.in_fields}
        return self.out_fields

    def run(self, src: dict, idx, keys, dst: dict, streaming: bool = False) -> None:
        for b in range(len(idx)):
            sample = {name: src[name][idx[b]] for name in self.in_fields}
            arrays = self._fields_of(self.fn(sample, self.rng(keys[b]), **self.kwargs))
            for name, (shape, dtype) in self.out_fields.items():
                array = arrays[name]
                if array.shape != shape or array.dtype != dtype:
                    raise ValueError(f"{self.where}: fn {self.target!r} returned field {name!r} with shape "
                                     f"{array.shape} and dtype {array.dtype}; expected shape {shape} and "
                                     f"dtype {dtype} (what it returned for sample 0)")
                dst[name][b] = array

    def _fields_of(self, result) -> dict[str, np.ndarray]:
        """``result`` as arrays, one per field of the sample, and nothing else."""
        if not isinstance(result, Mapping):
            raise TypeError(f"{self.where}: fn {self.target!r} returned a {type(result).__name__}; "
                            f"expected a dict of the sample's fields {sorted(self.in_fields)}")
        missing = [name for name in self.in_fields if name not in result]
        unknown = [name for name in result if name not in self.in_fields]
        if missing or unknown:
            raise ValueError(f"{self.where}: fn {self.target!r} returned fields {sorted(map(str, result))}; "
                           f"expected exactly the sample's fields {sorted(self.in_fields)}"
                           + (f" (missing {missing})" if missing else "")
                           + (f" (not fields: {unknown})" if unknown else ""))
        return {name: np.asarray(result[name]) for name in self.in_fields}
