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


#: XOR that maps a signed stored value's bit pattern to an unsigned one with the same order.
SIGNED_FLIP = 0x80000000


@njit(inline="always", cache=True)
def stored_bits(raw, mask, sign_bit):
    """The stored value of a raw pixel word as a uint32 bit pattern (two's complement if signed).

    Bits above Bits Stored may hold garbage (overlays, PS3.5 8.1.1): ``mask`` keeps Bits Stored
    bits (``2**BitsStored - 1``, all ones for 32) and ``sign_bit`` (``2**(BitsStored - 1)`` for
    signed pixels narrower than 32 bits, else 0) sign-extends. Unsigned 32-bit arithmetic keeps
    every value of a uint32 image exact; :func:`stored_float` and :func:`stored_int` read it.
    """
    x = np.uint32(np.uint32(raw) & np.uint32(mask))
    s = np.uint32(sign_bit)
    return np.uint32(np.uint32(x ^ s) - s)


@njit(inline="always", cache=True)
def stored_float(x, signed):
    """The float32 value of a :func:`stored_bits` pattern (a select, not a branch)."""
    as_signed = np.float32(np.int32(x))
    as_unsigned = np.float32(x)
    return as_signed if signed else as_unsigned


@njit(inline="always", cache=True)
def stored_int(x):
    """A :func:`stored_bits` pattern as int32: exact for the <= 16-bit images tables serve."""
    return np.int32(x)


@njit(inline="always", cache=True)
def padding_key(x, flip):
    """A stored value's pattern in unsigned order (``flip`` is SIGNED_FLIP for signed pixels),
    so one unsigned comparison tests the Pixel Padding range for either signedness."""
    return np.uint32(x ^ np.uint32(flip))


@njit(inline="always", cache=True)
def is_padding(key, pad_lo, pad_hi):
    """Whether a :func:`padding_key` is within the Pixel Padding Value range, C.7.5.1.1.2
    (``pad_lo``/``pad_hi`` are keys too; lo > hi means no padding)."""
    return np.uint32(pad_lo) <= key and key <= np.uint32(pad_hi)


@njit(inline="always", cache=True)
def linear_display(v, o, a, b):
    """Display value in [0, 1] of ``v`` under a folded LINEAR or LINEAR_EXACT window (o, a, b).

    ``v - o`` is exact for values below 2**24 (``o`` is a stored value near the window), so a
    narrow window far from zero keeps its precision.
    """
    return min(max((v - o) * a + b, _ZERO), _ONE)


@njit(inline="always", cache=True)
def sigmoid_display(v, o, a, b):
    """Display value in (0, 1) of ``v`` under a folded SIGMOID window (o, a, b)."""
    return _ONE / (_ONE + math.exp(-((v - o) * a + b)))


@njit(inline="always", cache=True)
def display_affine(v, o, a, b, sigmoid):
    """Display value of a stored value ``v`` (float32) under the folded transform (o, a, b)."""
    if sigmoid:
        return sigmoid_display(v, o, a, b)
    return linear_display(v, o, a, b)


@njit(cache=True)
def window_coefficients(slope, intercept, centre, width, function, invert, offset=0.0):
    """Fold rescale (C.11.1.1.2), the VOI window (C.11.2.1.2/3) and inversion into (a, b, sigmoid)
    for ``t = (v - offset) * a + b``.

    LINEAR:       y = ((m - (c - 0.5)) / (w - 1) + 0.5) clamped; w = 1 is a step at c - 0.5
    LINEAR_EXACT: y = ((m - c) / w + 0.5) clamped
    SIGMOID:      y = 1 / (1 + exp(-4 (m - c) / w))
    where m = v * slope + intercept = (v - offset) * slope + m0, m0 = offset * slope + intercept.
    Folding around a stored value ``offset`` near the window (rather than 0) keeps float32
    precision for narrow windows at large values. Inversion (MONOCHROME1) maps y to 1 - y, which
    for the clamped forms is clamp(1 - t) and for the sigmoid negates t.
    """
    m0 = offset * slope + intercept
    if function == VOI_SIGMOID:
        a = 4.0 * slope / width
        b = 4.0 * (m0 - centre) / width
        if invert:
            a, b = -a, -b
        return np.float32(a), np.float32(b), True
    if function == VOI_LINEAR_EXACT:
        a = slope / width
        b = (m0 - centre) / width + 0.5
    elif width <= 1.0:
        # A step at c - 0.5: 0 at or below, 1 above. A ramp 1/1000 unit wide reproduces it for
        # modality values that are not within 1/1000 of the step (integer values never are, for
        # an integer centre, since the step sits at a half-integer).
        a = slope * 1.0e3
        b = (m0 - (centre - 0.5)) * 1.0e3
    else:
        a = slope / (width - 1.0)
        b = (m0 - (centre - 0.5)) / (width - 1.0) + 0.5
    if invert:
        a, b = -a, 1.0 - b
    return np.float32(a), np.float32(b), False
