"""An encoded-image field through its ops: decode, cut a box, resize, flip and normalize, per sample.

The field's ops are, in order: a size op (``random_resized_crop``, or
``resize`` with ``size``, or ``resize`` with ``shorter_side`` then
``center_crop`` or ``random_crop``), any of ``flip_lr``/``flip_ud``, an
optional ``normalize``; these are fused into one resampling pass per sample
that writes straight into the batch (``resample.crop_resize``). Any other
pixel ops follow, in place on the whole batch. For every sample of a batch the
image headers are read first and the boxes drawn for the batch at once; then
each image is decoded, with libjpeg-turbo's DCT-domain downscaling whenever
the box still covers the output at the reduced size, into one buffer that the
worker reuses.

Output: float32 with ``normalize`` (or a pixel op that needs float math, after
scaling to [0, 1]); otherwise uint8, four times fewer bytes through the ring
and to the device.
"""

from __future__ import annotations

import math

import numpy as np

from ..augment.ops import OPS, FlipLR, FlipUD, Frame, Normalize
from ..augment.pipeline import Pipeline
from ..config import ConfigError
from .decode import Decoder, DecodeError, read_header
from .ops import RandomResizedCrop, Resize, ResizedCrop
from .resample import crop_resize


def _where(position: int, spec: dict, field: str) -> str:
    return f"augment[{position}] ({spec.get('op')} on {field!r})"


class ImageField:
    def __init__(self, entries: list[tuple[int, dict]], field: str, channels: int, compiled: bool):
        self.field, self.compiled = field, compiled
        if not entries:
            raise ConfigError(f"field {field!r} holds encoded images of varying sizes; give it a "
                              "random_resized_crop or resize op (resize with shorter_side then center_crop "
                              "or random_crop) so that its batches have one shape")
        frame = Frame(0, 0, channels, True)
        rest = list(entries)
        self.size_op, frame = self._size_ops(rest, frame)
        self.flips = []
        while rest and rest[0][1].get("op") in ("flip_lr", "flip_ud"):
            position, spec = rest.pop(0)
            kind = FlipLR if spec["op"] == "flip_lr" else FlipUD
            self.flips.append(kind(_where(position, spec, field), _params(spec), frame, position))
        normalize = None
        if rest and rest[0][1].get("op") == "normalize":
            position, spec = rest.pop(0)
            normalize = Normalize(_where(position, spec, field), _params(spec), frame, position)
        self._pixel_ops(rest, frame, normalize)
        self.decoder = Decoder(channels)

    def _size_ops(self, rest: list, frame: Frame):
        position, spec = rest.pop(0)
        where = _where(position, spec, self.field)
        if spec.get("op") == "random_resized_crop":
            op = RandomResizedCrop(where, _params(spec), frame, position)
        elif spec.get("op") == "resize":
            op = Resize(where, _params(spec), frame, position)
        else:
            raise ConfigError(f"{where}: field {self.field!r} holds encoded images of varying sizes; its first "
                              "op must be random_resized_crop or resize, which give it one shape")
        if isinstance(op, Resize) and op.shorter_side is not None:
            if not rest or rest[0][1].get("op") not in ("center_crop", "random_crop"):
                raise ConfigError(f"{where}: resize with shorter_side leaves images of varying sizes; follow "
                                  "it with center_crop or random_crop")
            position, spec = rest.pop(0)
            op = ResizedCrop(_where(position, spec, self.field), _params(spec), op.out_frame(frame), position,
                             op, random=spec["op"] == "random_crop")
        return op, op.out_frame(frame)

    def _pixel_ops(self, rest: list, frame: Frame, normalize: Normalize | None) -> None:
        """The pixel ops after the fused pass, and the fused pass's affine and dtype."""
        for position, spec in rest:
            if spec.get("op") in ("random_resized_crop", "resize", "center_crop", "random_crop", "flip_lr",
                                  "flip_ud"):
                raise ConfigError(f"{_where(position, spec, self.field)}: on an encoded image field, geometry "
                                  "ops come first: a size op, then flips, then normalize and pixel ops")
        shape = (frame.h, frame.w, frame.c)
        float_out = normalize is not None or any(getattr(OPS.get(spec.get("op")), "float_math", False)
                                                 for _, spec in rest)
        self.out_shape, self.out_dtype = shape, np.dtype(np.float32 if float_out else np.uint8)
        self.scale = np.full(frame.c, 1.0 if normalize is None and not float_out else 1 / 255, np.float32)
        self.shift = np.zeros(frame.c, np.float32)
        if normalize is not None:
            scale, shift = normalize.affine()
            self.scale, self.shift = self.scale * scale, shift
        self.after = Pipeline([s for _, s in rest], shape, self.out_dtype, self.compiled, [p for p, _ in rest],
                              self.field, fuse_normalize=False)

    def run(self, records, idx, keys, dst: np.ndarray) -> None:
        encoded = [records.get(int(i)) for i in idx]
        heights, widths = self._sizes(records, idx, encoded)
        y0, x0, bh, bw = self.size_op.boxes(heights, widths, keys)
        flip_lr, flip_ud = np.zeros(len(idx), bool), np.zeros(len(idx), bool)
        for op in self.flips:
            drawn = op.uniform(keys, 0) < op.p
            if isinstance(op, FlipUD):
                flip_ud ^= drawn
            else:
                flip_lr ^= drawn
        oh, ow = self.out_shape[:2]
        for b, data in enumerate(encoded):
            # The smallest DCT-scaled decode in which the box still covers the output.
            min_size = (math.ceil(heights[b] * oh / bh[b]), math.ceil(widths[b] * ow / bw[b]))
            try:
                image = self.decoder.decode(data, min_size=min_size)
            except DecodeError as exc:
                raise DecodeError(f"{records.describe(int(idx[b]))}: {exc}") from None
            # Decoded pixel i covers source pixels [f i, f (i + 1)): the box scales by 1 / f exactly.
            s = 1.0 / self.decoder.factor
            crop_resize(image, y0[b] * s, x0[b] * s, bh[b] * s, bw[b] * s, bool(flip_lr[b]), bool(flip_ud[b]),
                        self.scale, self.shift, dst[b], compiled=self.compiled)
        self.after.run_in_place(dst, keys)

    @staticmethod
    def _sizes(records, idx, encoded: list) -> tuple[np.ndarray, np.ndarray]:
        sizes = np.empty((len(idx), 2), np.int64)
        for b, data in enumerate(encoded):
            try:
                sizes[b] = read_header(data)
            except DecodeError as exc:
                raise DecodeError(f"{records.describe(int(idx[b]))}: {exc}") from None
        return sizes[:, 0], sizes[:, 1]


def _params(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "op"}
