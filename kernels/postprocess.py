"""Postprocessing: a model's coarse heatmap back to a region in source-image pixels."""

from __future__ import annotations

from collections import deque

import numpy as np

from .geometry import Placement


def peak_region(
    heatmap: np.ndarray, placement: Placement, fraction: float = 0.5
) -> tuple[float, float, float, float] | None:
    """Bounding box, in source pixels, of the heatmap blob around its peak.

    The blob is the 4-connected component of cells >= ``fraction`` x peak that contains the peak.
    Cells are mapped back through the resize and letterbox (``placement``); the box is clipped to
    the image and is None when the blob lies wholly in the padding. Returns
    ``(x_min, y_min, x_max, y_max)`` in SCOORD convention (corner origin, PS3.3 C.18.6.1.1).
    """
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {heatmap.shape}")
    hm = np.asarray(heatmap, dtype=np.float64)
    h, w = hm.shape
    pi, pj = np.unravel_index(int(np.argmax(hm)), hm.shape)
    cut = hm[pi, pj] * fraction
    seen = np.zeros(hm.shape, dtype=bool)
    seen[pi, pj] = True
    queue = deque([(pi, pj)])
    i0 = i1 = pi
    j0 = j1 = pj
    while queue:
        i, j = queue.popleft()
        i0, i1, j0, j1 = min(i0, i), max(i1, i), min(j0, j), max(j1, j)
        for ni, nj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            if 0 <= ni < h and 0 <= nj < w and not seen[ni, nj] and hm[ni, nj] >= cut:
                seen[ni, nj] = True
                queue.append((ni, nj))
    cell_h = placement.out_height / h
    cell_w = placement.out_width / w
    x_min, y_min = placement.to_source(j0 * cell_w, i0 * cell_h)
    x_max, y_max = placement.to_source((j1 + 1) * cell_w, (i1 + 1) * cell_h)
    if x_max - x_min < 1e-6 or y_max - y_min < 1e-6:
        return None
    return (x_min, y_min, x_max, y_max)
