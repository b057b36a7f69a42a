"""Public preprocessing entry point: many images of any size into one model batch."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cpu
from .geometry import Placement, taps
from .pixel_math import SIGNED_FLIP, window_coefficients
from .transform import PixelTransform

BACKENDS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class InputLayout:
    """The model input a batch is made for.

    ``windows`` makes one channel per (centre, width) VOI window, e.g. lung, mediastinum and bone
    for CT; empty means one channel with the image's own VOI (header window or LUT).
    """

    height: int
    width: int
    resize: str = "letterbox"
    pad_value: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    windows: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"model input {self.height}x{self.width} is empty")
        if self.std <= 0:
            raise ValueError("std must be positive")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"output dtype {self.dtype!r} is neither float32 nor float16")
        for c, w in self.windows:
            if w <= 0:
                raise ValueError(f"window ({c}, {w}) has no width")

    @property
    def channels(self) -> int:
        return max(1, len(self.windows))

    def shape(self, n: int) -> tuple[int, int, int, int]:
        """NCHW shape of a batch of ``n`` images."""
        return (n, self.channels, self.height, self.width)


def cuda_available() -> bool:
    """Whether a CUDA GPU can run the CUDA kernels (CuPy and Numba both see a device)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba-cuda missing or no driver: no GPU path
        return False


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` is ``cuda`` when a CUDA GPU is usable, else ``cpu``; ``cuda`` without one fails."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if backend == "cuda":
        raise ValueError("kernel backend 'cuda' was asked for but no CUDA GPU is usable")
    return "cpu"


@dataclass(frozen=True)
class ImagePlan:
    """Everything a kernel needs for one image, prepared on the host (small arrays only)."""

    placement: Placement
    ytaps: tuple[np.ndarray, np.ndarray, np.ndarray]
    xtaps: tuple[np.ndarray, np.ndarray]
    xfactor: int  # whole-number horizontal shrink factor (2, 4 or 8), else 0
    coeffs: np.ndarray  # (C, 2) float32: folded (a, b) per channel, for t = (v - offset) a + b
    offset: np.float32  # a stored value near the first window, subtracted before (a, b)
    sigmoid: bool
    table: np.ndarray  # (C, n) float32 display table, or (1, 1) unused
    use_table: bool
    vmin: int
    mask: int
    sign_bit: int
    signed: bool
    #: Pixel Padding range as ``pixel_math.padding_key`` keys (unsigned order); lo > hi: none.
    pad_lo: int
    pad_hi: int

    @property
    def flip(self) -> int:
        """The XOR that turns this image's stored values into padding keys."""
        return SIGNED_FLIP if self.signed else 0

    @property
    def padded(self) -> bool:
        """Whether some stored value is Pixel Padding."""
        return self.pad_lo <= self.pad_hi

    @property
    def plain(self) -> bool:
        """Unsigned, unpadded, LINEAR windows, no table: the CPU backend's fastest kernel."""
        return not self.signed and not self.padded and not self.sigmoid and not self.use_table


@functools.lru_cache(maxsize=64)
def _taps32(n_src: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start, count, weights = taps(n_src, n_out)
    return start, count, weights.astype(np.float32)


@functools.lru_cache(maxsize=64)
def fixed_taps(n_src: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal taps as (start, weights[tap, out]) with one tap count for every output.

    Outputs with fewer taps get zero weights; the kernels read past the row's last pixel only
    with those, into zeroed scratch.
    """
    start, count, weights = taps(n_src, n_out)
    # As many taps as the widest output needs: ``taps`` leaves room for one more than a whole
    # factor uses (2048 -> 512 has 4 taps, not 5), and every extra tap is a read per pixel.
    k = int(count.max())
    return start, np.ascontiguousarray(weights[:, :k].T.astype(np.float32))


def _table(t: PixelTransform, centre: float, width: float) -> np.ndarray:
    if (t.bits_stored or 16) > 16:
        raise ValueError("LUT Sequences with more than 16 Bits Stored are not supported")
    vmin, vmax = t.value_range
    m, v = t.modality_lut, t.voi_lut
    empty = np.zeros(1, np.float32)
    return cpu.build_table(
        vmin,
        vmax,
        t.slope,
        t.intercept,
        empty if m is None else m.data.astype(np.float32),
        0 if m is None else m.first_mapped,
        m is not None,
        centre,
        width,
        t.voi_code,
        empty if v is None else v.data.astype(np.float32),
        0 if v is None else v.first_mapped,
        1.0 if v is None else 1.0 / ((1 << v.bits) - 1),
        v is not None,
        t.invert,
    )


def _whole_factor(n_src: int, n_out: int) -> int:
    """The shrink factor when it is exactly 2, 4 or 8 (the CPU kernel's fast cases), else 0."""
    f, rest = divmod(n_src, n_out)
    return f if rest == 0 and f in (2, 4, 8) else 0


def padding_keys(t: PixelTransform) -> tuple[int, int]:
    """The transform's Pixel Padding range as padding keys, clipped to the values Bits Stored
    allows; (1, 0) when there is none (or none of it can occur)."""
    if t.padding is None:
        return 1, 0
    vmin, vmax = t.value_range
    lo, hi = max(t.padding[0], vmin), min(t.padding[1], vmax)
    if lo > hi:
        return 1, 0
    if t.signed:
        return (lo & 0xFFFFFFFF) ^ SIGNED_FLIP, (hi & 0xFFFFFFFF) ^ SIGNED_FLIP
    return lo, hi


def _offset(t: PixelTransform, centre: float) -> float:
    """The stored value whose modality value is nearest ``centre`` (within the value range)."""
    if t.slope == 0:
        return 0.0
    vmin, vmax = t.value_range
    return float(min(max(round((centre - t.intercept) / t.slope), vmin), vmax))


def plan_image(src: np.ndarray, t: PixelTransform, layout: InputLayout) -> ImagePlan:
    """Geometry, taps and the folded pixel transform of one image."""
    if src.ndim != 2:
        raise ValueError(f"image has shape {src.shape}; expected one 2-D frame")
    if src.dtype.kind not in "iu" or src.dtype.itemsize > 4:
        raise ValueError(f"pixel type {src.dtype} is not an integer type of at most 32 bits")
    p = Placement.fit(src.shape[0], src.shape[1], layout.height, layout.width, layout.resize)
    t = t.for_array(src.dtype)
    signed = bool(t.signed)
    pad_lo, pad_hi = padding_keys(t)
    windows = list(layout.windows)
    if not windows:
        if t.window_centre is not None and t.window_width is not None:
            windows = [(t.window_centre, t.window_width)]
        elif t.voi_lut is None:
            flip = SIGNED_FLIP if signed else 0
            lo, hi = cpu.min_max(src, t.mask, t.sign_bit, signed, flip, pad_lo, pad_hi)
            if lo > hi:  # nothing but padding: any window will do
                lo = hi = 0
            a, b = lo * t.slope + t.intercept, hi * t.slope + t.intercept
            lo_m, hi_m = min(a, b), max(a, b)
            windows = [((lo_m + hi_m) / 2.0 + 0.5, max(hi_m - lo_m + 1.0, 1.0))]
        else:
            windows = [(0.0, 1.0)]  # unused: the VOI LUT Sequence decides
    use_table = t.needs_table
    coeffs = np.zeros((len(windows), 2), np.float32)
    offset = 0.0 if use_table else _offset(t, windows[0][0])
    sigmoid = False
    if use_table:
        vmin = t.value_range[0]
        table = np.stack(
            [_table(t if not layout.windows else t.with_window(c, w), c, w) for c, w in windows]
        )
    else:
        vmin = 0
        table = np.zeros((1, 1), np.float32)
        for k, (c, w) in enumerate(windows):
            a, b, sigmoid = window_coefficients(
                t.slope, t.intercept, c, w, t.voi_code, t.invert, offset
            )
            coeffs[k] = (a, b)
    return ImagePlan(
        p,
        _taps32(p.src_height, p.height),
        fixed_taps(p.src_width, p.width),
        _whole_factor(p.src_width, p.width),
        coeffs,
        np.float32(offset),
        bool(sigmoid),
        table,
        use_table,
        vmin,
        t.mask,
        t.sign_bit,
        signed,
        pad_lo,
        pad_hi,
    )


def preprocess(
    images: Sequence[np.ndarray],
    transforms: Sequence[PixelTransform],
    layout: InputLayout,
    *,
    out: Any = None,
    backend: str = "auto",
) -> tuple[Any, list[Placement]]:
    """Turn 2-D stored-value images into an NCHW batch and say where each image landed.

    Each image is read once: Bits Stored masking and sign, Pixel Padding, Modality LUT, VOI
    window(s) or LUT, MONOCHROME1 inversion, resampling (area average when shrinking, bilinear when
    enlarging), letterbox padding and normalisation are fused. ``out`` may be a preallocated
    batch to fill (``layout.shape(n)`` and dtype). The CPU backend returns NumPy arrays; the CUDA
    backend returns CuPy arrays on the GPU.
    """
    if len(images) != len(transforms):
        raise ValueError(f"{len(images)} images but {len(transforms)} transforms")
    which = resolve_backend(backend)
    plans = [
        plan_image(np.asarray(src), t, layout) for src, t in zip(images, transforms, strict=True)
    ]
    if which == "cuda":
        from .executor import executor_for

        return run_on_executor(executor_for(), images, plans, layout, out), [
            p.placement for p in plans
        ]
    shape = layout.shape(len(images))
    dtype = np.dtype(layout.dtype)
    if out is None:
        out = np.empty(shape, dtype=dtype)
    elif out.shape[0] < len(images) or out.shape[1:] != shape[1:] or out.dtype != dtype:
        raise ValueError(f"output buffer {out.shape}/{out.dtype} does not fit {shape}/{dtype}")
    # Numba cannot store float16 on the CPU: float16 batches go through a float32 scratch image.
    scratch = None if dtype == np.float32 else np.empty(shape[1:], np.float32)
    inv_std = np.float32(1.0 / layout.std)
    for n, (src, plan) in enumerate(zip(images, plans, strict=True)):
        src = np.asarray(src)
        if not src.dtype.isnative:
            src = src.astype(src.dtype.newbyteorder("="))
        target = out[n] if scratch is None else scratch
        # Every CPU kernel starts with the geometry and ends with the normalisation.
        where = (
            np.ascontiguousarray(src),
            target,
            *plan.ytaps,
            *plan.xtaps,
            plan.xfactor,
            plan.placement.offset_y,
            plan.placement.offset_x,
            plan.mask,
        )
        norm = (np.float32(layout.pad_value), np.float32(layout.mean), inv_std)
        if plan.plain and src.dtype.kind == "u":
            cpu.resample_plain(*where, plan.offset, plan.coeffs, *norm)
        elif not plan.use_table and not plan.sigmoid:
            # Signed or padded pixels under LINEAR windows: the fused loops of resample_plain.
            cpu.resample_affine(
                *where,
                plan.sign_bit,
                plan.signed,
                plan.flip,
                plan.pad_lo,
                plan.pad_hi,
                plan.offset,
                plan.coeffs,
                *norm,
            )
        else:
            cpu.resample(
                *where,
                plan.sign_bit,
                plan.signed,
                plan.offset,
                plan.coeffs,
                plan.sigmoid,
                plan.use_table,
                plan.table,
                plan.vmin,
                plan.flip,
                plan.pad_lo,
                plan.pad_hi,
                *norm,
            )
        if scratch is not None:
            out[n] = scratch
    return out, [p.placement for p in plans]


def run_on_executor(
    executor: Any,
    images: Sequence[np.ndarray],
    plans: Sequence[ImagePlan],
    layout: InputLayout,
    out: Any = None,
) -> Any:
    """Preprocess planned images on a GPU executor (``nidaan.kernels.executor``): every image is
    submitted at once (so they share launches with each other and with other threads' images)
    and the batch is assembled on the device."""
    shape = layout.shape(len(images))
    if out is not None and (
        out.shape[0] < len(images) or tuple(out.shape[1:]) != shape[1:] or out.dtype != layout.dtype
    ):
        raise ValueError(
            f"output buffer {out.shape}/{out.dtype} does not fit {shape}/{layout.dtype}"
        )
    futures = [
        executor.submit(np.asarray(src), plan, layout)
        for src, plan in zip(images, plans, strict=True)
    ]
    tensors = [f.result() for f in futures]
    if out is not None:
        executor.ops.copy_into(out, tensors)
        return out
    if len(tensors) == 1:
        return tensors[0][None]  # a view: the executor never writes a finished batch again
    return executor.ops.stack(tensors)


def to_host(batch: Any) -> np.ndarray:
    """A batch as a NumPy array (a copy from the GPU for the CUDA backend's CuPy arrays)."""
    if isinstance(batch, np.ndarray):
        return batch
    return batch.get()  # CuPy


def configure_cache(cache_dir: str) -> bool:
    """Check that Numba caches the compiled kernels in ``cache_dir`` ("" asks for nothing).

    It cannot move the cache: Numba fixes each ``cache=True`` kernel's cache directory when the
    kernel is decorated, at the import of :mod:`nidaan.kernels` (which this function is part of),
    from ``NUMBA_CACHE_DIR``. So that variable must be set before anything imports the kernels or
    Numba, as the ``nidaan`` command does after loading its config. If the kernels were decorated
    with another directory, this warns (``RuntimeWarning`` and the log) and returns False, rather
    than set the variable and pretend it took; True when the kernels are cached in ``cache_dir``.
    """
    import logging
    import warnings
    from pathlib import Path

    from numba.core.dispatcher import Dispatcher

    from . import cpu, geometry

    if not cache_dir:
        return True
    wanted = Path(os.path.realpath(cache_dir))
    # Where the decorated kernels really cache (Dispatcher.stats is Numba's public view of it).
    used = {
        Path(os.path.realpath(kernel.stats.cache_path))
        for module in (cpu, geometry)
        for kernel in vars(module).values()
        if isinstance(kernel, Dispatcher) and kernel.stats.cache_path
    }
    elsewhere = sorted(str(p) for p in used if not p.is_relative_to(wanted))
    if not elsewhere:
        return True
    message = (
        f"kernels.cache_dir {wanted} has no effect: nidaan.kernels was imported before "
        f"NUMBA_CACHE_DIR named it, so compiled kernels are cached in {elsewhere[0]}. Set "
        "NUMBA_CACHE_DIR before importing nidaan.kernels or numba (the nidaan command does)."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    logging.getLogger("nidaan.kernels").warning("%s", message)
    return False
