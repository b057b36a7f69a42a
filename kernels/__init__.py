"""Nidaan's preprocessing and postprocessing kernels.

Public API::

    preprocess(images, transforms, layout) -> (batch, placements)
    peak_region(heatmap, placement, fraction) -> box in source pixels | None
    regions(heatmap, placement, threshold) -> [Region(box, outline, peak, cells, members)]
    refine_outline(channel, heat_shape, region, placement, above) -> outline in source pixels | None
    PixelTransform, InputLayout, Placement

Compiled CPU kernels are cached on disk where ``NUMBA_CACHE_DIR`` says when this package is
imported (Numba fixes each cached kernel's directory as the kernel is decorated): set it before
importing this package or Numba; :func:`configure_cache` checks that it was.
"""

from .geometry import Placement
from .postprocess import Region, peak_region, refine_outline, regions
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
    "refine_outline",
    "regions",
    "resolve_backend",
    "to_host",
]
