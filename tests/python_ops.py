"""Per-sample Python ops for the tests (``op = "python"``), imported by the workers as
'python_ops:NAME' (the tests folder is on their path)."""

import time

import numpy as np
from PIL import Image


def rotate(sample, rng, max_degrees=30.0):
    """Rotate the image by a random angle from ``rng`` with Pillow; the other fields pass."""
    angle = rng.uniform(-max_degrees, max_degrees)
    image = Image.fromarray(sample["features"]).rotate(angle, resample=Image.BILINEAR)
    return {**sample, "features": np.asarray(image)}


def fails_on(sample, rng, label):
    if int(sample["labels"]) == label:
        raise RuntimeError(f"cannot process label {label}")
    return sample


def drops_labels(sample, rng):
    return {"features": sample["features"]}


def returns_a_list(sample, rng):
    return [sample["features"], sample["labels"]]


def shrinks_after_sample_zero(sample, rng, label):
    """Right for sample 0 (which fixes the shapes), a smaller image for ``label``."""
    if int(sample["labels"]) == label:
        return {**sample, "features": sample["features"][1:]}
    return sample


def slow(sample, rng, seconds):
    """A costly op: the loader, not the model, sets the pace."""
    time.sleep(seconds)
    return sample
