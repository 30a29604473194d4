"""Encoded JPEG and PNG bytes to uint8 pixels, in a worker, into a reused buffer.

``read_header`` gives an image's (height, width) without decoding it. A
``Decoder`` (one per worker: it is not thread safe) decodes to a C-contiguous
uint8 (h, w, channels) array, 1 channel (grayscale) or 3 (RGB), whatever the
file holds: grayscale is replicated to RGB, RGB reduced to luma (ITU-R 601,
as libjpeg and Pillow do), alpha dropped (not composited), palettes expanded,
and 16-bit samples reduced to their high byte (``v >> 8``: a 16-bit PNG of
``v * 257`` decodes to ``v``; Pillow's own ``convert`` of "I;16" clips at 255
instead, so it is not used). Anything that is not a well-formed JPEG or PNG
raises ``DecodeError``; the same bytes always give the same pixels. EXIF
orientation is not applied (as Pillow's ``Image.open`` and torchvision's
``decode_jpeg`` by default).

JPEGs go through simplejpeg (libjpeg-turbo 3.1, bundled in its wheel), with
``strict=True`` so libjpeg's "corrupt data" warnings are errors, straight
into the decoder's buffer: once the buffer has grown to the largest image
seen, decoding a JPEG allocates nothing. With ``min_size`` a JPEG is scaled
down in the DCT domain by 1/2, 1/4 or 1/8, the smallest of these whose size is
still >= ``min_size`` on both sides (``dct_factor``; other n/8 scales that
libjpeg offers are not used: of its reduced inverse DCTs only those for 1/2
and 1/4 have SIMD code, and 1/8 is the DC term alone). CMYK and YCCK JPEGs
(Adobe's, with inverted ink values) go through Pillow, the reference for that
conversion: simplejpeg 1.9 also converts them, within 1 level of Pillow, but
its older releases refuse them; Pillow scales them with the same factor
(``draft``). Pillow treats libjpeg's corrupt-data warnings as harmless, so a
corrupt CMYK JPEG may decode to damaged pixels; a truncated one is an error.
PNGs go through Pillow (only ``formats=("PNG",)``, with
``ImageFile.LOAD_TRUNCATED_IMAGES`` left False), then are copied into the
buffer, so every decode returns a view of the same buffer.

Why simplejpeg and not PyTurboJPEG: both are libjpeg-turbo underneath and
decoded within a few percent of each other, full size and DCT-scaled, when
the decoder was chosen; simplejpeg is a wheel with
libjpeg-turbo inside, no system library to install, and has a ``buffer=``
argument to decode into. DCT scaling saves less than its pixel count
suggests, because at quality 90 the entropy decoding of the whole file stays:
1/2 scale saves about a quarter of the full decode, 1/4 a third, 1/8 nearly
half.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DCT_FACTORS = (8, 4, 2)  # libjpeg-turbo's SIMD-accelerated scales 1/8, 1/4, 1/2
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, Image.DecompressionBombError)


class DecodeError(ValueError):
    """Bytes that are not a decodable JPEG or PNG image; the caller prefixes the file or record name."""


def _kind(data) -> tuple[str, memoryview]:
    view = memoryview(data).cast("B")
    head = bytes(view[:8])
    if head.startswith(JPEG_MAGIC):
        return "jpeg", view
    if head == PNG_MAGIC:
        return "png", view
    if not head:
        raise DecodeError("empty (0 bytes), not a JPEG or PNG image")
    raise DecodeError(f"not a JPEG or PNG image (starts with {bytes(view[:16])!r})")


def _jpeg_header(view: memoryview) -> tuple[int, int, str]:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(view, strict=True)
    except ValueError as exc:
        raise DecodeError(f"bad JPEG header: {exc}") from None
    return height, width, colorspace


def _pillow_open(view: memoryview, fmt: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(view), formats=(fmt,))
    except _PILLOW_ERRORS as exc:
        raise DecodeError(f"bad {fmt} header: {exc}") from None


def read_header(data) -> tuple[int, int]:
    """(height, width) of an encoded JPEG or PNG image (bytes, bytearray or memoryview), not decoded."""
    kind, view = _kind(data)
    if kind == "jpeg":
        return _jpeg_header(view)[:2]
    with _pillow_open(view, "PNG") as image:
        return image.height, image.width


def dct_factor(height: int, width: int, min_size: tuple[int, int] | None) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) a JPEG of this size decodes with for ``min_size``:
    the largest whose decoded size, ``ceil(height / f) x ceil(width / f)``, is still >= ``min_size``
    on both sides (1 without ``min_size``, or when no scale keeps it). Decoded pixel ``i`` then
    covers source pixels ``[f * i, f * (i + 1))``: a box in source coordinates is divided by ``f``."""
    if min_size is None:
        return 1
    min_h, min_w = min_size
    for f in DCT_FACTORS:
        if -(-height // f) >= min_h and -(-width // f) >= min_w:
            return f
    return 1


class Decoder:
    """Decodes JPEG and PNG bytes to uint8 (h, w, channels); one per worker (not thread safe).

    The array ``decode`` returns is a view of the decoder's buffer: valid until the next
    ``decode`` on the same decoder; copy it to keep it. The buffer grows when an image is
    larger than any before (to 1.25x the old size at least) and is never shrunk."""

    def __init__(self, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.channels = channels
        self.factor = 1  # the DCT scale denominator of the last decode (1 for PNG)
        self._buffer = np.empty(0, np.uint8)

    @property
    def capacity(self) -> int:
        """Bytes in the reused buffer."""
        return self._buffer.size

    def _take(self, height: int, width: int) -> np.ndarray:
        need = height * width * self.channels
        if need > self._buffer.size:
            self._buffer = np.empty(max(need, self._buffer.size + self._buffer.size // 4), np.uint8)
        return self._buffer[:need].reshape(height, width, self.channels)

    def decode(self, data, min_size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (h, w, channels), C-contiguous, a view of the buffer (valid until the next decode).
        ``min_size=(min_h, min_w)``: a JPEG may decode smaller, by ``self.factor`` (see
        ``dct_factor``), but not below ``min_size`` (an image already smaller decodes full size);
        a PNG always decodes full size."""
        if min_size is not None and not (len(min_size) == 2 and min(min_size) >= 1):
            raise ValueError(f"min_size must be (min_height, min_width) >= 1, got {min_size!r}")
        kind, view = _kind(data)
        if kind == "png":
            self.factor = 1
            return self._pillow(view, "PNG", None)
        height, width, colorspace = _jpeg_header(view)
        factor = dct_factor(height, width, min_size)
        if colorspace in ("CMYK", "YCCK"):
            return self._pillow(view, "JPEG", factor)
        self.factor = factor
        out_h, out_w = -(-height // factor), -(-width // factor)
        out = self._take(out_h, out_w)
        try:
            image = simplejpeg.decode_jpeg(
                view, colorspace="rgb" if self.channels == 3 else "gray", min_height=out_h if factor > 1 else 0,
                min_width=out_w if factor > 1 else 0, min_factor=factor, buffer=out, strict=True)
        except ValueError as exc:
            raise DecodeError(f"corrupt JPEG: {exc}") from None
        if image.shape != out.shape:  # not expected: libjpeg's scaled sizes are these ceilings
            raise DecodeError(f"JPEG decoded to {image.shape}, expected {out.shape}")
        return image

    def _pillow(self, view: memoryview, fmt: str, factor: int | None) -> np.ndarray:
        with _pillow_open(view, fmt) as image:
            if factor is not None:  # a CMYK/YCCK JPEG; draft picks the largest f with size // f >= asked
                while factor > 1 and min(image.size) < factor:
                    factor //= 2
                if factor > 1:
                    image.draft(image.mode, (image.width // factor, image.height // factor))
                self.factor = factor
            try:
                image.load()
            except _PILLOW_ERRORS as exc:
                raise DecodeError(f"corrupt {fmt}: {exc}") from None
            return self._convert(image)

    def _convert(self, image: Image.Image) -> np.ndarray:
        out = self._take(image.height, image.width)
        mode = image.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale: the high byte
            out[...] = (np.asarray(image) >> 8)[..., None]
            return out
        target = "RGB" if self.channels == 3 else "L"
        if mode != target:
            image = image.convert(target)
        out[...] = np.asarray(image).reshape(out.shape)
        return out

