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
    #: The blob's heatmap cells as (row, column), its strongest cell first.
    members: tuple[tuple[int, int], ...] = ()


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
        strongest = max(cells, key=lambda c: (float(hm[c]), -c[0], -c[1]))
        members = (strongest, *sorted(c for c in cells if c != strongest))
        found.append(Region(box, tuple(hull + hull[:1]), float(hm[strongest]), len(cells), members))
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


def _dilate(mask: np.ndarray, diagonal: bool) -> np.ndarray:
    """``mask`` grown by one cell: to its 4-neighbours, or all 8 with ``diagonal``."""
    p = np.pad(mask, 1)
    out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    if diagonal:
        out |= p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
    return out


def _flood(candidates: np.ndarray, seed: int) -> np.ndarray:
    """The 4-connected component of ``candidates`` holding flat index ``seed``."""
    grown = np.zeros_like(candidates)
    grown.flat[seed] = True
    while True:
        more = _dilate(grown, diagonal=False) & candidates
        if np.array_equal(more, grown):
            return grown
        grown = more


def refine_outline(
    image: np.ndarray,
    heat_shape: tuple[int, int],
    region: Region,
    placement: Placement,
    above: float,
) -> tuple[tuple[float, float], ...] | None:
    """A heatmap blob's outline sharpened to the pixels of the model input.

    ``image`` is one channel of the model input (``out_height`` x ``out_width``, in display
    values, [0, 1] after the VOI window) and ``heat_shape`` the heatmap's (rows, columns). The
    lesion is a 4-connected set of input pixels above ``above``, within the blob's cells grown by
    one cell (8-connected) and inside the image (not the letterbox padding): the one that covers
    most of the blob's strongest cell. Returns its convex outline (around its pixels) in source
    pixels, closed, or None when the strongest cell has no pixel above ``above``.
    Plain NumPy: a flood fill by repeated dilation over a crop of a few cells.
    """
    if image.ndim != 2 or image.shape != (placement.out_height, placement.out_width):
        raise ValueError(
            f"input channel has shape {image.shape}, the placement "
            f"{(placement.out_height, placement.out_width)}"
        )
    if not region.members:
        return None
    gh, gw = heat_shape
    h, w = image.shape
    cell_h, cell_w = h / gh, w / gw
    cells = np.zeros((gh, gw), dtype=bool)
    for i, j in region.members:
        cells[i, j] = True
    cells = _dilate(cells, diagonal=True)
    rows = np.minimum(((np.arange(h) + 0.5) / cell_h).astype(np.int64), gh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) / cell_w).astype(np.int64), gw - 1)
    allowed = cells[rows[:, None], cols[None, :]]
    inside = np.zeros_like(allowed)
    inside[
        placement.offset_y : placement.offset_y + placement.height,
        placement.offset_x : placement.offset_x + placement.width,
    ] = True
    allowed &= inside
    ys, xs = np.nonzero(allowed)
    if ys.size == 0:
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    crop = np.asarray(image[y0:y1, x0:x1], dtype=np.float64)
    candidates = allowed[y0:y1, x0:x1] & (crop > above)
    # The lesion is the component covering most of the strongest cell (a vessel crossing a
    # corner of the cell can be brighter, but covers less of it); ties go to the brighter one.
    si, sj = region.members[0]
    in_cell = (rows[y0:y1, None] == si) & (cols[None, x0:x1] == sj)
    left = in_cell & candidates
    grown: np.ndarray | None = None
    best: tuple[int, float] = (0, -np.inf)
    while left.any():
        seed = int(np.argmax(np.where(left, crop, -np.inf)))
        component = _flood(candidates, seed)
        left &= ~component
        score = (int((component & in_cell).sum()), float(crop.flat[seed]))
        if score > best:
            grown, best = component, score
    if grown is None:
        return None
    # Hull of the set's edge midpoints: per row the outer edges of its first and last pixel,
    # per column those of its top and bottom one. It spans the pixels' full extent along rows
    # and columns without the corners of the outermost pixels, which would stick out of a round
    # lesion (and make its measured diameter up to a pixel's diagonal too long).
    points = []
    for r in np.nonzero(grown.any(axis=1))[0]:
        line = np.nonzero(grown[r])[0]
        y = float(y0 + r) + 0.5
        points += [(float(x0 + line[0]), y), (float(x0 + line[-1] + 1), y)]
    for c in np.nonzero(grown.any(axis=0))[0]:
        line = np.nonzero(grown[:, c])[0]
        x = float(x0 + c) + 0.5
        points += [(x, float(y0 + line[0])), (x, float(y0 + line[-1] + 1))]
    points = [placement.to_source(x, y) for x, y in points]
    hull = _hull(points)
    if len(hull) < 3:
        return None
    return tuple(hull + hull[:1])
