"""Write a synthetic image-classification dataset for ringfeed to serve.

    python docker/make_data.py OUT_DIR [--samples 8192] [--size 64] [--classes 10] [--seed 0]

OUT_DIR gets ``features.npy`` (uint8, shaped (N, size, size, 3)) and
``labels.npy`` (int32, shaped (N,)): the folder layout ``ringfeed serve --data``
memory-maps. Nothing is downloaded; only numpy is needed.

Each class is a colour channel and a stripe width, with noise on top. Both
survive ``random_crop`` and ``flip_lr``, so a small convnet learns them in a
couple of epochs: a quick end-to-end check that the data really flows.

``--if-missing`` leaves a folder that already has both files alone (compose
runs this before every start of the loader).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

FILES = ("features.npy", "labels.npy")
STRIPE_WIDTHS = (1, 2, 3, 5, 8)  # pixels; times 3 colour channels makes 15 classes at most


def make_dataset(samples: int, size: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 1 <= classes <= 3 * len(STRIPE_WIDTHS):
        raise ValueError(f"classes must be between 1 and {3 * len(STRIPE_WIDTHS)}, got {classes}")
    rng = np.random.default_rng(seed)
    labels = (np.arange(samples) % classes).astype(np.int32)
    rng.shuffle(labels)
    features = rng.integers(0, 96, (samples, size, size, 3), dtype=np.uint8)
    rows = np.arange(size)
    for k in range(classes):
        channel, width = k % 3, STRIPE_WIDTHS[k // 3]
        stripes = (rows // width) % 2 == 0  # horizontal stripes: flip_lr and crops keep them
        members = np.flatnonzero(labels == k)
        plane = features[members, :, :, channel]
        plane[:, stripes, :] += 128
        features[members, :, :, channel] = plane
    return features, labels


def write_dataset(out: Path, features: np.ndarray, labels: np.ndarray) -> None:
    """Write both arrays atomically (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, array in zip(FILES, (features, labels)):
        tmp = out / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write features.npy and labels.npy into")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing if OUT already holds features.npy and labels.npy")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.size < 1:
        parser.error(f"--samples and --size must be >= 1, got {args.samples} and {args.size}")
    if args.if_missing and all((args.out / name).is_file() for name in FILES):
        print(f"{args.out} already has {' and '.join(FILES)}; leaving it alone")
        return 0
    try:
        features, labels = make_dataset(args.samples, args.size, args.classes, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    write_dataset(args.out, features, labels)
    print(f"wrote {args.out}/features.npy {features.dtype} {features.shape} "
          f"({features.nbytes / 2**20:.1f} MiB) and labels.npy {labels.dtype} {labels.shape}, "
          f"{args.classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
