"""One field's numba ops, composed into one pass that writes into a ring slot.

A field takes ops if it is uint8 or float32 and each sample is (H, W, C),
(H, W) (run as one channel) or (D,) (run as a 1x1 image of D channels).

Geometry ops (crops, flips) come first and are fused into a single gather
from the dataset, by sample index, straight into the slot. If the first pixel
op is ``normalize`` it is fused into that gather too, so the common
crop/flip/normalize pipeline touches each output element once. The remaining
pixel ops then run in place on the slot.

Output dtype: float32 if the features are float32 or any op needs float math
(normalize, brightness, contrast, gaussian_noise); uint8 features are then
scaled to [0, 1] first, so ``normalize`` computes (x/255 - mean)/std.
Otherwise the features' own dtype.
"""

from __future__ import annotations

import numpy as np

from ..config import ConfigError
from . import kernels
from .jit import select
from .ops import OPS, Frame, GeoMap, Normalize, Op
from .streaming import rows_aligned


OP_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


def takes_ops(shape: tuple, dtype) -> bool:
    """Whether a field of per-sample ``shape`` and ``dtype`` can go through these kernels."""
    return np.dtype(dtype) in OP_DTYPES and len(shape) in (1, 2, 3)


class Pipeline:
    """The ops of one field. ``positions``: each spec's place in the whole ``[[augment]]`` list,
    which names it in errors and keys its random choices (default: 0, 1, ...)."""

    def __init__(self, specs, feature_shape: tuple, feature_dtype, compiled: bool = True,
                 positions=None, field: str | None = None, fuse_normalize: bool = True):
        self.compiled = compiled
        self.feature_dtype = np.dtype(feature_dtype)
        specs = list(specs)
        positions = range(len(specs)) if positions is None else positions
        if specs and not takes_ops(feature_shape, self.feature_dtype):
            raise ConfigError(f"augment[{positions[0]}] ({specs[0].get('op')}): field {field!r} has per-sample "
                              f"shape {tuple(feature_shape)} and dtype {self.feature_dtype}; ops take "
                              "(H, W, C), (H, W) or (D,) of uint8 or float32")
        image = len(feature_shape) >= 2
        self._channels_axis = len(feature_shape) == 3  # (H, W) fields run as (H, W, 1)
        frame = (Frame(*feature_shape[:2], feature_shape[2] if self._channels_axis else 1, image=True)
                 if image else Frame(1, 1, feature_shape[0], False))
        self.ops: list[Op] = []
        seen_pixel_op = None
        for position, spec in zip(positions, specs):
            spec = dict(spec)
            name = spec.pop("op")
            where = f"augment[{position}] ({name})" if field is None else f"augment[{position}] ({name} on {field!r})"
            if name not in OPS:
                raise ConfigError(f"{where}: unknown op {name!r}; known ops are {sorted([*OPS, 'python'])}")
            op = OPS[name](where, spec, frame, position)
            if op.geometry and seen_pixel_op:
                raise ConfigError(f"{where}: geometry ops must come before pixel ops, "
                                  f"but it follows {seen_pixel_op}")
            seen_pixel_op = seen_pixel_op or (None if op.geometry else where)
            frame = op.out_frame(frame)
            self.ops.append(op)
        self.geometry = [op for op in self.ops if op.geometry]
        pixel = [op for op in self.ops if not op.geometry]
        self.float_out = self.feature_dtype == np.float32 or any(op.float_math for op in pixel)
        scale0 = 1.0 / 255.0 if self.feature_dtype == np.uint8 and self.float_out else 1.0
        self.scale = np.full(frame.c, scale0, np.float32)
        self.shift = np.zeros(frame.c, np.float32)
        if fuse_normalize and pixel and isinstance(pixel[0], Normalize):
            scale, shift = pixel.pop(0).affine()
            self.scale, self.shift = self.scale * scale, shift
        self.pixel = pixel
        self.out_dtype = np.dtype(np.float32) if self.float_out else self.feature_dtype
        if not image:
            self.out_shape = (frame.c,)
        else:
            self.out_shape = (frame.h, frame.w, frame.c) if self._channels_axis else (frame.h, frame.w)
        self._frame = frame

    def run_in_place(self, x: np.ndarray, keys: np.ndarray) -> None:
        """Only the pixel ops, on ``x`` (B, *out_shape) in place: for a field whose gather was done
        elsewhere (an encoded image's resampling pass)."""
        frame = self._frame
        dst = x.reshape(len(x), frame.h, frame.w, frame.c)
        for op in self.pixel:
            op.run(dst, keys, self.compiled)

    def run(self, features: np.ndarray, idx: np.ndarray, keys: np.ndarray, out: np.ndarray,
            streaming: bool = False) -> None:
        """Write the augmented samples ``features[idx]`` into ``out`` (B, *out_shape); both must
        be C-contiguous, as the dataset sources and ring slots are. ``streaming`` is for an ``out``
        that will not be read soon (a ring slot): a float gather that is the last pass writes it
        with streaming stores, if its rows are 32-byte aligned (``streaming.py``) and the kernels
        are compiled (plain Python has no streaming stores)."""
        if not (features.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError("Pipeline.run needs C-contiguous features and out, got "
                             f"{features.flags.c_contiguous} and {out.flags.c_contiguous}")
        batch = len(idx)
        if self._frame.image:  # an (H, W) field runs as (H, W, 1)
            src = features.reshape(*features.shape[:3], -1)
        else:
            src = features.reshape(len(features), 1, 1, -1)
        dst = out.reshape(batch, self._frame.h, self._frame.w, self._frame.c)
        geo = GeoMap.identity(batch)
        for op in self.geometry:
            op.apply(geo, keys)
        if self.float_out:
            convert = kernels.gather_convert
            if streaming and self.compiled and not self.pixel and rows_aligned(dst.reshape(batch, self._frame.h, -1)):
                convert = kernels.gather_convert_streamed
            select(convert, self.compiled)(src, idx, geo.ay, geo.ax, geo.sy, geo.sx, self.scale, self.shift, dst)
        else:
            select(kernels.gather_copy, self.compiled)(src, idx, geo.ay, geo.ax, geo.sy, geo.sx, dst)
        for op in self.pixel:
            op.run(dst, keys, self.compiled)
