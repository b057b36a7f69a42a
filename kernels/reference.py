"""Plain NumPy reference of the preprocessing, for tests only (slow, obviously correct).

It restates the DICOM rules (PS3.3 C.7.6.3, C.11) directly rather than reusing the kernels'
folded coefficients, so a mistake in either shows up as a difference.
"""

from __future__ import annotations

import numpy as np

from .geometry import Placement, taps
from .transform import LookupTable, PixelTransform


def stored_values(src: np.ndarray, t: PixelTransform) -> np.ndarray:
    """Raw words to stored values: keep Bits Stored bits, sign-extend signed pixels."""
    t = t.for_array(src.dtype)
    bits = t.bits_stored or 16
    v = src.astype(np.int64)
    if bits < 32:
        v = v & ((1 << bits) - 1)
        if t.signed:
            v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    return v


def _lut(values: np.ndarray, lut: LookupTable) -> np.ndarray:
    idx = np.clip(np.floor(values).astype(np.int64) - lut.first_mapped, 0, lut.data.size - 1)
    return lut.data.astype(np.float64)[idx]


def display(
    src: np.ndarray,
    t: PixelTransform,
    window: tuple[float, float] | None = None,
    pad_value: float = 0.0,
) -> np.ndarray:
    """Stored values to display values in [0, 1] (0 = black), following PS3.3 C.11."""
    t = t.for_array(src.dtype)
    v = stored_values(src, t)
    m = _lut(v, t.modality_lut) if t.modality_lut is not None else v * t.slope + t.intercept
    if t.voi_lut is not None and window is None:
        y = _lut(m, t.voi_lut) / ((1 << t.voi_lut.bits) - 1)
    else:
        if window is not None:
            c, w = window
        elif t.window_centre is not None and t.window_width is not None:
            c, w = t.window_centre, t.window_width
        else:
            # Pixel Padding is not image data (PS3.3 C.7.5.1.1.2): the image's own range leaves
            # it out.
            data = m
            if t.padding is not None:
                data = m[~((v >= t.padding[0]) & (v <= t.padding[1]))]
            lo, hi = (data.min(), data.max()) if data.size else (0.0, 0.0)
            c, w = (lo + hi) / 2.0 + 0.5, max(hi - lo + 1.0, 1.0)
        function = t.voi_function
        if function == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (m - c) / w))
        elif function == "LINEAR_EXACT":
            y = np.clip((m - c) / w + 0.5, 0.0, 1.0)
        elif w <= 1.0:
            y = (m > c - 0.5).astype(np.float64)
        else:
            y = np.clip((m - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    if t.invert:
        y = 1.0 - y
    if t.padding is not None:
        y = np.where((v >= t.padding[0]) & (v <= t.padding[1]), pad_value, y)
    return y


def _resample_matrix(n_src: int, n_out: int) -> np.ndarray:
    start, count, weights = taps(n_src, n_out)
    m = np.zeros((n_out, n_src))
    for o in range(n_out):
        for k in range(count[o]):
            m[o, start[o] + k] = weights[o, k]
    return m


def preprocess_one(
    src: np.ndarray,
    t: PixelTransform,
    p: Placement,
    pad: float,
    mean: float,
    std: float,
    windows: tuple[tuple[float, float], ...] = (),
) -> np.ndarray:
    """One image to normalised model input channels, shape (C, out_height, out_width)."""
    ry = _resample_matrix(p.src_height, p.height)
    rx = _resample_matrix(p.src_width, p.width)
    channels = []
    for window in windows or (None,):
        d = display(src, t, window, pad)
        out = np.full((p.out_height, p.out_width), pad, dtype=np.float64)
        out[p.offset_y : p.offset_y + p.height, p.offset_x : p.offset_x + p.width] = ry @ d @ rx.T
        channels.append((out - mean) / std)
    return np.stack(channels).astype(np.float32)
