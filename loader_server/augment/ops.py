"""The augmentation ops: parameter validation and per-sample random choices.

Each op is built from its ``[[augment]]`` table and the frame it receives,
refuses bad parameters with a ``ConfigError`` naming them, and draws its
random choices from the counter-based RNG (each choice has a draw number,
unique per op and choice). Geometry ops only edit the per-sample coordinate map (``GeoMap``);
the pipeline applies the map in one fused gather. Pixel ops run a kernel on
the slot's array in place.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
from numba.core.registry import CPUDispatcher

from ..config import ConfigError
from . import kernels
from .jit import select
from .rng import uniform

DRAWS_PER_OP = 8


@dataclass
class Frame:
    """What an op receives: spatial size and channels; ``image`` is False for (N, D) data."""

    h: int
    w: int
    c: int
    image: bool


@dataclass
class GeoMap:
    """Per-sample map from output (i, j) to source (ay + sy*i, ax + sx*j)."""

    ay: np.ndarray
    ax: np.ndarray
    sy: np.ndarray
    sx: np.ndarray

    @classmethod
    def identity(cls, batch: int) -> "GeoMap":
        zeros, ones = np.zeros(batch, np.int64), np.ones(batch, np.int64)
        return cls(zeros, zeros.copy(), ones, ones.copy())


class Op:
    geometry = False
    float_math = False  # needs float32 pixels

    def __init__(self, where: str, params: dict, frame: Frame, position: int):
        self.where, self.position = where, position
        self._params = dict(params)
        self.setup(frame)
        extra = sorted(self._params)
        if extra:
            raise ConfigError(f"{where}: unknown parameter(s) {extra}")

    def setup(self, frame: Frame) -> None:
        """Read parameters with ``self.param`` and check them against ``frame``."""

    def out_frame(self, frame: Frame) -> Frame:
        return frame

    def param(self, name, default=None, *, kind="number", minimum=None, length=None):
        if name not in self._params:
            if default is None:
                raise ConfigError(f"{self.where}: missing parameter {name!r}")
            return default
        value = self._params.pop(name)
        return _check_value(self.where, name, value, kind, minimum, length)

    def uniform(self, keys: np.ndarray, k: int) -> np.ndarray:
        return uniform(keys, self.position * DRAWS_PER_OP + k)


def _check_value(where, name, value, kind, minimum, length):
    def bad(expected):
        return ConfigError(f"{where}: {name} must be {expected}, got {value!r}")

    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    items = value if isinstance(value, list) else [value]
    if length is not None and isinstance(value, list) and len(value) not in length:
        raise bad(f"a number or a list of {' or '.join(map(str, length))} numbers")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise bad("numeric")
        if kind == "int" and not isinstance(item, int):
            raise bad("an integer or a list of integers")
        if minimum is not None and item < minimum:
            raise bad(f">= {minimum}")
    return value


def _size(op: Op) -> tuple[int, int]:
    size = op.param("size", kind="int", minimum=1, length=(2,))
    return (size[0], size[1]) if isinstance(size, list) else (size, size)


def _require_image(op: Op, frame: Frame) -> None:
    if not frame.image:
        raise ConfigError(f"{op.where}: needs image features shaped (N, H, W, C); "
                          f"these are (N, {frame.c})")


def _per_channel(op: Op, name: str, frame: Frame, minimum=None) -> np.ndarray:
    value = op.param(name, minimum=minimum, length=(1, frame.c))
    arr = np.asarray(value, np.float64).reshape(-1)
    if arr.size not in (1, frame.c):
        raise ConfigError(f"{op.where}: {name} needs 1 or {frame.c} values, got {value!r}")
    return np.broadcast_to(arr, (frame.c,)).copy()


class RandomCrop(Op):
    geometry = True

    def setup(self, frame):
        _require_image(self, frame)
        self.size = _size(self)
        self.padding = self.param("padding", 0, kind="int", minimum=0)
        ch, cw = self.size
        if ch > frame.h + 2 * self.padding or cw > frame.w + 2 * self.padding:
            raise ConfigError(f"{self.where}: crop size {list(self.size)} is larger than the image "
                              f"{frame.h}x{frame.w} (padding {self.padding})")
        self.frame = frame

    def out_frame(self, frame):
        return Frame(self.size[0], self.size[1], frame.c, True)

    def apply(self, geo: GeoMap, keys: np.ndarray) -> None:
        p, (ch, cw), f = self.padding, self.size, self.frame
        cy = np.floor(self.uniform(keys, 0) * (f.h + 2 * p - ch + 1)).astype(np.int64) - p
        cx = np.floor(self.uniform(keys, 1) * (f.w + 2 * p - cw + 1)).astype(np.int64) - p
        geo.ay += geo.sy * cy
        geo.ax += geo.sx * cx


class CenterCrop(Op):
    geometry = True

    def setup(self, frame):
        _require_image(self, frame)
        self.size = _size(self)
        if self.size[0] > frame.h or self.size[1] > frame.w:
            raise ConfigError(f"{self.where}: crop size {list(self.size)} is larger than the image "
                              f"{frame.h}x{frame.w}")
        self.offset = ((frame.h - self.size[0]) // 2, (frame.w - self.size[1]) // 2)

    def out_frame(self, frame):
        return Frame(self.size[0], self.size[1], frame.c, True)

    def apply(self, geo, keys):
        geo.ay += geo.sy * self.offset[0]
        geo.ax += geo.sx * self.offset[1]


class FlipLR(Op):
    geometry = True
    axis = "x"

    def setup(self, frame):
        _require_image(self, frame)
        self.p = self.param("p", 0.5, minimum=0)
        if self.p > 1:
            raise ConfigError(f"{self.where}: p must be in [0, 1], got {self.p!r}")
        self.extent = frame.w if self.axis == "x" else frame.h

    def apply(self, geo, keys):
        flip = self.uniform(keys, 0) < self.p
        a, s = (geo.ax, geo.sx) if self.axis == "x" else (geo.ay, geo.sy)
        a += np.where(flip, s * (self.extent - 1), 0)
        s *= np.where(flip, -1, 1)


class FlipUD(FlipLR):
    axis = "y"


class Normalize(Op):
    float_math = True

    def setup(self, frame):
        self.mean = _per_channel(self, "mean", frame)
        self.std = _per_channel(self, "std", frame)
        if np.any(self.std <= 0):
            raise ConfigError(f"{self.where}: std must be > 0, got {self.std.tolist()}")

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        return (1.0 / self.std).astype(np.float32), (-self.mean / self.std).astype(np.float32)

    def run(self, x, keys, compiled):
        select(kernels.channel_affine, compiled)(x, *self.affine())


class Brightness(Op):
    float_math = True

    def setup(self, frame):
        self.max_delta = float(self.param("max_delta", minimum=0))

    def run(self, x, keys, compiled):
        delta = ((self.uniform(keys, 0) * 2 - 1) * self.max_delta).astype(np.float32)
        select(kernels.add_per_sample, compiled)(x, delta)


class Contrast(Op):
    float_math = True

    def setup(self, frame):
        self.lower = float(self.param("lower", minimum=0))
        self.upper = float(self.param("upper", minimum=0))
        if self.lower > self.upper:
            raise ConfigError(f"{self.where}: lower {self.lower} is above upper {self.upper}")

    def run(self, x, keys, compiled):
        factor = self.lower + self.uniform(keys, 0) * (self.upper - self.lower)
        select(kernels.contrast, compiled)(x, factor)


class Cutout(Op):
    def setup(self, frame):
        _require_image(self, frame)
        self.size = _size(self)
        self.fill = float(self.param("fill", 0.0))
        if self.size[0] > frame.h or self.size[1] > frame.w:
            raise ConfigError(f"{self.where}: cutout size {list(self.size)} is larger than the image "
                              f"{frame.h}x{frame.w}")
        self.frame = frame

    def run(self, x, keys, compiled):
        (rh, rw), f = self.size, self.frame
        y0 = np.floor(self.uniform(keys, 0) * f.h).astype(np.int64) - rh // 2
        x0 = np.floor(self.uniform(keys, 1) * f.w).astype(np.int64) - rw // 2
        select(kernels.fill_rect, compiled)(x, y0, x0, rh, rw, x.dtype.type(self.fill))


class GaussianNoise(Op):
    float_math = True

    def setup(self, frame):
        self.std = float(self.param("std", minimum=0))

    def run(self, x, keys, compiled):
        with np.errstate(over="ignore"):
            select(kernels.gaussian_noise, compiled)(x, keys, self.position, self.std)


class Custom(Op):
    """A user kernel ``fn(x, keys, params)`` that edits ``x`` (B, H, W, C) in place."""

    def setup(self, frame):
        target = self.param("fn", kind="str")
        self.fn = load_function(self.where, target)
        self.params = np.asarray(self.param("params", [0.0]), np.float64).reshape(-1)

    def run(self, x, keys, compiled):
        select(self.fn, compiled)(x, keys, self.params)


def import_target(where: str, target) -> object:
    """The object ``target`` ('package.module:name') names; a ``ConfigError`` naming it if none."""
    if not isinstance(target, str):
        raise ConfigError(f"{where}: fn must be a string 'package.module:function', got {target!r}")
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: fn must look like 'package.module:function', got {target!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import fn {target!r}: {exc} (the module must be "
                          "importable by the server and its workers: installed, or on PYTHONPATH)") from None


def load_function(where: str, target: str):
    fn = import_target(where, target)
    if not isinstance(fn, CPUDispatcher):
        raise ConfigError(f"{where}: fn {target!r} must be a numba @njit function, "
                          f"got {type(fn).__name__}")
    return fn


OPS: dict[str, type[Op]] = {
    "random_crop": RandomCrop,
    "center_crop": CenterCrop,
    "flip_lr": FlipLR,
    "flip_ud": FlipUD,
    "normalize": Normalize,
    "brightness": Brightness,
    "contrast": Contrast,
    "cutout": Cutout,
    "gaussian_noise": GaussianNoise,
    "custom": Custom,
}
