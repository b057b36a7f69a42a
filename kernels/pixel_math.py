"""Per-pixel math, written once and inlined into every backend's kernels.

Each helper is ``@njit(inline="always")``: the CPU kernels (``nidaan.kernels.cpu``) and the CUDA
kernels (``nidaan.kernels.cuda``) compile the same arithmetic. Everything is float32 (constants
are ``np.float32``) so the CUDA kernels carry no fp64 instruction. The NumPy reference in
``nidaan.kernels.reference`` restates the DICOM rules independently, for tests.

The display transform of a stored value v (PS3.3 C.11: Modality LUT, then VOI LUT, then the
MONOCHROME1 inversion) is, for rescale + window, an affine map followed by a clamp or a sigmoid::

    t = v * a + b
    LINEAR, LINEAR_EXACT:  display = clamp(t, 0, 1)
    SIGMOID:               display = 1 / (1 + exp(-t))

with (a, b) folded on the host by :func:`window_coefficients` (inversion included). Images whose
transform is a lookup table (Modality or VOI LUT Sequence) use a precomputed table instead.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: VOI LUT Function codes (PS3.3 C.11.2.1.3); numbers because kernels take no strings.
VOI_LINEAR = 0
VOI_LINEAR_EXACT = 1
VOI_SIGMOID = 2

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(inline="always", cache=True)
def stored_value(raw, mask, sign_bit):
    """The stored value of a raw pixel word: keep Bits Stored bits, sign-extend if signed.

    Bits above Bits Stored may hold garbage (overlays, PS3.5 8.1.1); ``mask`` is
    ``2**BitsStored - 1`` and ``sign_bit`` is ``2**(BitsStored - 1)`` for signed pixels, else 0.
    """
    v = np.int32(raw) & mask
    return (v ^ sign_bit) - sign_bit


@njit(inline="always", cache=True)
def linear_display(v, a, b):
    """Display value in [0, 1] of ``v`` under a folded LINEAR or LINEAR_EXACT window (a, b)."""
    return min(max(np.float32(v) * a + b, _ZERO), _ONE)


@njit(inline="always", cache=True)
def sigmoid_display(v, a, b):
    """Display value in (0, 1) of ``v`` under a folded SIGMOID window (a, b)."""
    return _ONE / (_ONE + math.exp(-(np.float32(v) * a + b)))


@njit(inline="always", cache=True)
def display_affine(v, a, b, sigmoid):
    """Display value of a stored value ``v`` under the folded transform (a, b)."""
    if sigmoid:
        return sigmoid_display(v, a, b)
    return linear_display(v, a, b)


@njit(inline="always", cache=True)
def is_padding(v, pad_lo, pad_hi):
    """Whether a stored value is Pixel Padding Value (or within the padding range), C.7.5.1.1.2."""
    return pad_lo <= v <= pad_hi


@njit(cache=True)
def window_coefficients(slope, intercept, centre, width, function, invert):
    """Fold rescale (C.11.1.1.2), the VOI window (C.11.2.1.2/3) and inversion into (a, b, sigmoid).

    LINEAR:       y = ((m - (c - 0.5)) / (w - 1) + 0.5) clamped; w = 1 is a step at c - 0.5
    LINEAR_EXACT: y = ((m - c) / w + 0.5) clamped
    SIGMOID:      y = 1 / (1 + exp(-4 (m - c) / w))
    where m = v * slope + intercept. Inversion (MONOCHROME1) maps y to 1 - y, which for the
    clamped forms is clamp(1 - t) and for the sigmoid negates t.
    """
    if function == VOI_SIGMOID:
        a = 4.0 * slope / width
        b = 4.0 * (intercept - centre) / width
        if invert:
            a, b = -a, -b
        return np.float32(a), np.float32(b), True
    if function == VOI_LINEAR_EXACT:
        a = slope / width
        b = (intercept - centre) / width + 0.5
    elif width <= 1.0:
        # A step at c - 0.5: 0 at or below, 1 above. A ramp 1/1000 unit wide reproduces it for
        # modality values that are not within 1/1000 of the step (integer values never are, for
        # an integer centre, since the step sits at a half-integer).
        a = slope * 1.0e3
        b = (intercept - (centre - 0.5)) * 1.0e3
    else:
        a = slope / (width - 1.0)
        b = (intercept - (centre - 0.5)) / (width - 1.0) + 0.5
    if invert:
        a, b = -a, 1.0 - b
    return np.float32(a), np.float32(b), False
