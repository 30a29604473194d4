"""Image files as a dataset: listing, the boxes the size ops draw, and whole services over
real JPEG and PNG files made from scikit-learn's sample photographs."""

from __future__ import annotations

import io

import numpy as np
import pytest

from ringfeed.server.augment.ops import Frame
from ringfeed.server.augment.rng import sample_keys
from ringfeed.server.config import ConfigError
from ringfeed.server.images.listing import is_image_folder, list_folder, read_list
from ringfeed.server.images.ops import RandomResizedCrop, Resize, ResizedCrop


def _photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # two 427 x 640 RGB photographs


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_image_folder(root, per_class=(5, 4, 3), seed=0):
    """Class folders of JPEGs cut from the sample photographs at random sizes and places."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    for k, count in enumerate(per_class):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True)
        for n in range(count):
            photo = photos[(k + n) % 2]
            h, w = rng.integers(96, 200), rng.integers(96, 200)
            y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            (folder / f"img_{n:03d}.jpg").write_bytes(_jpeg(np.ascontiguousarray(photo[y:y + h, x:x + w])))
    return root


# -- listing ------------------------------------------------------------------------

def test_an_image_folder_lists_classes_sorted_and_files_sorted(tmp_path):
    root = write_image_folder(tmp_path / "set", per_class=(2, 3))
    (root / "class_1" / ".DS_Store").write_bytes(b"x")  # hidden files are not samples
    images = list_folder(root)
    assert images.classes == ("class_0", "class_1") and images.labels.tolist() == [0, 0, 1, 1, 1]
    assert [p.rsplit("/", 2)[-2:] for p in images.paths] == [
        ["class_0", "img_000.jpg"], ["class_0", "img_001.jpg"],
        ["class_1", "img_000.jpg"], ["class_1", "img_001.jpg"], ["class_1", "img_002.jpg"]]
    assert is_image_folder(root) and not is_image_folder(root / "class_0")


@pytest.mark.parametrize("make, fragment", [
    (lambda root: (root / "class_0" / "notes.txt").write_text("hi"), "holds 'notes.txt', which is not a"),
    (lambda root: (root / "class_0" / "empty.jpg").write_bytes(b""), "empty.jpg' is empty (0 bytes)"),
    (lambda root: (root / "class_9").mkdir(), "class_9' holds no images"),
])
def test_a_bad_image_folder_is_refused_naming_the_file(tmp_path, make, fragment):
    root = write_image_folder(tmp_path / "set", per_class=(1, 1))
    make(root)
    with pytest.raises(ConfigError) as err:
        list_folder(root)
    assert fragment in str(err.value)


def test_a_list_file_gives_paths_relative_to_it_and_its_labels(tmp_path):
    root = write_image_folder(tmp_path / "set", per_class=(2, 1))
    listing = tmp_path / "set" / "train.csv"
    listing.write_text("path,label\nclass_1/img_000.jpg,7\nclass_0/img_001.jpg,3\n")
    images = read_list(listing)
    assert images.labels.tolist() == [7, 3] and images.classes is None
    assert images.paths[0] == str(root / "class_1" / "img_000.jpg")
    listing.write_text("class_0/img_000.jpg,x\n")
    with pytest.raises(ConfigError, match=r"train.csv, line 1: label 'x' is not an integer"):
        read_list(listing)
    listing.write_text("class_0/missing.jpg,1\n")
    with pytest.raises(ConfigError, match=r"line 1: image .*missing.jpg' does not exist"):
        read_list(listing)


# -- boxes --------------------------------------------------------------------------

FRAME = Frame(0, 0, 3, True)


def test_random_resized_crop_boxes_follow_torchvision_s_rule():
    op = RandomResizedCrop("rrc", {"size": 32}, FRAME, 0)
    n = 4000
    heights, widths = np.full(n, 300), np.full(n, 400)
    keys = sample_keys(0, 0, 0, n)
    y0, x0, bh, bw = op.boxes(heights, widths, keys)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + bh <= 300).all() and (x0 + bw <= 400).all()
    share, aspect = bh * bw / (300 * 400), bw / bh
    assert share.min() >= 0.08 - 0.01 and share.max() <= 1.0
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    again = op.boxes(heights, widths, keys)
    assert all(np.array_equal(a, b) for a, b in zip((y0, x0, bh, bw), again))  # a pure function of the keys


def _torchvision_box(h, w, draws, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, one sample at a time, with given uniforms."""
    import math

    for attempt in range(10):
        u = draws[4 * attempt:4 * attempt + 4]
        area = h * w * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + u[1] * (math.log(ratio[1]) - math.log(ratio[0])))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def test_random_resized_crop_boxes_equal_a_per_sample_reference_of_torchvision_s_rule():
    op = RandomResizedCrop("rrc", {"size": 32}, FRAME, 3)
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(20, 600, 500), rng.integers(20, 600, 500)
    heights[:20], widths[:20] = 10, 900  # extreme aspects: the fallback
    keys = sample_keys(1, 2, 3, 500)
    boxes = np.stack(op.boxes(heights, widths, keys), 1)
    draws = np.stack([op.uniform(keys, k) for k in range(40)], 1)
    expected = [_torchvision_box(int(h), int(w), d) for h, w, d in zip(heights, widths, draws)]
    assert boxes.tolist() == [list(box) for box in expected]


def test_random_resized_crop_falls_back_to_the_central_crop_of_the_nearest_ratio():
    op = RandomResizedCrop("rrc", {"size": 32, "scale": [0.99, 1.0], "ratio": [1.0, 1.0]}, FRAME, 0)
    y0, x0, bh, bw = op.boxes(np.array([100]), np.array([1000]), sample_keys(0, 0, 0, 1))
    assert (int(y0[0]), int(x0[0]), int(bh[0]), int(bw[0])) == (0, 450, 100, 100)


def test_resize_by_shorter_side_then_center_crop_keeps_the_middle():
    resize = Resize("resize", {"shorter_side": 64}, FRAME, 0)
    crop = ResizedCrop("crop", {"size": 56}, resize.out_frame(FRAME), 1, resize, random=False)
    y0, x0, bh, bw = crop.boxes(np.array([128]), np.array([256]), sample_keys(0, 0, 0, 1))
    assert (y0[0], x0[0], bh[0], bw[0]) == (8.0, 72.0, 112.0, 112.0)  # 2 source pixels per resized one
    with pytest.raises(ConfigError, match="larger than the shorter side 64"):
        ResizedCrop("crop", {"size": 80}, resize.out_frame(FRAME), 1, resize, random=True)
    with pytest.raises(ConfigError, match="give size or shorter_side"):
        Resize("resize", {}, FRAME, 0)


# -- whole services over image files -------------------------------------------------

RRC = [{"op": "random_resized_crop", "size": 48}, {"op": "flip_lr"},
       {"op": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}]


def _config(name, data, **options):
    from ringfeed.server import Config

    return Config(**{"data": str(data), "batch_size": 4, "workers": 1, "name": name, "seed": 7, "augment": RRC,
                     **options})


def _epochs(config, epochs=2, kill_after=None):
    import os
    import signal

    from ringfeed import Feed
    from ringfeed.status import query_status
    from ringfeed.server import Service

    with Service(config) as svc, Feed(svc.endpoint, prefetch=4) as feed:
        batches = []
        for k in range(epochs * feed.steps_per_epoch):
            if k == kill_after:  # mid-epoch, with batches in flight: the replacement recomputes them
                os.kill(query_status(svc.endpoint)["workers_ready"][0], signal.SIGKILL)
            batches.append(feed.next_batch(copy=True))
        return batches


def test_an_image_folder_serves_each_image_once_per_epoch_with_its_label(tmp_path, name):
    root = write_image_folder(tmp_path / "set", per_class=(4, 4, 4))
    batches = _epochs(_config(name, root))
    x, y = batches[0]
    assert x.shape == (4, 48, 48, 3) and x.dtype == np.float32 and y.dtype == np.int64
    for epoch in (batches[:3], batches[3:]):
        assert sorted(np.concatenate([y for _, y in epoch]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_batches_of_images_are_identical_for_1_and_2_workers_and_across_a_worker_kill(tmp_path, name):
    root = write_image_folder(tmp_path / "set", per_class=(6, 6))
    runs = [_epochs(_config(f"{name}a", root, workers=1)),
            _epochs(_config(f"{name}b", root, workers=2)),
            _epochs(_config(f"{name}c", root, workers=2), kill_after=2)]
    for other in runs[1:]:
        assert [x.tobytes() + y.tobytes() for x, y in other] == [x.tobytes() + y.tobytes() for x, y in runs[0]]


def test_without_normalize_images_stay_uint8(tmp_path, name):
    root = write_image_folder(tmp_path / "set", per_class=(4, 4))
    config = _config(name, root, augment=[{"op": "resize", "shorter_side": 40}, {"op": "center_crop", "size": 32}])
    x, y = _epochs(config, epochs=1)[0]
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8


def test_a_packed_folder_serves_the_batches_the_folder_serves(tmp_path, name):
    from ringfeed.server.pack import pack

    root = write_image_folder(tmp_path / "set", per_class=(4, 4))
    pack(str(root), str(tmp_path / "set.rfpack"), progress=False)
    folder = _epochs(_config(f"{name}a", root), epochs=1)
    packed = _epochs(_config(f"{name}b", tmp_path / "set.rfpack"), epochs=1)
    assert [x.tobytes() + y.tobytes() for x, y in packed] == [x.tobytes() + y.tobytes() for x, y in folder]


def test_a_random_resized_crop_matches_pillow_on_the_same_box(tmp_path):
    """The reference is Pillow, told to decode at the same DCT scale (``draft``) and to resize
    the same box (bilinear, antialiased): the two differ by libjpeg builds and rounding, within
    1 level on average and 8 at most."""
    import math

    from PIL import Image

    from ringfeed.server import Config, shm, sources
    from ringfeed.server.augment.rng import sample_keys
    from ringfeed.server.batches import BatchMaker

    root = write_image_folder(tmp_path / "set", per_class=(4, 4))
    augment = [{"op": "random_resized_crop", "size": 40, "scale": [0.05, 1.0]}]
    config = Config(data=str(root), batch_size=8, workers=1, inputs="image", targets="label", augment=augment)
    fields = sources.load_path(str(root), ("image", "label"))
    segment = shm.segment_name(1, "rrcref", "data")
    maker = BatchMaker(config, sources.publish(fields, segment))
    try:
        out = maker.empty_batch()
        maker.make(0, 0, out)
        idx = maker.sampler.indices(0, 0)
        records = maker.fields["image"]
        images = [np.asarray(Image.open(records.path(int(i))).convert("RGB")) for i in idx]
        op = maker.pipeline.stages[0].pipelines["image"].size_op
        y0, x0, bh, bw = op.boxes(np.array([im.shape[0] for im in images]), np.array([im.shape[1] for im in images]),
                                  sample_keys(config.seed, 0, 0, 8))
        for b, i in enumerate(idx):
            h, w = images[b].shape[:2]
            photo = Image.open(records.path(int(i)))
            photo.draft("RGB", (math.ceil(w * 40 / bw[b]), math.ceil(h * 40 / bh[b])))
            f = 2 ** round(math.log2(h / photo.size[1]))  # the DCT scale Pillow's decoder took
            box = (x0[b] / f, y0[b] / f, (x0[b] + bw[b]) / f, (y0[b] + bh[b]) / f)
            expected = np.asarray(photo.convert("RGB").resize((40, 40), Image.BILINEAR, box=box), np.float64)
            diff = np.abs(out["image"][b] - expected)
            assert diff.mean() < 1.0 and diff.max() <= 8, (b, f, diff.mean(), diff.max())
    finally:
        shm.unlink(segment)


def test_a_corrupt_jpeg_is_named_with_its_sample_and_skipped_when_asked(tmp_path, name):
    from ringfeed import Feed, RemoteWorkerError
    from ringfeed.status import query_status
    from ringfeed.server import Service

    root = write_image_folder(tmp_path / "set", per_class=(4, 4))
    bad = root / "class_1" / "img_002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    errors = []
    with Service(_config(f"{name}a", root)) as svc, Feed(svc.endpoint) as feed:
        for _ in range(feed.steps_per_epoch):
            try:
                feed.next_batch()
            except RemoteWorkerError as exc:
                errors.append(exc)
    assert len(errors) == 1 and str(bad) in str(errors[0]) and errors[0].sample == 6
    with Service(_config(f"{name}b", root, on_error="skip")) as svc, Feed(svc.endpoint) as feed:
        labels = np.concatenate([feed.next_batch(copy=True)[1] for _ in range(feed.steps_per_epoch)])
        assert query_status(svc.endpoint)["samples_skipped"] == 1 and len(labels) == 8


@pytest.mark.parametrize("augment, fragment", [
    ([], "holds encoded images of varying sizes; give it a random_resized_crop or resize"),
    ([{"op": "flip_lr"}], "its first op must be random_resized_crop or resize"),
    ([{"op": "resize", "shorter_side": 40}], "follow it with center_crop or random_crop"),
    ([{"op": "random_resized_crop", "size": 8}, {"op": "random_crop", "size": 4}], "geometry ops come first"),
])
def test_image_pipelines_that_leave_varying_sizes_are_refused_saying_which_op_to_add(tmp_path, name, augment,
                                                                                     fragment):
    from ringfeed.server import Service

    root = write_image_folder(tmp_path / "set", per_class=(2, 2))
    with pytest.raises(ConfigError) as err:
        Service(_config(name, root, augment=augment)).start()
    assert fragment in str(err.value)


def test_model_fit_on_an_image_folder_through_the_cli_service(tmp_path, name):
    import math
    import subprocess
    import sys

    keras = pytest.importorskip("keras")
    from ringfeed import Feed

    root = write_image_folder(tmp_path / "set", per_class=(8, 8, 8))
    toml = tmp_path / "images.toml"
    toml.write_text('batch_size = 8\nworkers = 1\n\n[[augment]]\nop = "random_resized_crop"\nsize = 32\n\n'
                    '[[augment]]\nop = "flip_lr"\n\n[[augment]]\nop = "normalize"\nmean = 0.5\nstd = 0.25\n')
    ringfeed = [sys.executable, "-m", "ringfeed.server.cli"]
    started = subprocess.run([*ringfeed, "start", "--config", str(toml), "--data", str(root), "--name", name],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        with Feed(name=name) as feed:
            assert feed.spec.field("image").shape == (32, 32, 3) and feed.spec.structure.targets == "label"
            history = model.fit(feed.generator(), steps_per_epoch=feed.steps_per_epoch, epochs=2, verbose=0,
                                shuffle=False)
        assert len(history.history["loss"]) == 2 and all(math.isfinite(v) for v in history.history["loss"])
    finally:
        subprocess.run([*ringfeed, "stop", "--name", name], capture_output=True, timeout=60)


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("channels", [3, 1])
def test_mixed_modes_and_sizes_all_arrive_in_the_configured_channels(tmp_path, name, channels):
    from PIL import Image

    photo = _photos()[0][:120, :160]
    root = tmp_path / "set"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    gray = io.BytesIO()
    Image.fromarray(photo).convert("L").save(gray, "JPEG", quality=90)
    files = {"a/gray.jpg": gray.getvalue(), "a/rgba.png": _png(np.dstack([photo, np.full(photo.shape[:2], 9, np.uint8)])),
             "b/palette.png": _png(photo, "P"), "b/tiny.jpg": _jpeg(np.ascontiguousarray(photo[:12, :20]))}
    for path, data in files.items():
        (root / path).write_bytes(data)
    augment = [{"op": "random_resized_crop", "size": 32}]  # the 12 x 20 image is upscaled, as torchvision does
    batches = _epochs(_config(name, root, augment=augment, image_channels=channels), epochs=1)
    x, y = batches[0]
    assert x.shape == (4, 32, 32, channels) and x.dtype == np.uint8 and sorted(y.tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize("corrupt", ["text", "bytes", "pack"])
def test_a_bad_record_fails_its_batch_naming_it_and_the_sample(tmp_path, name, corrupt):
    from ringfeed import Feed, RemoteWorkerError
    from ringfeed.server import Service
    from ringfeed.server.pack import pack
    from ringfeed.server.packfile import PackedFile
    from ringfeed.server.sampler import Sampler

    root = write_image_folder(tmp_path / "set", per_class=(4, 4))
    sample = int(Sampler(8, 4, 7, "shuffle").indices(0, 1)[0])  # in batch (0, 1): the server starts
    bad = sorted(root.glob("*/*.jpg"))[sample]
    data, named = root, str(bad)
    if corrupt == "text":
        bad.write_text("this is not an image")
    elif corrupt == "bytes":
        raw = bytearray(bad.read_bytes())
        raw[len(raw) // 2:len(raw) // 2 + 64] = b"\xff\x01" * 32  # markers inside the entropy-coded data
        bad.write_bytes(bytes(raw))
    else:
        data, named = tmp_path / "set.rfpack", f"record {sample} of"
        pack(str(root), str(data), progress=False)
        with PackedFile(data) as packed:
            records = packed.records("image")
            at = records._base + int(records._offsets[sample]) + 100
        raw = bytearray(data.read_bytes())
        raw[at] ^= 0xFF
        data.write_bytes(bytes(raw))
    with Service(_config(name, data)) as svc, Feed(svc.endpoint) as feed:
        assert feed.next_batch(copy=True)[0].shape == (4, 48, 48, 3)
        with pytest.raises(RemoteWorkerError) as err:
            feed.next_batch()
        assert feed.next_batch(copy=True)[0].shape == (4, 48, 48, 3)  # the service goes on
    assert named in str(err.value) and err.value.sample == sample
