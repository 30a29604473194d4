"""The standard workload's augmentation as a per-sample Python op (``op = "python"``).

``crop_flip_normalize`` is what ringfeed's workers call once per sample with
``{"op": "python", "fn": "python_ops:crop_flip_normalize"}``, and what the
PyTorch DataLoader contender's ``Dataset.__getitem__`` calls: the same code on
both paths. The numpy work itself is ``benchlib.augment_sample``, which the
classic generator and the Keras PyDataset run too. This folder is on the
benchmark's ``sys.path``, which spawned servers and workers inherit.
"""

from __future__ import annotations

import numpy as np

from benchlib import augment_sample

FN = "python_ops:crop_flip_normalize"


def crop_flip_normalize(sample: dict, rng: np.random.Generator) -> dict:
    """A random 56x56 crop (offsets from ``rng``), a flip with probability 1/2 (from ``rng``),
    then (x/255 - mean)/std: uint8 (64, 64, 3) -> float32 (56, 56, 3). Other fields pass."""
    return {**sample, "features": augment_sample(sample["features"], rng)}
