"""Run the CUDA kernel on small images against the NumPy reference (a script, not a test module).

Run by tests/test_cuda_kernels.py in its own process: under ``NUMBA_ENABLE_CUDASIM=1`` (and
``NUMBA_DISABLE_JIT=1`` so the ``@njit`` helpers run as Python inside simulated threads), or on
a real GPU when there is one. Prints one line per case and exits 1 if any case differs.
"""

from __future__ import annotations

import sys

import numpy as np

from nidaan.kernels import InputLayout, PixelTransform
from nidaan.kernels.cuda import BLOCK, grid_for, host_tables, kernel_args, resample_kernel
from nidaan.kernels.preprocess import plan_image
from nidaan.kernels.reference import preprocess_one
from nidaan.kernels.transform import LookupTable

rng = np.random.default_rng(0)
u12 = rng.integers(0, 4096, (23, 17)).astype(np.uint16)
dirty = u12 | (rng.integers(0, 16, u12.shape).astype(np.uint16) << 12)
signed = rng.integers(-1500, 1500, (9, 30)).astype(np.int16)
mlut = LookupTable(5, np.linspace(-100.0, 900.0, 3000), 16)

CASES = [
    (
        "shrink letterbox, MONOCHROME1",
        u12,
        PixelTransform(window_centre=2000.0, window_width=3000.0, invert=True),
        InputLayout(8, 8, "letterbox", 0.0, 0.5, 0.25),
    ),
    (
        "garbage high bits, padding",
        dirty,
        PixelTransform(
            window_centre=2048.0,
            window_width=4096.0,
            bits_stored=12,
            signed=False,
            padding=(0, 100),
        ),
        InputLayout(6, 5, "stretch"),
    ),
    (
        "signed, enlarge, sigmoid",
        signed,
        PixelTransform(
            slope=2.0,
            intercept=-10.0,
            window_centre=0.0,
            window_width=800.0,
            voi_function="SIGMOID",
        ),
        InputLayout(12, 40, "letterbox", 0.0, 0.5, 0.25),
    ),
    (
        "window width 1",
        u12,
        PixelTransform(window_centre=2000.0, window_width=1.0),
        InputLayout(5, 5, "stretch"),
    ),
    (
        "modality LUT table",
        u12,
        PixelTransform(modality_lut=mlut, window_centre=400.0, window_width=500.0),
        InputLayout(7, 7, "letterbox"),
    ),
    (
        "three CT windows, float16",
        signed,
        PixelTransform(),
        InputLayout(
            6,
            9,
            "letterbox",
            0.0,
            0.5,
            0.25,
            windows=((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0)),
            dtype="float16",
        ),
    ),
    (
        "one pixel",
        np.array([[1234]], np.uint16),
        PixelTransform(window_centre=1000.0, window_width=500.0),
        InputLayout(3, 4, "letterbox"),
    ),
]


def main() -> int:
    failed = 0
    for name, src, t, layout in CASES:
        plan = plan_image(src, t, layout)
        out = np.full(layout.shape(2), np.nan, dtype=layout.dtype)
        tables = host_tables(plan)
        # Host arrays: the simulator uses them as they are; on a GPU Numba copies them over.
        args = kernel_args(src, out, 1, plan, tables, layout)
        resample_kernel[grid_for(layout.height, layout.width), BLOCK](*args)
        ref = preprocess_one(
            src,
            t.for_array(src.dtype),
            plan.placement,
            layout.pad_value,
            layout.mean,
            layout.std,
            layout.windows,
        )
        tol = 2e-3 if layout.dtype == "float16" else 1e-4
        diff = float(np.abs(out[1].astype(np.float32) - ref).max())
        ok = diff <= tol and np.isnan(out[0]).all()
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max |cuda - reference| = {diff:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
