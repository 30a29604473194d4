"""images.py's data: JPEGs cut from the photographs that scikit-learn (and scikit-image, where it
is installed) ship, in class folders, and the same folder packed; made once and cached.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchlib import SEED, log

CLASSES = 10
JPEG_QUALITY = 90
SIDES = (256, 512)  # every generated JPEG's height and width lie in [256, 512]
DATA_VERSION = 1  # bump when the generator changes: cached data of another version is remade
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringfeed-bench"
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "retina.jpg", "motorcycle_left.png", "ihc.png")


def photographs() -> dict[str, np.ndarray]:
    """name -> uint8 RGB photograph, from the images packages ship (nothing is downloaded)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {f"sklearn/{Path(f).name}": np.asarray(im) for f, im in zip(sample.filenames, sample.images)}
    try:
        import skimage.data
    except ImportError:
        return photos
    folder = Path(skimage.data.__file__).parent
    for name in SKIMAGE_PHOTOS:
        if (folder / name).is_file():
            with Image.open(folder / name) as im:
                photos[f"skimage/{name}"] = np.asarray(im.convert("RGB"))
    return photos


def _make_jpeg(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    """A random crop of ``photo``, rescaled to sides in SIDES, colour-shifted, as a quality-90 JPEG."""
    import io

    from PIL import Image

    out_h, out_w = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
    ph, pw = photo.shape[:2]
    aspect = out_w / out_h
    full_h = min(ph, pw / aspect)  # the largest box of the output's aspect that fits
    box_h = full_h * rng.uniform(0.4, 1.0)
    box_w = box_h * aspect
    top, left = rng.uniform(0, ph - box_h), rng.uniform(0, pw - box_w)
    image = Image.fromarray(photo).resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
    pixels = np.asarray(image, np.float32)
    gain, offset = rng.uniform(0.75, 1.25, 3).astype(np.float32), rng.uniform(-25, 25, 3).astype(np.float32)
    pixels = np.clip(pixels * gain + offset, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def make_data(data_dir: Path, count: int) -> dict:
    """The image folder and its packed file under ``data_dir``, made unless a complete copy of
    the same kind is there (its manifest, written last, says so); returns the manifest."""
    from concurrent.futures import ThreadPoolExecutor

    from ringfeed.server.pack import pack

    photos = photographs()
    root = data_dir / f"images-{count}-seed{SEED}"
    manifest_path = root / "manifest.json"
    want = {"version": DATA_VERSION, "images": count, "seed": SEED, "classes": CLASSES, "quality": JPEG_QUALITY,
            "sides": list(SIDES), "photographs": sorted(photos)}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in want} == want and (root / "train.rfpack").is_file():
            log(f"reusing {count:,} JPEGs and their pack in {root}")
            manifest.update(folder=str(root / "train"), pack=str(root / "train.rfpack"), made_s=0.0)
            return manifest
    started = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    folder = root / "train"
    for k in range(CLASSES):
        (folder / f"class_{k:02d}").mkdir(parents=True)
    names = sorted(photos)
    log(f"writing {count:,} JPEGs cut from {len(names)} photographs into {folder}")

    def write(i: int) -> int:
        rng = np.random.default_rng([SEED, i])
        data = _make_jpeg(photos[names[int(rng.integers(len(names)))]], rng)
        (folder / f"class_{i % CLASSES:02d}" / f"img_{i:06d}.jpg").write_bytes(data)
        return len(data)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # Pillow releases the GIL to resize and encode
        total = sum(pool.map(write, range(count)))
    packed = pack(str(folder), str(root / "train.rfpack"), progress=False)
    manifest = {**want, "jpeg_bytes": total, "pack_bytes": packed["bytes"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    manifest.update(folder=str(folder), pack=str(root / "train.rfpack"), made_s=round(time.monotonic() - started, 1))
    log(f"made the data in {manifest['made_s']:.1f} s ({total / count / 1e3:.0f} kB a JPEG)")
    return manifest


def listing(folder: str) -> tuple[list[str], np.ndarray]:
    """The folder's files and labels in ringfeed's order (sorted classes, sorted files)."""
    from ringfeed.server.images.listing import list_folder

    images = list_folder(folder)
    return list(images.paths), images.labels
