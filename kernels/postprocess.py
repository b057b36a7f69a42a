"""Postprocessing: a model's coarse heatmap back to regions in source-image pixels.

Heatmap cells are mapped back through the resize and letterbox (a ``Placement``); coordinates are
SCOORD-style continuous pixel coordinates with (0, 0) at the top left corner of the top left pixel
(PS3.3 C.18.6.1.1), clipped to the image.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .geometry import Placement

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """One connected blob of heatmap cells, in source pixels."""

    box: Box  # (x_min, y_min, x_max, y_max)
    outline: tuple[tuple[float, float], ...]  # closed convex outline, first point repeated
    peak: float  # the highest heatmap value in the blob
    cells: int  # how many heatmap cells it covers


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean grid, each a list of (row, col) cells."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for i0, j0 in zip(*np.nonzero(mask), strict=True):
        if seen[i0, j0]:
            continue
        seen[i0, j0] = True
        queue, cells = deque([(int(i0), int(j0))]), []
        while queue:
            i, j = queue.popleft()
            cells.append((i, j))
            for ni, nj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= ni < h and 0 <= nj < w and mask[ni, nj] and not seen[ni, nj]:
                    seen[ni, nj] = True
                    queue.append((ni, nj))
        out.append(cells)
    return out


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull (Andrew's monotone chain), counter-clockwise, without repeating the first."""
    pts = sorted(set(points))
    if len(pts) <= 2:
        return pts

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def regions(
    heatmap: np.ndarray, placement: Placement, threshold: float, min_cells: int = 1
) -> list[Region]:
    """Every connected blob of cells >= ``threshold``, mapped to source pixels, highest first.

    Blobs wholly in the letterbox padding, or smaller than ``min_cells``, are dropped.
    """
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {heatmap.shape}")
    hm = np.asarray(heatmap, dtype=np.float64)
    cell_h = placement.out_height / hm.shape[0]
    cell_w = placement.out_width / hm.shape[1]
    found = []
    for cells in _components(hm >= threshold):
        if len(cells) < min_cells:
            continue
        corners = [
            placement.to_source((j + dj) * cell_w, (i + di) * cell_h)
            for i, j in cells
            for di in (0, 1)
            for dj in (0, 1)
        ]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        box = (min(xs), min(ys), max(xs), max(ys))
        if box[2] - box[0] < 1e-6 or box[3] - box[1] < 1e-6:
            continue  # wholly in the padding: clipping collapsed it
        hull = _hull(corners)
        peak = max(float(hm[i, j]) for i, j in cells)
        found.append(Region(box, tuple(hull + hull[:1]), peak, len(cells)))
    return sorted(found, key=lambda r: -r.peak)


def peak_region(heatmap: np.ndarray, placement: Placement, fraction: float = 0.5) -> Box | None:
    """Bounding box, in source pixels, of the blob around the heatmap's peak.

    The blob is the connected component, among cells >= ``fraction`` x peak, that holds the peak;
    None when it lies wholly in the letterbox padding.
    """
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {heatmap.shape}")
    hm = np.asarray(heatmap, dtype=np.float64)
    peak = float(hm.max())
    for region in regions(hm, placement, peak * fraction):
        if region.peak == peak:
            return region.box
    return None
