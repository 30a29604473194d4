"""Kernels compiled and as plain Python, op semantics, and pipeline validation."""

import platform
import re

import numba
import numpy as np
import pytest
from conftest import id_images, rgb_images, spy_kernels

from ringfeed.server.augment import Pipeline, kernels
from ringfeed.server.augment.jit import python_version
from ringfeed.server.augment.rng import sample_keys, uniform
from ringfeed.server.augment.streaming import rows_aligned, stream_span
from ringfeed.server.config import ConfigError
from ringfeed.server.ring import aligned_empty

B = 6


def _geo(batch, seed=0):
    rng = np.random.default_rng(seed)
    sx = np.where(rng.random(batch) < 0.5, -1, 1).astype(np.int64)
    ax = rng.integers(-2, 10, batch).astype(np.int64)
    return rng.integers(-2, 6, batch).astype(np.int64), ax, np.ones(batch, np.int64), sx


def _both(kernel, *args):
    """Run ``kernel`` compiled and as plain Python on copies of ``args``; return both outputs."""
    outs = []
    for fn in (kernel, python_version(kernel)):
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        with np.errstate(over="ignore"):
            fn(*copies)
        outs.append(copies)
    return outs


def _slot_like(shape, offset=0):
    """A float32 array starting ``offset`` bytes past a slot's 64-byte alignment."""
    nbytes = int(np.prod(shape)) * 4
    return aligned_empty((offset + nbytes,), np.uint8)[offset:].view(np.float32).reshape(shape)


KERNEL_CASES = {
    "gather_convert": lambda src, x: (src, np.arange(B)[::-1].copy(), *_geo(B), np.float32([0.5, 2, 1]),
                                      np.float32([0, 1, -1]), np.full((B, 8, 8, 3), -1, np.float32)),
    "gather_copy": lambda src, x: (src, np.arange(B), *_geo(B, 1), np.full((B, 8, 8, 3), 255, np.uint8)),
    "channel_affine": lambda src, x: (x, np.float32([2, 3, 4]), np.float32([1, 0, -1])),
    "add_per_sample": lambda src, x: (x, np.linspace(-1, 1, B).astype(np.float32)),
    "contrast": lambda src, x: (x, np.linspace(0.5, 1.5, B)),
    "fill_rect": lambda src, x: (x, np.arange(B) - 2, np.arange(B), 4, 3, np.float32(7)),
    "gaussian_noise": lambda src, x: (x, sample_keys(1, 2, 3, B), 5, 0.1),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_kernel_compiled_matches_plain_python(name):
    src = rgb_images(B, size=12)
    x = np.random.default_rng(1).random((B, 8, 8, 3), dtype=np.float32)
    args = KERNEL_CASES[name](src, x)
    compiled, plain = _both(getattr(kernels, name), *args)
    for a, b in zip(compiled, plain):
        if isinstance(a, np.ndarray):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert any(not np.array_equal(out, arg) for out, arg in zip(compiled, args) if isinstance(arg, np.ndarray))


@pytest.mark.parametrize("compiled", [True, False])
def test_gather_copy_matches_numpy_indexing_with_whole_rows_padding_and_flips(compiled):
    src = rgb_images(B, size=12)
    idx = np.array([3, 0, 5, 1, 2, 4])
    ay, ax = np.array([0, 4, -3, 2, 9, 0]), np.array([0, 4, 2, -2, 11, 3])
    sy, sx = np.array([1, 1, 1, 1, -1, 1]), np.array([1, 1, 1, 1, -1, -1])
    out = np.full((B, 8, 8, 3), 255, np.uint8)
    (kernels.gather_copy if compiled else python_version(kernels.gather_copy))(src, idx, ay, ax, sy, sx, out)
    for b in range(B):
        ys, xs = ay[b] + sy[b] * np.arange(8), ax[b] + sx[b] * np.arange(8)
        inside = ((ys >= 0) & (ys < 12))[:, None] & ((xs >= 0) & (xs < 12))[None, :]
        expected = src[idx[b]][np.clip(ys, 0, 11)[:, None], np.clip(xs, 0, 11)[None, :]]
        np.testing.assert_array_equal(out[b], np.where(inside[..., None], expected, 0), err_msg=f"sample {b}")


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("name", ["gather_convert", "gather_convert_streamed"])
def test_gather_convert_matches_numpy_with_whole_rows_padding_and_flips(compiled, dtype, name):
    src = rgb_images(B, size=12).astype(dtype)
    idx = np.array([3, 0, 5, 1, 2, 4])
    # whole rows ending at the edge; flipped whole rows under padded rows; flipped rows partly
    # outside, under padded rows; unflipped rows partly outside; rows read bottom up
    ay, ax = np.array([0, -2, -3, 2, 9, 0]), np.array([4, 11, 13, -2, 11, 7])
    sy, sx = np.array([1, 1, 1, 1, -1, 1]), np.array([1, -1, -1, 1, -1, -1])
    scale, shift = np.float32([0.5, 2, 1]), np.float32([0, 1, -1])
    out = _slot_like((B, 8, 8, 3))  # rows of 8 x 3 floats, 32-byte aligned: streamed where compiled
    out[:] = np.nan
    kernel = getattr(kernels, name) if compiled else python_version(getattr(kernels, name))
    kernel(src, idx, ay, ax, sy, sx, scale, shift, out)
    for b in range(B):
        ys, xs = ay[b] + sy[b] * np.arange(8), ax[b] + sx[b] * np.arange(8)
        inside = ((ys >= 0) & (ys < 12))[:, None] & ((xs >= 0) & (xs < 12))[None, :]
        pixels = src[idx[b]][np.clip(ys, 0, 11)[:, None], np.clip(xs, 0, 11)[None, :]].astype(np.float32)
        expected = np.where(inside[..., None], pixels * scale + shift, shift)
        np.testing.assert_array_equal(out[b], expected, err_msg=f"sample {b}")


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("offset", [0, 4, 16, 32])
@pytest.mark.parametrize("size", [8, 5])
def test_streamed_gather_convert_writes_what_gather_convert_writes(compiled, offset, size):
    """Rows of 8 x 3 floats are 32-byte aligned at offsets 0 and 32 and streamed; at 4 and 16, and
    rows of 5 x 3 floats, are not, and go through the row buffer with plain stores."""
    src = rgb_images(B, size=12)
    args = (src, np.array([3, 0, 5, 1, 2, 4]), np.array([0, 4, -3, 2, 9, 0]), np.array([4, 11, 13, -2, 11, 7]),
            np.array([1, 1, 1, 1, -1, 1]), np.array([1, -1, -1, 1, -1, -1]), np.float32([0.5, 2, 1]),
            np.float32([0, 1, -1]))
    expected = np.full((B, size, size, 3), np.nan, np.float32)
    kernels.gather_convert(*args, expected)
    out = _slot_like((B, size, size, 3), offset)
    out[:] = np.nan
    (kernels.gather_convert_streamed if compiled else python_version(kernels.gather_convert_streamed))(*args, out)
    np.testing.assert_array_equal(out, expected)
    assert rows_aligned(out.reshape(B, size, -1)) == (size == 8 and offset % 32 == 0)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="checks x86-64 instructions")
def test_streamed_kernel_compiles_to_streaming_stores_and_a_store_fence():
    fresh = numba.njit(parallel=True, error_model="numpy")(python_version(kernels.gather_convert_streamed))
    src = rgb_images(2, size=12)
    fresh(src, np.arange(2), np.zeros(2, np.int64), np.zeros(2, np.int64), np.ones(2, np.int64),
          np.ones(2, np.int64), np.ones(3, np.float32), np.zeros(3, np.float32), _slot_like((2, 8, 8, 3)))
    assembly = "\n".join(fresh.inspect_asm().values())
    assert re.search(r"\bv?movnt", assembly) and "sfence" in assembly


def test_compiled_stream_span_is_the_whole_row_only_for_aligned_rows():
    span = numba.njit(lambda rows: stream_span(rows))
    assert span(_slot_like((4, 8, 24))) == 24
    assert span(_slot_like((4, 8, 24), offset=16)) == 0
    assert span(_slot_like((4, 8, 15))) == 0
    assert stream_span(_slot_like((4, 8, 24))) == 0  # plain Python streams nothing


def test_pipeline_streams_only_into_aligned_rows_when_the_gather_is_the_last_pass(monkeypatch):
    images = rgb_images(B, size=12)
    calls = spy_kernels(monkeypatch, "gather_convert", "gather_convert_streamed")
    crop = [{"op": "random_crop", "size": [8, 8]}, {"op": "normalize", "mean": 0.5, "std": 0.25}]
    cases = [(crop, 0, True, "gather_convert_streamed"), (crop, 0, False, "gather_convert"),
             (crop, 16, True, "gather_convert"),
             (crop + [{"op": "brightness", "max_delta": 0.1}], 0, True, "gather_convert")]
    outs = []
    for specs, offset, streaming, chosen in cases:
        pipe = Pipeline(specs, images.shape[1:], images.dtype)
        out = _slot_like((B, *pipe.out_shape), offset)
        calls.clear()
        pipe.run(images, np.arange(B), sample_keys(5, 0, 0, B), out, streaming=streaming)
        assert calls == [chosen], (specs, offset, streaming)
        outs.append(out.copy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def _run(specs, features, compiled=True, idx=None, epoch=0):
    pipe = Pipeline(specs, features.shape[1:], features.dtype, compiled)
    idx = np.arange(B) if idx is None else idx
    out = np.empty((B, *pipe.out_shape), pipe.out_dtype)
    pipe.run(features, idx, sample_keys(5, epoch, 0, B), out)
    return pipe, out


def test_center_crop_and_flips_are_exact():
    images = id_images(B, 8, 8, 2)
    _, out = _run([{"op": "center_crop", "size": [4, 6]}], images)
    np.testing.assert_array_equal(out, images[:, 2:6, 1:7])
    _, out = _run([{"op": "flip_lr", "p": 1.0}, {"op": "flip_ud", "p": 1.0}], images)
    np.testing.assert_array_equal(out, images[:, ::-1, ::-1])
    _, out = _run([{"op": "flip_lr", "p": 0.0}], images)
    np.testing.assert_array_equal(out, images)


def test_random_crop_with_padding_is_a_window_of_the_padded_image():
    images = id_images(B, 8, 8, 2) + 1  # +1 so zero padding is recognisable
    _, out = _run([{"op": "random_crop", "size": 6, "padding": 2}], images)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for b in range(B):
        found = [(y, x) for y in range(7) for x in range(7)
                 if np.array_equal(out[b], padded[b, y:y + 6, x:x + 6])]
        assert found, f"sample {b} is not a 6x6 window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 1


def test_flip_after_crop_composes():
    images = id_images(B, 8, 8, 1)
    _, out = _run([{"op": "center_crop", "size": 4}, {"op": "flip_lr", "p": 1.0}], images)
    np.testing.assert_array_equal(out, images[:, 2:6, 2:6][:, :, ::-1])


def test_normalize_uint8_is_x_over_255_minus_mean_over_std():
    images = rgb_images(B, 8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pipe, out = _run([{"op": "normalize", "mean": mean, "std": std}], images)
    assert pipe.out_dtype == np.float32
    expected = (images / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_pixel_ops_behave():
    images = rgb_images(B, 8)
    base = images.astype(np.float32) / 255
    _, out = _run([{"op": "brightness", "max_delta": 0.2}], images)
    delta = (out - base).reshape(B, -1)
    assert np.allclose(delta, delta[:, :1], atol=1e-6) and np.abs(delta).max() <= 0.2 + 1e-6
    _, out = _run([{"op": "contrast", "lower": 0.2, "upper": 0.5}], images)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), base.mean(axis=(1, 2)), atol=1e-4)
    assert out.std() < base.std()
    _, out = _run([{"op": "cutout", "size": 3, "fill": 0}], images + np.uint8(1))
    zeros = (out == 0).all(axis=-1).sum(axis=(1, 2))
    assert zeros.max() <= 9 and zeros.sum() > 0
    _, out = _run([{"op": "gaussian_noise", "std": 0.1}], images)
    assert 0.08 < (out - base).std() < 0.12


def test_flat_features_normalize_per_feature():
    features = np.random.default_rng(0).random((B, 5), dtype=np.float32)
    pipe, out = _run([{"op": "normalize", "mean": [0, 1, 2, 3, 4], "std": 2}], features)
    assert pipe.out_shape == (5,)
    np.testing.assert_allclose(out, (features - np.arange(5)) / 2, rtol=1e-6)


FULL = [{"op": "random_crop", "size": [20, 18], "padding": 2}, {"op": "flip_lr"}, {"op": "flip_ud"},
        {"op": "brightness", "max_delta": 0.1}, {"op": "contrast", "lower": 0.8, "upper": 1.2},
        {"op": "normalize", "mean": [0.5], "std": [0.25]}, {"op": "cutout", "size": 4},
        {"op": "gaussian_noise", "std": 0.05}, {"op": "custom", "fn": "custom_ops:solarize", "params": [1.5]}]


def test_whole_pipeline_compiled_equals_plain_python_and_is_deterministic():
    images = rgb_images(B, 24)
    _, compiled = _run(FULL, images, compiled=True)
    _, plain = _run(FULL, images, compiled=False)
    np.testing.assert_allclose(compiled, plain, rtol=1e-5, atol=1e-5)
    _, again = _run(FULL, images, compiled=True)
    assert np.array_equal(compiled, again)
    _, other_epoch = _run(FULL, images, compiled=True, epoch=1)
    assert not np.array_equal(compiled, other_epoch)


def test_uniform_is_in_unit_interval_and_keyed():
    keys = sample_keys(0, 0, 0, 10000)
    u = uniform(keys, 3)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    assert not np.array_equal(u, uniform(keys, 4))
    assert np.array_equal(keys, sample_keys(0, 0, 0, 10000))
    assert len(set(sample_keys(0, 0, 1, 100).tolist()) & set(sample_keys(0, 0, 0, 100).tolist())) == 0


@pytest.mark.parametrize("specs, shape, fragment", [
    ([{"op": "rotate"}], (8, 8, 3), "augment[0] (rotate): unknown op 'rotate'"),
    ([{"op": "random_crop", "size": [9, 4]}], (8, 8, 3), "crop size [9, 4] is larger than the image 8x8"),
    ([{"op": "center_crop", "size": 10}], (8, 8, 3), "crop size [10, 10] is larger than the image 8x8"),
    ([{"op": "random_crop"}], (8, 8, 3), "missing parameter 'size'"),
    ([{"op": "random_crop", "size": 0}], (8, 8, 3), "size must be >= 1, got 0"),
    ([{"op": "flip_lr", "q": 1}], (8, 8, 3), "unknown parameter(s) ['q']"),
    ([{"op": "normalize", "mean": [0, 0], "std": 1}], (8, 8, 3), "mean must be a number or a list of 1 or 3"),
    ([{"op": "normalize", "mean": 0, "std": 0}], (8, 8, 3), "std must be > 0"),
    ([{"op": "normalize", "mean": 0, "std": 1}, {"op": "flip_lr"}], (8, 8, 3), "must come before pixel ops"),
    ([{"op": "flip_lr"}], (5,), "needs image features shaped (N, H, W, C)"),
    ([{"op": "custom", "fn": "custom_ops:not_jitted"}], (8, 8, 3), "must be a numba @njit function"),
    ([{"op": "custom", "fn": "custom_ops:nothing"}], (8, 8, 3), "cannot import fn 'custom_ops:nothing'"),
    ([{"op": "custom", "fn": "solarize"}], (8, 8, 3), "fn must look like 'package.module:function'"),
])
def test_bad_pipelines_are_refused(specs, shape, fragment):
    with pytest.raises(ConfigError) as err:
        Pipeline(specs, shape, np.uint8)
    assert fragment in str(err.value)
