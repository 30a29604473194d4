"""Decoding JPEG/PNG bytes and the antialiased crop-resize, on real photographs.

The photos are scikit-learn's two sample images (427x640 RGB, shipped with it: nothing is
downloaded), cropped and encoded with Pillow here. Measured tolerances, stated by the tests:
``crop_resize`` is within 1 level of Pillow's BILINEAR resize on every element (mean 0.01-0.21);
a DCT-downscaled JPEG is within a mean of 1 level of the full decode box-filtered to the same
size and 1.2-3.9 levels of it BILINEAR-resized (libjpeg's scaled inverse DCT is close to a box
filter, sharper than the triangle); decode at 1/2 or 1/4 then ``crop_resize`` is within a mean of
0.2-1.6 levels of full decode then ``crop_resize``.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from ringfeed.server.augment.jit import select
from ringfeed.server.images.decode import DecodeError, Decoder, dct_factor, read_header
from ringfeed.server.images.resample import crop_resize, crop_resize_kernel, scratch_size


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    return [np.ascontiguousarray(image) for image in sklearn_datasets.load_sample_images().images]


def encode(image, fmt: str = "JPEG", **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    image.save(out, fmt, **options)
    return out.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale (h, w), RGB or RGBA (h, w, 3|4)) of uint16 ``values``, written by hand:
    Pillow cannot write 16-bit RGB."""
    height, width = values.shape[:2]
    color_type = 0 if values.ndim == 2 else {3: 2, 4: 6}[values.shape[2]]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def pillow_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def abs_diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))


# headers

@pytest.mark.parametrize("size", [(427, 640), (123, 201), (64, 48), (1, 1)])
def test_read_header_gives_height_and_width(photos, size):
    crop = np.ascontiguousarray(photos[0][:size[0], :size[1]])
    for data in (encode(crop), encode(crop, "PNG"), encode(Image.fromarray(crop).convert("L"), "PNG")):
        assert read_header(data) == size
        assert read_header(memoryview(data)) == size


@pytest.mark.parametrize("data, words", [
    (b"", "empty (0 bytes)"),
    (b"hello world, this is text", "starts with b'hello world"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "bad JPEG header"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00", "bad PNG header"),
])
def test_read_header_refuses_what_is_not_an_image(data, words):
    with pytest.raises(DecodeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_header(data)


# decoding and conversions

def test_jpeg_and_png_decode_like_pillow(photos):
    decoder = Decoder()
    for photo in photos:
        jpeg = encode(photo)
        out = decoder.decode(jpeg)
        assert out.dtype == np.uint8 and out.shape == photo.shape and out.flags.c_contiguous
        assert abs_diff(out, pillow_decode(jpeg)).max() <= 1  # both libjpeg-turbo, ISLOW, fancy upsampling
        np.testing.assert_array_equal(decoder.decode(encode(photo, "PNG")), photo)


def test_same_bytes_same_pixels(photos):
    jpeg, png = encode(photos[1][:200, :300]), encode(photos[1][:200, :300], "PNG")
    for data in (jpeg, png):
        first = Decoder().decode(data).copy()
        np.testing.assert_array_equal(Decoder().decode(data), first)
        scaled = Decoder().decode(data, min_size=(50, 50)).copy()
        np.testing.assert_array_equal(Decoder().decode(data, min_size=(50, 50)), scaled)


@pytest.fixture(scope="module")
def crop(photos) -> np.ndarray:
    return np.ascontiguousarray(photos[1][100:223, 200:401])  # 123 x 201: odd sizes


def gray_of(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def test_grayscale_jpeg_is_replicated_to_rgb(crop):
    data = encode(gray_of(crop))
    out = Decoder(3).decode(data)
    assert out.shape == crop.shape
    assert abs_diff(out, np.repeat(pillow_decode(data)[..., None], 3, axis=2)).max() <= 1
    assert (out == out[..., :1]).all()


def test_cmyk_jpeg_converts_like_pillow(crop):
    data = encode(Image.fromarray(crop).convert("CMYK"))  # Adobe CMYK, inverted inks
    out = Decoder(3).decode(data)
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert abs_diff(out, crop).mean() < 3  # the photo survives the round trip
    half = Decoder(3)
    small = half.decode(data, min_size=(60, 100))
    assert small.shape == (62, 101, 3) and half.factor == 2
    np.testing.assert_array_equal(Decoder(1).decode(data)[..., 0],
                                  np.asarray(Image.open(io.BytesIO(data)).convert("L")))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1"])
def test_png_modes_convert_to_rgb_and_gray(crop, mode):
    image = Image.fromarray(crop).convert(mode)
    data = encode(image, "PNG")
    rgb, gray = Decoder(3).decode(data), Decoder(1).decode(data)
    np.testing.assert_array_equal(rgb, np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(gray[..., 0], np.asarray(image.convert("L")))
    if mode == "RGBA":
        np.testing.assert_array_equal(rgb, crop)  # alpha dropped, not composited
    if mode == "LA":
        np.testing.assert_array_equal(rgb, np.repeat(gray_of(crop)[..., None], 3, axis=2))


def test_palette_png_with_transparency(crop):
    image = Image.fromarray(crop).convert("P")
    data = encode(image, "PNG", transparency=0)
    np.testing.assert_array_equal(Decoder(3).decode(data), np.asarray(image.convert("RGB")))


def test_16bit_png_takes_the_high_byte(crop):
    gray = gray_of(crop)
    low_bits = np.arange(gray.size, dtype=np.uint16).reshape(gray.shape) % 256
    for values in (gray.astype(np.uint16) * 257, gray.astype(np.uint16) * 256 + low_bits):
        for data in (png16(values), encode(Image.fromarray(values), "PNG")):  # by hand, and Pillow's "I;16"
            np.testing.assert_array_equal(Decoder(1).decode(data)[..., 0], gray)  # not clipped at 255
            np.testing.assert_array_equal(Decoder(3).decode(data), np.repeat(gray[..., None], 3, axis=2))
    rgb16 = crop.astype(np.uint16) * 257
    np.testing.assert_array_equal(Decoder(3).decode(png16(rgb16)), crop)
    np.testing.assert_array_equal(Decoder(1).decode(png16(rgb16))[..., 0], gray_of(crop))
    rgba16 = np.concatenate([rgb16, np.full(crop.shape[:2] + (1,), 1000, np.uint16)], axis=2)
    np.testing.assert_array_equal(Decoder(3).decode(png16(rgba16)), crop)


# broken files

def corrupt_entropy_data(jpeg: bytes) -> bytes:
    scan = jpeg.index(b"\xff\xda")  # start of scan; the entropy-coded data follows its header
    data = bytearray(jpeg)
    for k in range(scan + (len(jpeg) - scan) // 2, scan + (len(jpeg) - scan) // 2 + 60, 3):
        data[k] ^= 0xFF
    return bytes(data)


def test_broken_files_raise_decode_error(crop):
    jpeg, png = encode(crop), encode(crop, "PNG")
    cmyk = encode(Image.fromarray(crop).convert("CMYK"))
    broken = {
        "truncated JPEG": jpeg[:len(jpeg) // 2],
        "corrupt JPEG": corrupt_entropy_data(jpeg),
        "JPEG header only": jpeg[:20],
        "truncated CMYK JPEG": cmyk[:len(cmyk) // 2],
        "truncated PNG": png[:len(png) // 2],
        "PNG header only": png[:40],
        "zero bytes": b"",
        "text": b"label,path\ncat,1.jpg\n",
    }
    for name, data in broken.items():
        for decoder in (Decoder(3), Decoder(1)):
            with pytest.raises(DecodeError):
                decoder.decode(data)
            with pytest.raises(DecodeError):
                decoder.decode(data, min_size=(30, 30))
    with pytest.raises(DecodeError, match="not a JPEG or PNG image"):
        Decoder().decode(broken["text"])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


# DCT-domain downscaling

def test_dct_factor_is_the_smallest_size_still_large_enough():
    assert dct_factor(427, 640, None) == 1
    assert dct_factor(427, 640, (214, 320)) == 2  # ceil(427 / 2) = 214
    assert dct_factor(427, 640, (215, 320)) == 1
    assert dct_factor(427, 640, (107, 160)) == 4
    assert dct_factor(427, 640, (54, 80)) == 8
    assert dct_factor(427, 640, (1, 1)) == 8
    assert dct_factor(427, 640, (54, 81)) == 4
    assert dct_factor(427, 640, (1000, 1000)) == 1


def test_dct_downscaled_decode_matches_a_filtered_full_decode(photos):
    decoder = Decoder()
    for photo in photos:
        data = encode(photo[:424])  # whole 8x8 blocks: the scaled image covers exactly the full one
        full = decoder.decode(data).copy()
        for factor in (2, 4, 8):
            size = (424 // factor, 640 // factor)
            small = decoder.decode(data, min_size=size)
            assert small.shape == size + (3,) and decoder.factor == factor
            box = np.asarray(Image.fromarray(full).resize(size[::-1], Image.BOX))
            bilinear = np.asarray(Image.fromarray(full).resize(size[::-1], Image.BILINEAR))
            assert abs_diff(small, box).mean() < 1.2  # measured 0.43-0.96
            assert abs_diff(small, bilinear).mean() < 4.5  # measured 1.2-3.9


def test_scaled_decode_then_crop_resize_matches_full_decode(photos):
    one, zero = np.ones(3, np.float32), np.zeros(3, np.float32)
    decoder = Decoder()
    for photo in photos:
        data = encode(photo)
        full = decoder.decode(data).copy()
        for out, (y0, x0, box_h, box_w) in [(56, (0, 0, 427, 640)), (100, (50.5, 100.25, 300.0, 300.0))]:
            expected = crop_resize(full, y0, x0, box_h, box_w, False, False, one, zero,
                                   np.empty((out, out, 3), np.uint8))
            small = decoder.decode(data, min_size=(int(np.ceil(out * 427 / box_h)), int(np.ceil(out * 640 / box_w))))
            f = decoder.factor
            assert f > 1
            got = crop_resize(small, y0 / f, x0 / f, box_h / f, box_w / f, False, False, one, zero,
                              np.empty((out, out, 3), np.uint8))
            assert abs_diff(got, expected).mean() < 2.5  # measured 0.2-1.6


# the reused buffer

def test_buffer_is_reused_and_each_decode_is_right(photos, crop):
    big_jpeg, small_jpeg, png = encode(photos[0]), encode(crop), encode(crop, "PNG")
    expected = {data: Decoder().decode(data).copy() for data in (big_jpeg, small_jpeg, png)}
    decoder = Decoder()
    first = decoder.decode(small_jpeg)
    np.testing.assert_array_equal(first, expected[small_jpeg])
    capacity = decoder.capacity
    big = decoder.decode(big_jpeg)  # larger: the buffer grows once
    np.testing.assert_array_equal(big, expected[big_jpeg])
    assert decoder.capacity > capacity
    capacity = decoder.capacity
    for data in (small_jpeg, png, big_jpeg, small_jpeg):
        out = decoder.decode(data)
        np.testing.assert_array_equal(out, expected[data])
        assert np.shares_memory(out, big) and decoder.capacity == capacity
    for data, size in ((big_jpeg, (100, 100)), (big_jpeg, None), (small_jpeg, (20, 30))):
        decoder.decode(data, min_size=size)  # warm
    tracemalloc.start()
    try:
        for _ in range(3):
            for data, size in ((big_jpeg, (100, 100)), (big_jpeg, None), (small_jpeg, (20, 30))):
                decoder.decode(data, min_size=size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 < photos[0].nbytes  # no image-sized allocation in steady state


def test_bad_arguments():
    with pytest.raises(ValueError):
        Decoder(4)
    with pytest.raises(ValueError):
        Decoder().decode(b"\xff\xd8\xff", min_size=(0, 10))


# crop_resize

ONE = {1: np.ones(1, np.float32), 3: np.ones(3, np.float32)}
ZERO = {1: np.zeros(1, np.float32), 3: np.zeros(3, np.float32)}

BOXES = {  # (y0, x0, box_h, box_w, out_h, out_w) in a 427 x 640 photo
    "identity": (0, 0, 427, 640, 427, 640),
    "upscale": (10.3, 20.7, 50.2, 60.9, 224, 224),
    "upscale tiny box at the corner": (420.5, 630.25, 6.5, 9.75, 50, 40),
    "mild downscale": (5, 7, 200, 300, 150, 210),
    "strong downscale": (0.5, 1.25, 400.5, 600.25, 64, 48),
    "very strong downscale": (0, 0, 427, 640, 13, 9),
    "mixed": (100.1, 200.2, 7.3, 199.9, 31, 17),
    "integer box": (3, 3, 100, 100, 100, 100),
    "one pixel": (0, 0, 427, 640, 1, 1),
}


def pillow_resize(src, y0, x0, box_h, box_w, out_h, out_w) -> np.ndarray:
    image = Image.fromarray(src if src.shape[2] == 3 else src[..., 0])
    out = image.resize((out_w, out_h), Image.BILINEAR, box=(x0, y0, x0 + box_w, y0 + box_h))
    return np.asarray(out).reshape(out_h, out_w, src.shape[2])


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "gray"])
def source(request, photos) -> np.ndarray:
    return photos[0] if request.param == 3 else np.ascontiguousarray(gray_of(photos[0])[..., None])


@pytest.mark.parametrize("case", list(BOXES))
def test_crop_resize_is_pillow_bilinear_within_one_level(source, case):
    y0, x0, box_h, box_w, out_h, out_w = BOXES[case]
    n_ch = source.shape[2]
    got = crop_resize(source, y0, x0, box_h, box_w, False, False, ONE[n_ch], ZERO[n_ch],
                      np.empty((out_h, out_w, n_ch), np.uint8))
    diff = abs_diff(got, pillow_resize(source, y0, x0, box_h, box_w, out_h, out_w))
    assert diff.max() <= 1 and diff.mean() < 0.3  # measured: max 1, mean 0.01-0.21
    as_float = crop_resize(source, y0, x0, box_h, box_w, False, False, ONE[n_ch], ZERO[n_ch],
                           np.empty((out_h, out_w, n_ch), np.float32))
    assert np.abs(as_float - got).max() <= 0.5 + 1e-4  # uint8 is the float result rounded


def test_crop_resize_random_boxes(photos):
    rng = np.random.default_rng(7)
    src = np.ascontiguousarray(photos[1][:97, :131])
    worst = 0
    for _ in range(40):
        box_h, box_w = rng.uniform(0.5, 97), rng.uniform(0.5, 131)
        y0, x0 = rng.uniform(0, 97 - box_h), rng.uniform(0, 131 - box_w)
        out_h, out_w = rng.integers(1, 80, size=2)
        got = crop_resize(src, y0, x0, box_h, box_w, False, False, ONE[3], ZERO[3],
                          np.empty((out_h, out_w, 3), np.uint8))
        worst = max(worst, abs_diff(got, pillow_resize(src, y0, x0, box_h, box_w, out_h, out_w)).max())
    assert worst <= 1


def test_normalize_is_fused(source):
    n_ch = source.shape[2]
    scale = np.linspace(0.5, 2.0, n_ch).astype(np.float32) / 255
    shift = -np.linspace(0.4, 0.5, n_ch).astype(np.float32)
    args = BOXES["strong downscale"]
    out_shape = args[4:] + (n_ch,)
    plain = crop_resize(source, *args[:4], False, False, ONE[n_ch], ZERO[n_ch], np.empty(out_shape, np.float32))
    normed = crop_resize(source, *args[:4], False, False, scale, shift, np.empty(out_shape, np.float32))
    np.testing.assert_allclose(normed, plain * scale + shift, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_flips_mirror_the_output(source, dtype):
    n_ch = source.shape[2]
    for case in ("upscale", "strong downscale", "mixed"):
        y0, x0, box_h, box_w, out_h, out_w = BOXES[case]

        def run(flip_lr, flip_ud):
            return crop_resize(source, y0, x0, box_h, box_w, flip_lr, flip_ud, ONE[n_ch], ZERO[n_ch],
                               np.empty((out_h, out_w, n_ch), dtype))

        plain = run(False, False)
        np.testing.assert_array_equal(run(True, False), plain[:, ::-1])
        np.testing.assert_array_equal(run(False, True), plain[::-1])
        np.testing.assert_array_equal(run(True, True), plain[::-1, ::-1])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_compiled_equals_plain_python(photos, dtype):
    src = np.ascontiguousarray(photos[0][200:240, 300:350])
    scale, shift = np.asarray([1 / 255, 2 / 255, 0.5 / 255], np.float32), np.asarray([-0.5, 0.1, 0], np.float32)
    if dtype == np.uint8:
        scale, shift = ONE[3], ZERO[3]
    assert select(crop_resize_kernel, False) is not crop_resize_kernel
    for y0, x0, box_h, box_w, out_h, out_w, flips in [(3.3, 5.2, 30.1, 40.7, 17, 23, (False, True)),
                                                       (0, 0, 40, 50, 9, 61, (True, False)),
                                                       (1.5, 2.5, 5.5, 7.25, 12, 11, (True, True))]:
        results = [crop_resize(src, y0, x0, box_h, box_w, *flips, scale, shift, np.empty((out_h, out_w, 3), dtype),
                               compiled=compiled) for compiled in (True, False)]
        if dtype == np.uint8:
            assert abs_diff(*results).max() <= 1
        else:
            np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_caller_scratch_and_refusals(photos):
    src = photos[0]
    need = scratch_size(src.shape[1], 300.5, 64, 48, 3)
    dst = np.empty((64, 48, 3), np.float32)
    with_own = crop_resize(src, 10, 20, 400, 300.5, False, False, ONE[3], ZERO[3], dst.copy(),
                           scratch=np.empty(need, np.float32))
    np.testing.assert_array_equal(with_own, crop_resize(src, 10, 20, 400, 300.5, False, False, ONE[3], ZERO[3], dst))
    refused = [
        dict(scratch=np.empty(need - 1, np.float32)),
        dict(box=(10, 20, 418, 300.5)),  # past the bottom edge
        dict(box=(-1, 20, 400, 300.5)),
        dict(box=(10, 20, 0, 300.5)),
        dict(dst=np.empty((64, 48, 3), np.uint8), scale=np.full(3, 2, np.float32)),  # uint8 takes no normalize
        dict(dst=np.empty((64, 48, 3), np.float64)),
        dict(dst=np.empty((64, 48, 1), np.float32)),
        dict(scale=np.ones(3, np.float64)),
    ]
    for change in refused:
        y0, x0, box_h, box_w = change.get("box", (10, 20, 400, 300.5))
        with pytest.raises(ValueError):
            crop_resize(src, y0, x0, box_h, box_w, False, False, change.get("scale", ONE[3]), ZERO[3],
                        change.get("dst", dst), scratch=change.get("scratch"))
