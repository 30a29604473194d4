"""Numba augmentation kernels and the pipeline that composes them."""

from .ops import OPS
from .pipeline import Pipeline
from .sample import SamplePipeline

__all__ = ["OPS", "Pipeline", "SamplePipeline"]
