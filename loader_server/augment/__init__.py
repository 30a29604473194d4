"""Numba augmentation kernels and the pipeline that composes them."""

from .ops import OPS
from .pipeline import Pipeline

__all__ = ["OPS", "Pipeline"]
