"""ringfeed pack: image folders, list files and arrays into one file, read back through PackedFile;
damaged packs refused with their messages; interrupted packs leave nothing behind; the CLI."""

import io
import itertools
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from ringfeed.server import pack as packmod
from ringfeed.server.config import ConfigError
from ringfeed.server.images.listing import list_folder
from ringfeed.server.pack import pack
from ringfeed.server.packfile import MAGIC, PREAMBLE, PackedFile, PackError, is_pack

RINGFEED = [sys.executable, "-m", "ringfeed.server.cli"]
PHOTOS = load_sample_images().images  # two 427x640 RGB photos


def _photo(i: int, w: int, h: int) -> Image.Image:
    photo = PHOTOS[i % 2]
    y, x = (i * 37) % (photo.shape[0] - h + 1), (i * 53) % (photo.shape[1] - w + 1)
    return Image.fromarray(photo[y:y + h, x:x + w])


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image.save(path, "PNG")
    else:
        image.save(path, "JPEG", quality=85)
    return path


def _folder(root: Path, sizes=((64, 48), (40, 60), (640, 427), (300, 420))) -> Path:
    """Three classes of JPEGs and PNGs of the given sizes."""
    for i, (w, h) in enumerate(sizes * 2):
        cls = ("cat", "dog", "eel")[i % 3]
        _save(_photo(i, w, h), root / cls / f"{i:02d}{'.png' if i % 2 else '.jpg'}")
    return root


def _sections(path: Path) -> dict:
    raw = path.read_bytes()
    _, _, header_len = PREAMBLE.unpack_from(raw)
    return json.loads(raw[PREAMBLE.size:PREAMBLE.size + header_len])


def test_image_folder_round_trip(tmp_path):
    root = _folder(tmp_path / "images")
    out = tmp_path / "train.rfpack"
    stats = pack(root, out, progress=False)
    listing = list_folder(root)
    n = len(listing.paths)
    assert stats["samples"] == n and stats["reencoded"] == 0 and stats["bytes"] == out.stat().st_size
    assert is_pack(out) and not is_pack(listing.paths[0])
    schema = _sections(out)
    image = schema["fields"]["image"]
    assert image["kind"] == "encoded_image" and schema["fields"]["label"]["dtype"] == "<i8"
    assert all(image[k] % 64 == 0 for k in ("index_offset", "payload_offset"))
    assert schema["fields"]["label"]["offset"] % 64 == 0
    assert image["index_offset"] + 12 * n + 8 == out.stat().st_size  # the index is the last section
    with PackedFile(out) as packed:
        assert packed.samples == n and packed.classes == ["cat", "dog", "eel"]
        records = packed.records("image")
        assert len(records) == n
        for i, path in enumerate(listing.paths):
            assert bytes(records.get(i)) == Path(path).read_bytes()
        labels = packed.array("label")
        np.testing.assert_array_equal(labels, listing.labels)
        assert labels.dtype == np.int64 and not labels.flags.writeable
        assert records.describe(3) == f"record 3 of {out}"
        # workers get it by pickle: the path, reopened
        blob = pickle.dumps(records)
        assert len(blob) < 500
        again = pickle.loads(blob)
        assert bytes(again.get(n - 1)) == Path(listing.paths[-1]).read_bytes()
        assert pickle.loads(pickle.dumps(packed)).samples == n
        with pytest.raises(PackError, match="is encoded_image, not array"):
            packed.array("image")
        with pytest.raises(IndexError, match=f"record {n} of .*out of range"):
            records.get(n)
    out.write_bytes(out.read_bytes())  # rewritten: a stale pickle refuses the new file
    with pytest.raises(PackError, match="changed after it was opened"):
        pickle.loads(blob)


def test_list_file_source(tmp_path):
    a = _save(_photo(0, 50, 40), tmp_path / "imgs" / "a.jpg")
    b = _save(_photo(1, 30, 70), tmp_path / "imgs" / "b.png")
    listing = tmp_path / "train.csv"
    listing.write_text(f"path,label\nimgs/a.jpg,7\n{b},2\nimgs/a.jpg,0\n")
    out = tmp_path / "list.rfpack"
    pack(listing, out, progress=False)
    with PackedFile(out) as packed:
        assert packed.samples == 3 and packed.classes is None
        assert [bytes(packed.records("image").get(i)) for i in range(3)] == [
            a.read_bytes(), b.read_bytes(), a.read_bytes()]
        assert packed.array("label").tolist() == [7, 2, 0]


def _arrays(n=37):
    rng = np.random.default_rng(1)
    return {"features": rng.standard_normal((n, 5, 4, 3)).astype(np.float32),
            "labels": rng.integers(0, 10, n),
            "mask": rng.random(n) > 0.5,
            "big_endian": rng.integers(-300, 300, (n, 2)).astype(">i2"),
            "empty": np.zeros((n, 0), np.uint8)}


@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_array_fields_round_trip(tmp_path, kind):
    arrays = _arrays()
    if kind == "npz":
        src = tmp_path / "data.npz"
        np.savez(src, **arrays)
    else:
        src = tmp_path / "data"
        src.mkdir()
        for name, array in arrays.items():
            np.save(src / f"{name}.npy", array)
    out = tmp_path / "arrays.rfpack"
    assert pack(src, out, progress=False)["samples"] == 37
    with PackedFile(out) as packed:
        assert packed.samples == 37 and packed.classes is None
        assert set(packed.fields) == set(arrays)
        for name, array in arrays.items():
            got = packed.array(name)
            assert got.dtype == array.dtype and got.shape == array.shape
            np.testing.assert_array_equal(got, array)
            assert packed.fields[name]["offset"] % 64 == 0
    # compressed .npz members stream too
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    pack(tmp_path / "c.npz", out, progress=False)
    with PackedFile(out) as packed:
        np.testing.assert_array_equal(packed.array("features"), arrays["features"])


def test_array_sources_refused(tmp_path):
    np.savez(tmp_path / "uneven.npz", a=np.zeros(3), b=np.zeros(4))
    with pytest.raises(ConfigError, match="fields differ in length"):
        pack(tmp_path / "uneven.npz", tmp_path / "x", progress=False)
    np.savez(tmp_path / "objects.npz", a=np.array(["s", "t"]))
    with pytest.raises(ConfigError, match="numeric or bool array"):
        pack(tmp_path / "objects.npz", tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        pack(tmp_path / "nothing", tmp_path / "x", progress=False)
    np.save(tmp_path / "t.npy", np.zeros((4, 3)))
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-10])
    with pytest.raises(ConfigError, match="t.npy is truncated: its data ends after 86 of the 96 bytes"):
        pack(cut, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def _decoded_size(data) -> tuple[int, int]:
    with Image.open(io.BytesIO(bytes(data))) as image:
        return image.size


def test_max_side_shrinks_only_the_large_ones(tmp_path):
    root = _folder(tmp_path / "images")
    out = tmp_path / "small.rfpack"
    stats = pack(root, out, max_side=100, progress=False)
    listing = list_folder(root)
    large = 0
    with PackedFile(out) as packed:
        records = packed.records("image")
        for i, path in enumerate(listing.paths):
            original = Path(path).read_bytes()
            w, h = _decoded_size(original)
            stored = bytes(records.get(i))
            if max(w, h) <= 100:
                assert stored == original
                continue
            large += 1
            assert stored[:3] == b"\xff\xd8\xff"  # a JPEG, PNGs included
            sw, sh = _decoded_size(stored)
            assert max(sw, sh) == 100 and abs(sw / sh - w / h) < 0.05
            assert Image.open(io.BytesIO(stored)).mode == "RGB"
    assert large == 4 and stats["reencoded"] == 4


def test_reencode_png(tmp_path):
    root = _folder(tmp_path / "images")
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(root / "eel" / "alpha.png")
    out = tmp_path / "jpeg.rfpack"
    stats = pack(root, out, reencode_png=True, progress=False)
    listing = list_folder(root)
    with PackedFile(out) as packed:
        records = packed.records("image")
        for i, path in enumerate(listing.paths):
            original, stored = Path(path).read_bytes(), bytes(records.get(i))
            if path.endswith(".png"):
                assert stored[:3] == b"\xff\xd8\xff"
                assert _decoded_size(stored) == _decoded_size(original)
                assert Image.open(io.BytesIO(stored)).mode == "RGB"
            else:
                assert stored == original
    assert stats["reencoded"] == sum(p.endswith(".png") for p in listing.paths) == 5


def test_undecodable_image_is_named(tmp_path):
    root = _folder(tmp_path / "images", sizes=((30, 30),))
    bad = root / "cat" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    out = tmp_path / "x.rfpack"
    pack(root, out, progress=False)  # stored as is: nothing decodes it
    with pytest.raises(ConfigError, match=f"cannot decode image file '{bad}' to re-encode it"):
        pack(root, out, max_side=10, progress=False)
    bad.write_bytes(b"GIF89a....")
    with pytest.raises(ConfigError, match=f"image file '{bad}' is neither a JPEG nor a PNG"):
        pack(root, out, progress=False)


# damaged packs

@pytest.fixture
def packed_path(tmp_path):
    root = _folder(tmp_path / "images")
    out = tmp_path / "p.rfpack"
    pack(root, out, progress=False)
    return out


def test_truncated_pack_refused(packed_path):
    size, fields = packed_path.stat().st_size, _sections(packed_path)["fields"]
    os.truncate(packed_path, size - 5)
    with pytest.raises(PackError, match=f"{packed_path} is truncated: it is {size - 5} bytes, but "
                       f"field 'image' index ends at byte {size}"):
        PackedFile(packed_path)
    image = fields["image"]
    cut = image["payload_offset"] + 1
    os.truncate(packed_path, cut)
    with pytest.raises(PackError, match=f"is truncated: it is {cut} bytes, but field 'image' payload "
                       f"ends at byte {image['payload_offset'] + image['payload_bytes']}"):
        PackedFile(packed_path)
    os.truncate(packed_path, 100)
    with pytest.raises(PackError, match="is truncated: it is 100 bytes, but the header ends at byte"):
        PackedFile(packed_path)
    os.truncate(packed_path, 10)
    with pytest.raises(PackError, match="is truncated: it is 10 bytes, but the preamble ends at byte 20"):
        PackedFile(packed_path)


def test_bad_magic_refused(packed_path, tmp_path):
    raw = bytearray(packed_path.read_bytes())
    raw[:8] = b"PK\x03\x04zip!"
    packed_path.write_bytes(raw)
    with pytest.raises(PackError, match=r"is not a ringfeed pack: it starts with b'PK\\x03\\x04zip!"):
        PackedFile(packed_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(PackError, match="not a ringfeed pack: it is empty"):
        PackedFile(tmp_path / "empty")
    with pytest.raises(PackError, match="cannot open pack .*No such file"):
        PackedFile(tmp_path / "missing")


def test_bad_header_refused(packed_path):
    raw = bytearray(packed_path.read_bytes())
    _, _, header_len = PREAMBLE.unpack_from(raw)
    for version, length, body, message in (
            (2, header_len, None, "pack format version 2; this ringfeed reads version 1"),
            (1, 2**25, None, "header length 33554432 is over the limit"),
            (1, header_len, b"{not json", "the header is not valid UTF-8 JSON"),
            (1, header_len, b'{"samples": 3, "classes": null, "fields": {"x": {"kind": "video"}}}',
             "field 'x' must be an object whose kind is one of"),
            (1, header_len, b'{"samples": 3, "classes": null, "fields": {"x": {"kind": "array", '
                            b'"dtype": "<U4", "shape": [], "offset": 64, "nbytes": 48, "crc32": 0}}}',
             "dtype '<U4' is not a plain numeric dtype")):
        damaged = bytearray(raw)
        damaged[:PREAMBLE.size] = PREAMBLE.pack(MAGIC, version, length)
        if body is not None:
            damaged[PREAMBLE.size:PREAMBLE.size + header_len] = body.ljust(header_len)
        packed_path.write_bytes(damaged)
        with pytest.raises(PackError, match=message):
            PackedFile(packed_path)


def test_flipped_payload_byte_names_the_record(packed_path):
    with PackedFile(packed_path) as packed:
        spec = packed.fields["image"]
        index = np.frombuffer(packed_path.read_bytes(), "<u8", packed.samples + 1, spec["index_offset"])
        good = [bytes(packed.records("image").get(i)) for i in range(packed.samples)]
    k = 5
    raw = bytearray(packed_path.read_bytes())
    at = spec["payload_offset"] + int(index[k]) + 100
    raw[at] ^= 0x40
    packed_path.write_bytes(raw)
    with PackedFile(packed_path) as packed:
        records = packed.records("image")
        stored = zlib.crc32(good[k])
        with pytest.raises(PackError, match=rf"^record {k} of {packed_path}: checksum mismatch "
                           rf"\(stored 0x{stored:08x}, computed 0x[0-9a-f]{{8}}\)$"):
            records.get(k)
        for i in range(packed.samples):
            if i != k:
                assert bytes(records.get(i)) == good[i]
        packed.array("label")  # untouched


def test_flipped_array_byte_is_refused_on_first_use(packed_path):
    label = _sections(packed_path)["fields"]["label"]
    raw = bytearray(packed_path.read_bytes())
    raw[label["offset"] + 8] ^= 1
    packed_path.write_bytes(raw)
    with PackedFile(packed_path) as packed:
        assert bytes(packed.records("image").get(0))
        with pytest.raises(PackError, match=f"field 'label' of {packed_path}: checksum mismatch"):
            packed.array("label")


def test_index_offset_out_of_range_refused(packed_path):
    spec = _sections(packed_path)["fields"]["image"]
    raw = bytearray(packed_path.read_bytes())
    struct.pack_into("<Q", raw, spec["index_offset"] + 8 * 3, spec["payload_bytes"] + 1)
    packed_path.write_bytes(raw)
    with pytest.raises(PackError, match=f"{packed_path}: field 'image': index: offset 3 \\(record 3\\) is "
                       f"{spec['payload_bytes'] + 1}, past the end of the {spec['payload_bytes']}-byte payload"):
        PackedFile(packed_path)
    struct.pack_into("<Q", raw, spec["index_offset"] + 8 * 3, 1)  # before record 2's start
    packed_path.write_bytes(raw)
    with pytest.raises(PackError, match="record 2 ends at payload offset 1, before it starts"):
        PackedFile(packed_path)


# interrupted packs

def _left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("damage", ["directory", "dangling_symlink"])
def test_unreadable_source_leaves_out_untouched(tmp_path, monkeypatch, damage):
    root = _folder(tmp_path / "images")
    out = tmp_path / "p.rfpack"
    out.write_bytes(b"the previous pack")
    victim = {}

    def listing_then_damage(path):
        listing = list_folder(path)
        victim["path"] = path = Path(listing.paths[6])
        path.unlink()
        if damage == "directory":
            path.mkdir()
        else:
            path.symlink_to(tmp_path / "gone.jpg")
        return listing

    monkeypatch.setattr(packmod, "list_folder", listing_then_damage)
    with pytest.raises(ConfigError, match=f"cannot read image file '{victim.get('path', '.*')}"):
        pack(root, out, progress=False)
    assert out.read_bytes() == b"the previous pack"
    assert _left_behind(tmp_path) == []


def test_keyboard_interrupt_leaves_no_file(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    out = tmp_path / "p.rfpack"
    calls = itertools.count()
    real = packmod._read_image

    def interrupted(path):
        if next(calls) == 4:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(packmod, "_read_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(root, out, progress=False)
    assert not out.exists() and _left_behind(tmp_path) == []


# the command

def _ringfeed(*args):
    return subprocess.run([*RINGFEED, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_cli_pack(tmp_path):
    root = _folder(tmp_path / "images")
    out = tmp_path / "cli.rfpack"
    done = _ringfeed("pack", root, out, "--max-side", "200")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    assert done.stdout.startswith(f"packed 8 samples into {out}: ") and ", 4 re-encoded" in done.stdout
    assert "img/s" in done.stderr  # the progress bar
    with PackedFile(out) as packed:
        assert packed.samples == 8
    quiet = _ringfeed("pack", root, out, "--no-progress")
    assert quiet.returncode == 0 and quiet.stderr == ""
    bad = _ringfeed("pack", tmp_path / "nope", out, "--no-progress")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("ringfeed: error: pack source") and "nope' does not exist" in bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    zero = _ringfeed("pack", root, out, "--max-side", "0")
    assert zero.returncode == 2 and "max_side must be an integer >= 1" in zero.stderr
    with PackedFile(out) as packed:  # the failed runs left the last pack as it was
        assert packed.samples == 8
