"""Nidaan's preprocessing and postprocessing kernels.

Public API::

    preprocess(images, transforms, layout) -> (batch, placements)
    peak_region(heatmap, placement, fraction) -> box in source pixels | None
    regions(heatmap, placement, threshold) -> [Region(box, outline, peak, cells)]
    PixelTransform, InputLayout, Placement
"""

from .geometry import Placement
from .postprocess import Region, peak_region, regions
from .preprocess import InputLayout, configure_cache, preprocess, resolve_backend, to_host
from .transform import PixelTransform

__all__ = [
    "InputLayout",
    "PixelTransform",
    "Region",
    "Placement",
    "configure_cache",
    "peak_region",
    "preprocess",
    "regions",
    "resolve_backend",
    "to_host",
]
