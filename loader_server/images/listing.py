"""Which image files make up a dataset, listed once at start, in an order that never varies.

An image folder holds one subfolder per class: the sorted class names give the
integer labels (Keras' ``image_dataset_from_directory`` and torchvision's
``ImageFolder`` rule), and each class's files are taken in sorted order, so the
list, and with it the stream, is a pure function of the folder's contents. A
list file is a CSV of ``path,label`` rows (an optional ``path,label`` header;
paths relative to the file). Hidden files (``.DS_Store``) are ignored; any other
file that is not ``.jpg``, ``.jpeg`` or ``.png``, an empty file, or an empty
class folder is refused, naming it.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LIST_SUFFIX = ".csv"


@dataclass(frozen=True)
class ImageList:
    paths: tuple[str, ...]  # absolute
    labels: np.ndarray  # int64, one per path
    classes: tuple[str, ...] | None  # an image folder's class names, label k is classes[k]


def is_image_folder(path: Path) -> bool:
    """A folder of class subfolders and no .npy fields."""
    return (path.is_dir() and not any(path.glob("*.npy"))
            and any(entry.is_dir() for entry in path.iterdir() if not entry.name.startswith(".")))


def _images_in(folder: Path) -> list[str]:
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_file() or not entry.name.lower().endswith(IMAGE_SUFFIXES):
                raise ConfigError(f"class folder {str(folder)!r} holds {entry.name!r}, which is not a "
                                  f"{', '.join(IMAGE_SUFFIXES)} file; move it out, or list the images in a "
                                  f"{LIST_SUFFIX} list file")
            if entry.stat().st_size == 0:
                raise ConfigError(f"image file {entry.path!r} is empty (0 bytes)")
            names.append(entry.name)
    return sorted(names)


def list_folder(root: str | os.PathLike) -> ImageList:
    root = Path(root).resolve()
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ConfigError(f"image folder {str(root)!r} has no class subfolders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _images_in(root / name)
        if not files:
            raise ConfigError(f"class folder {str(root / name)!r} holds no images "
                              f"({', '.join(IMAGE_SUFFIXES)}); every class needs at least one")
        paths += [str(root / name / file) for file in files]
        labels += [label] * len(files)
    return ImageList(tuple(paths), np.asarray(labels, np.int64), tuple(classes))


def read_list(path: str | os.PathLike) -> ImageList:
    """A CSV of ``path,label`` rows; paths are relative to the file's folder unless absolute."""
    path = Path(path).resolve()
    paths, labels = [], []
    try:
        with open(path, newline="") as lines:
            for number, row in enumerate(csv.reader(lines), start=1):
                if number == 1 and [cell.strip().lower() for cell in row] == ["path", "label"]:
                    continue
                paths.append(_list_entry(path, number, row))
                labels.append(_list_label(path, number, row))
    except OSError as exc:
        raise ConfigError(f"cannot read list file {str(path)!r}: {exc}") from None
    if not paths:
        raise ConfigError(f"list file {str(path)!r} lists no images")
    return ImageList(tuple(paths), np.asarray(labels, np.int64), None)


def _list_entry(path: Path, number: int, row: list[str]) -> str:
    if len(row) != 2 or not row[0].strip():
        raise ConfigError(f"{path}, line {number}: expected 'path,label', got {','.join(row)!r:.120}")
    image = (path.parent / row[0].strip()).resolve()
    if not image.is_file():
        raise ConfigError(f"{path}, line {number}: image {str(image)!r} does not exist")
    if image.stat().st_size == 0:
        raise ConfigError(f"{path}, line {number}: image file {str(image)!r} is empty (0 bytes)")
    return str(image)


def _list_label(path: Path, number: int, row: list[str]) -> int:
    try:
        label = int(row[1])
    except ValueError:
        raise ConfigError(f"{path}, line {number}: label {row[1]!r} is not an integer") from None
    if not 0 <= label < 2**31:
        raise ConfigError(f"{path}, line {number}: label {label} is outside [0, 2**31)")
    return label
