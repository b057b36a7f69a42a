"""Per-pixel math, written once and inlined into every backend's kernel.

Each helper is ``@njit(inline="always")`` so the CPU kernel (``nidaan.kernels.cpu``) and, later,
the CUDA kernel compile the same arithmetic. The NumPy reference in ``nidaan.kernels.reference``
restates it independently for tests.
"""

from __future__ import annotations

import math

from numba import njit

#: VOI LUT Function codes (PS3.3 C.11.2.1.3); numbers because kernels take no strings.
VOI_LINEAR = 0
VOI_LINEAR_EXACT = 1
VOI_SIGMOID = 2


@njit(inline="always", cache=True)
def modality_value(stored: float, slope: float, intercept: float) -> float:
    """Modality LUT as a rescale (PS3.3 C.11.1.1.2): output units = stored * slope + intercept."""
    return stored * slope + intercept


@njit(inline="always", cache=True)
def voi_value(x: float, centre: float, width: float, function: int) -> float:
    """VOI window to display values in [0, 1] (PS3.3 C.11.2.1.2 and C.11.2.1.3)."""
    if function == VOI_SIGMOID:
        return 1.0 / (1.0 + math.exp(-4.0 * (x - centre) / width))
    if function == VOI_LINEAR_EXACT:
        lo = centre - width / 2.0
        hi = centre + width / 2.0
        if x <= lo:
            return 0.0
        if x > hi:
            return 1.0
        return (x - centre) / width + 0.5
    # LINEAR (C.11.2.1.2.1): a window of width 1 is a threshold at centre - 0.5.
    if width <= 1.0:
        return 0.0 if x < centre - 0.5 else 1.0
    lo = centre - 0.5 - (width - 1.0) / 2.0
    hi = centre - 0.5 + (width - 1.0) / 2.0
    if x <= lo:
        return 0.0
    if x > hi:
        return 1.0
    return (x - (centre - 0.5)) / (width - 1.0) + 0.5


@njit(inline="always", cache=True)
def display_value(
    stored: float,
    slope: float,
    intercept: float,
    centre: float,
    width: float,
    function: int,
    invert: bool,
) -> float:
    """Stored pixel value to a display value in [0, 1], 0 = black.

    MONOCHROME1 images show their lowest value as white (PS3.3 C.7.6.3.1.2), so they are inverted
    after the VOI transform.
    """
    y = voi_value(modality_value(stored, slope, intercept), centre, width, function)
    return 1.0 - y if invert else y
