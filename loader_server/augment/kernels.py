"""Numba kernels over whole batches, written into the destination in place.

Geometry (crops, padding, flips) reaches every kernel as a per-sample integer
map from output to source coordinates: ``src_y = ay[b] + sy[b] * i`` and
``src_x = ax[b] + sx[b] * j`` with ``sy, sx`` in {+1, -1}. Out-of-range
source pixels are padding (zero before conversion). All random parameters are
drawn before the kernel runs (see ``ops.py``), except per-pixel noise, which
hashes its own counter; so each kernel is a pure function of its inputs.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .jit import kernel
from .rng import uniform_at
from .streaming import VECTOR, store_fence, stream_span, stream_vector


@kernel()
def gather_convert(src, idx, ay, ax, sy, sx, scale, shift, dst):
    """dst[b] = src[idx[b]] through the geometry map, then * scale[c] + shift[c] (float32 out).
    ``src`` and ``dst`` must be C-contiguous. A row read wholly from inside the source is
    converted as one flat run of pixels and channels, with scale and shift tiled along it, so
    numba vectorises it (a per-channel inner loop does not vectorise); a
    flipped row is converted in source order, then its pixels are swapped end for end."""
    n_batch, h, w, n_ch = dst.shape
    height, width = src.shape[1], src.shape[2]
    run = w * n_ch
    tiled_scale, tiled_shift = np.empty(run, np.float32), np.empty(run, np.float32)
    for k in range(run):
        tiled_scale[k], tiled_shift[k] = scale[k % n_ch], shift[k % n_ch]
    src_rows = src.reshape(src.shape[0], height, width * n_ch)
    dst_rows = dst.reshape(n_batch, h, run)
    for b in prange(n_batch):
        s = idx[b]
        flip = sx[b] < 0
        left = ax[b] - (w - 1) if flip else ax[b]  # the leftmost source pixel of each row
        whole_rows = 0 <= left and left + w <= width
        for i in range(h):
            y = ay[b] + sy[b] * i
            if y < 0 or y >= height:
                for j in range(w):
                    for c in range(n_ch):
                        dst[b, i, j, c] = shift[c]
                continue
            if whole_rows:
                source, out = src_rows[s, y, left * n_ch:left * n_ch + run], dst_rows[b, i]
                for k in range(run):
                    out[k] = np.float32(source[k]) * tiled_scale[k] + tiled_shift[k]
                if flip:
                    for j in range(w // 2):
                        for c in range(n_ch):
                            a, z = j * n_ch + c, (w - 1 - j) * n_ch + c
                            out[a], out[z] = out[z], out[a]
                continue
            for j in range(w):
                x = ax[b] + sx[b] * j
                if x < 0 or x >= width:
                    for c in range(n_ch):
                        dst[b, i, j, c] = shift[c]
                else:
                    for c in range(n_ch):
                        dst[b, i, j, c] = np.float32(src[s, y, x, c]) * scale[c] + shift[c]


@kernel()
def gather_convert_streamed(src, idx, ay, ax, sy, sx, scale, shift, dst):
    """``gather_convert`` for a destination nobody reads soon (a ring slot): each row is built
    in a small buffer, then written with streaming stores (``streaming.py``), which do not
    read the destination's lines from memory first. The row is written out here rather than
    shared with ``gather_convert`` through a helper: numba's inlined helpers cost that
    kernel's vectorised loop 19-23% here."""
    n_batch, h, w, n_ch = dst.shape
    height, width = src.shape[1], src.shape[2]
    run = w * n_ch
    tiled_scale, tiled_shift = np.empty(run, np.float32), np.empty(run, np.float32)
    for k in range(run):
        tiled_scale[k], tiled_shift[k] = scale[k % n_ch], shift[k % n_ch]
    src_rows = src.reshape(src.shape[0], height, width * n_ch)
    dst_rows = dst.reshape(n_batch, h, run)
    span = stream_span(dst_rows)
    for b in prange(n_batch):
        s = idx[b]
        flip = sx[b] < 0
        left = ax[b] - (w - 1) if flip else ax[b]
        whole_rows = 0 <= left and left + w <= width
        row = np.empty(run, np.float32)
        for i in range(h):
            y = ay[b] + sy[b] * i
            if whole_rows and 0 <= y < height:
                source = src_rows[s, y, left * n_ch:left * n_ch + run]
                for k in range(run):
                    row[k] = np.float32(source[k]) * tiled_scale[k] + tiled_shift[k]
                if flip:
                    for j in range(w // 2):
                        for c in range(n_ch):
                            a, z = j * n_ch + c, (w - 1 - j) * n_ch + c
                            row[a], row[z] = row[z], row[a]
            else:
                for j in range(w):
                    x = ax[b] + sx[b] * j
                    inside = 0 <= y < height and 0 <= x < width
                    for c in range(n_ch):
                        row[j * n_ch + c] = np.float32(src[s, y, x, c]) * scale[c] + shift[c] if inside else shift[c]
            out = dst_rows[b, i]
            for k in range(0, span, VECTOR):
                stream_vector(out, k, row)
            for k in range(span, run):
                out[k] = row[k]
        store_fence()  # in this thread, before the batch is reported


@kernel()
def gather_copy(src, idx, ay, ax, sy, sx, dst):
    """dst[b] = src[idx[b]] through the geometry map, same dtype, zero padding.
    Rows read left to right from inside the source are copied whole, which numba turns into
    a block copy, faster than the element loop."""
    n_batch, h, w, n_ch = dst.shape
    height, width = src.shape[1], src.shape[2]
    for b in prange(n_batch):
        s = idx[b]
        whole_rows = sx[b] == 1 and 0 <= ax[b] and ax[b] + w <= width
        for i in range(h):
            y = ay[b] + sy[b] * i
            if whole_rows and 0 <= y < height:
                dst[b, i] = src[s, y, ax[b]:ax[b] + w]
                continue
            for j in range(w):
                x = ax[b] + sx[b] * j
                inside = 0 <= y < height and 0 <= x < width
                for c in range(n_ch):
                    dst[b, i, j, c] = src[s, y, x, c] if inside else 0


@kernel()
def channel_affine(x, scale, shift):
    """x = x * scale[c] + shift[c], per channel, in place."""
    n_batch, h, w, n_ch = x.shape
    for b in prange(n_batch):
        for i in range(h):
            for j in range(w):
                for c in range(n_ch):
                    x[b, i, j, c] = x[b, i, j, c] * scale[c] + shift[c]


@kernel()
def add_per_sample(x, delta):
    """x[b] += delta[b] (brightness)."""
    n_batch, h, w, n_ch = x.shape
    for b in prange(n_batch):
        d = delta[b]
        for i in range(h):
            for j in range(w):
                for c in range(n_ch):
                    x[b, i, j, c] += d


@kernel()
def contrast(x, factor):
    """x[b] = (x[b] - mean_c) * factor[b] + mean_c, with mean_c per sample and channel."""
    n_batch, h, w, n_ch = x.shape
    for b in prange(n_batch):
        mean = np.zeros(n_ch, np.float64)
        for i in range(h):
            for j in range(w):
                for c in range(n_ch):
                    mean[c] += x[b, i, j, c]
        f = factor[b]
        for c in range(n_ch):
            mean[c] /= h * w
        for i in range(h):
            for j in range(w):
                for c in range(n_ch):
                    x[b, i, j, c] = np.float32((x[b, i, j, c] - mean[c]) * f + mean[c])


@kernel()
def fill_rect(x, y0, x0, rh, rw, fill):
    """Set the rectangle [y0, y0+rh) x [x0, x0+rw) of each sample to ``fill`` (cutout)."""
    n_batch, h, w, n_ch = x.shape
    for b in prange(n_batch):
        for i in range(max(y0[b], 0), min(y0[b] + rh, h)):
            for j in range(max(x0[b], 0), min(x0[b] + rw, w)):
                for c in range(n_ch):
                    x[b, i, j, c] = fill


@kernel()
def gaussian_noise(x, keys, position, std):
    """x += N(0, std) per element, from the sample's key and the element's position."""
    n_batch, h, w, n_ch = x.shape
    per_sample = h * w * n_ch
    for b in prange(n_batch):
        key = keys[b]
        for i in range(h):
            for j in range(w):
                for c in range(n_ch):
                    counter = position * per_sample * 2 + ((i * w + j) * n_ch + c) * 2
                    u1 = uniform_at(key, counter)
                    u2 = uniform_at(key, counter + 1)
                    z = np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)
                    x[b, i, j, c] += np.float32(z * std)
