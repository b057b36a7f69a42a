"""Public preprocessing entry point: many images of any size into one model batch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import cpu
from .geometry import Placement, taps
from .transform import PixelTransform


@dataclass(frozen=True)
class InputLayout:
    """The model input a batch is made for."""

    height: int
    width: int
    resize: str = "letterbox"
    pad_value: float = 0.0
    mean: float = 0.0
    std: float = 1.0


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` is ``cuda`` when a CUDA GPU is usable, else ``cpu``.

    Only the CPU backend exists yet; asking for ``cuda`` explicitly is an error rather than a
    silent fallback, so a deployment that expects a GPU notices.
    """
    if backend in ("auto", "cpu"):
        return "cpu"
    raise ValueError(f"kernel backend {backend!r} is not available on this build")


def window_for(src: np.ndarray, t: PixelTransform) -> tuple[float, float]:
    """The (centre, width) VOI window to apply: the header's, or the image's own value range."""
    if t.window_centre is not None and t.window_width is not None:
        return t.window_centre, t.window_width
    lo, hi = cpu.min_max(src)
    a, b = lo * t.slope + t.intercept, hi * t.slope + t.intercept
    lo_m, hi_m = min(a, b), max(a, b)
    return (lo_m + hi_m) / 2.0 + 0.5, max(hi_m - lo_m + 1.0, 1.0)


def preprocess(
    images: Sequence[np.ndarray],
    transforms: Sequence[PixelTransform],
    layout: InputLayout,
    *,
    out: np.ndarray | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, list[Placement]]:
    """Turn 2-D stored-value images into a float32 NCHW batch (C = 1) and where each landed.

    Each image is read once: modality LUT, VOI window, MONOCHROME1 inversion, resampling
    (area average when shrinking, bilinear when enlarging), padding and normalisation are fused.
    ``out`` may be a preallocated ``(N, 1, H, W)`` float32 array to fill.
    """
    resolve_backend(backend)
    if len(images) != len(transforms):
        raise ValueError(f"{len(images)} images but {len(transforms)} transforms")
    shape = (len(images), 1, layout.height, layout.width)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape[0] < len(images) or out.shape[1:] != shape[1:] or out.dtype != np.float32:
        raise ValueError(f"output buffer {out.shape}/{out.dtype} does not fit {shape}/float32")
    placements = []
    for n, (src, t) in enumerate(zip(images, transforms, strict=True)):
        if src.ndim != 2:
            raise ValueError(f"image {n} has shape {src.shape}; expected one 2-D frame")
        if not src.dtype.isnative:
            src = src.astype(src.dtype.newbyteorder("="))
        p = Placement.fit(src.shape[0], src.shape[1], layout.height, layout.width, layout.resize)
        centre, width = window_for(src, t)
        cpu.resample_normalise(
            np.ascontiguousarray(src),
            out[n, 0],
            taps(p.src_height, p.height),
            taps(p.src_width, p.width),
            p.offset_y,
            p.offset_x,
            t.slope,
            t.intercept,
            centre,
            width,
            t.voi_code,
            t.invert,
            layout.pad_value,
            layout.mean,
            layout.std,
        )
        placements.append(p)
    return out, placements


def configure_cache(cache_dir: str) -> None:
    """Point Numba's kernel cache at ``cache_dir`` (must run before the kernels first compile)."""
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = cache_dir
