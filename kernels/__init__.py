"""Nidaan's preprocessing and postprocessing kernels.

Public API::

    preprocess(images, transforms, layout) -> (batch, placements)
    peak_region(heatmap, placement, fraction) -> box in source pixels | None
    PixelTransform, InputLayout, Placement
"""

from .geometry import Placement
from .postprocess import peak_region
from .preprocess import InputLayout, configure_cache, preprocess, resolve_backend, to_host
from .transform import PixelTransform

__all__ = [
    "InputLayout",
    "PixelTransform",
    "Placement",
    "configure_cache",
    "peak_region",
    "preprocess",
    "resolve_backend",
    "to_host",
]
