"""Ops that give encoded images of any size one fixed shape: which box of each image to keep.

Each op draws its random choices from the counter-based RNG like every other
op, but from a range of draw numbers of its own (``IMAGE_DRAWS``): a random-resized
crop may need 40 numbers per sample (torchvision's ten attempts of four),
more than an op's usual eight. Boxes are (y0, x0, height, width) in source
pixels, one per sample, computed for the whole batch from the images' sizes.
"""

from __future__ import annotations

import math

import numpy as np

from ..augment.ops import Frame, Op, _size
from ..augment.rng import uniform
from ..config import ConfigError

IMAGE_DRAWS = 1 << 16  # below batches.REPLACEMENT_DRAW; each op has 64 draws here
RRC_ATTEMPTS = 10  # torchvision's


class BoxOp(Op):
    geometry = True

    def uniform(self, keys: np.ndarray, k: int) -> np.ndarray:
        return uniform(keys, IMAGE_DRAWS + self.position * 64 + k)

    def _pair(self, name: str, default: list[float], low_exclusive: float, high: float | None) -> tuple[float, float]:
        value = self.param(name, default, length=(2,))
        if not isinstance(value, list) or len(value) != 2:
            raise ConfigError(f"{self.where}: {name} must be [low, high], got {value!r}")
        low, top = float(value[0]), float(value[1])
        if not low_exclusive < low <= top or (high is not None and top > high):
            bound = f" and at most {high}" if high is not None else ""
            raise ConfigError(f"{self.where}: {name} must be [low, high] with {low_exclusive} < low <= high"
                              f"{bound}, got {value!r}")
        return low, top


class RandomResizedCrop(BoxOp):
    """torchvision's ``RandomResizedCrop``: a box of a random share ``scale`` of the area and a
    random aspect ``ratio`` (log-uniform), up to ten tries, else the central crop of the
    nearest allowed ratio; then resized to ``size``."""

    def setup(self, frame):
        self.size = _size(self)
        self.scale = self._pair("scale", [0.08, 1.0], 0.0, 1.0)
        self.ratio = self._pair("ratio", [3 / 4, 4 / 3], 0.0, None)

    def out_frame(self, frame):
        return Frame(self.size[0], self.size[1], frame.c, True)

    def boxes(self, heights: np.ndarray, widths: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, ...]:
        h, w = heights.astype(np.float64), widths.astype(np.float64)
        y0, x0, bh, bw = _central_boxes(heights, widths, self.ratio)
        found = np.zeros(len(keys), bool)
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for attempt in range(RRC_ATTEMPTS):
            u = [self.uniform(keys, 4 * attempt + k) for k in range(4)]
            area = h * w * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = np.exp(log_low + u[1] * (log_high - log_low))
            cw = np.rint(np.sqrt(area * aspect)).astype(np.int64)
            ch = np.rint(np.sqrt(area / aspect)).astype(np.int64)
            fits = ~found & (cw > 0) & (cw <= widths) & (ch > 0) & (ch <= heights)
            top = np.floor(u[2] * (heights - ch + 1)).astype(np.int64)
            left = np.floor(u[3] * (widths - cw + 1)).astype(np.int64)
            for array, value in ((y0, top), (x0, left), (bh, ch), (bw, cw)):
                array[fits] = value[fits]
            found |= fits
        return y0, x0, bh, bw


def _central_boxes(heights, widths, ratio) -> tuple[np.ndarray, ...]:
    """torchvision's fallback: the whole image, cut to the nearest ratio in [low, high]."""
    bh, bw = heights.astype(np.int64).copy(), widths.astype(np.int64).copy()
    in_ratio = widths / heights
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    bh[narrow] = np.rint(bw[narrow] / ratio[0]).astype(np.int64)
    bw[wide] = np.rint(bh[wide] * ratio[1]).astype(np.int64)
    return (heights - bh) // 2, (widths - bw) // 2, bh, bw


class Resize(BoxOp):
    """``size``: the whole image to that size. ``shorter_side``: scaled so its shorter side is
    that long, aspect kept; a ``center_crop`` or ``random_crop`` must follow to fix the shape."""

    def setup(self, frame):
        given = sorted({"size", "shorter_side"} & set(self._params))
        if len(given) != 1:
            raise ConfigError(f"{self.where}: give size or shorter_side (exactly one), got {given or 'neither'}")
        if given == ["size"]:
            self.size, self.shorter_side = _size(self), None
        else:
            self.size, self.shorter_side = None, self.param("shorter_side", kind="int", minimum=1)

    def out_frame(self, frame):
        if self.size is None:  # a lower bound: the side may be longer
            return Frame(self.shorter_side, self.shorter_side, frame.c, True)
        return Frame(self.size[0], self.size[1], frame.c, True)

    def boxes(self, heights, widths, keys):
        zeros = np.zeros(len(keys), np.float64)
        return zeros, zeros.copy(), heights.astype(np.float64), widths.astype(np.float64)


class ResizedCrop(BoxOp):
    """``center_crop`` / ``random_crop`` of ``size`` after ``resize(shorter_side=S)``: a box of
    ``size * min(h, w) / S`` source pixels, centred or at a random offset of the resized image."""

    def __init__(self, where, params, frame, position, resize: Resize, random: bool):
        self.resize, self.random = resize, random
        super().__init__(where, params, frame, position)

    def setup(self, frame):
        self.size = _size(self)
        if max(self.size) > self.resize.shorter_side:
            raise ConfigError(f"{self.where}: crop size {list(self.size)} is larger than the shorter side "
                              f"{self.resize.shorter_side} that {self.resize.where} gives")

    def out_frame(self, frame):
        return Frame(self.size[0], self.size[1], frame.c, True)

    def boxes(self, heights, widths, keys):
        k = np.minimum(heights, widths) / self.resize.shorter_side  # source pixels per resized pixel
        bh, bw = self.size[0] * k, self.size[1] * k
        resized_h, resized_w = np.rint(heights / k), np.rint(widths / k)
        if self.random:
            top = np.floor(self.uniform(keys, 0) * (resized_h - self.size[0] + 1))
            left = np.floor(self.uniform(keys, 1) * (resized_w - self.size[1] + 1))
        else:
            top, left = np.rint((resized_h - self.size[0]) / 2), np.rint((resized_w - self.size[1]) / 2)
        return (np.clip(top * k, 0, heights - bh), np.clip(left * k, 0, widths - bw), bh, bw)
