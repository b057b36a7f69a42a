"""Preprocessing throughput: the fused CPU kernel against plain NumPy, measured in one run.

    .venv/bin/python benchmarks/preprocess.py [--images 16] [--size 2048] [--out 256]

Prints images/s for each and their ratio. Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nidaan.kernels import InputLayout, PixelTransform, preprocess
from nidaan.kernels.reference import preprocess_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--out", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 4096, (args.size, args.size)).astype(np.uint16) for _ in range(args.images)
    ]
    t = PixelTransform(window_centre=2048.0, window_width=4096.0, invert=True)
    layout = InputLayout(args.out, args.out, "letterbox", 0.0, 0.5, 0.25)
    batch, placements = preprocess(images[:1], [t], layout)  # compile outside the timing
    out = np.empty((len(images), 1, args.out, args.out), np.float32)
    start = time.perf_counter()
    preprocess(images, [t] * len(images), layout, out=out)
    kernel_s = time.perf_counter() - start
    start = time.perf_counter()
    for img in images[:4]:
        preprocess_one(img, t, placements[0], 0.0, 0.5, 0.25)
    numpy_s = (time.perf_counter() - start) * len(images) / 4
    mbytes = sum(i.nbytes for i in images) / 1e6
    print(f"{len(images)} images {args.size}x{args.size} uint16 -> {args.out}x{args.out} float32")
    print(
        f"fused CPU kernel : {len(images) / kernel_s:8.1f} images/s  {mbytes / kernel_s:8.0f} MB/s"
    )
    print(f"NumPy reference  : {len(images) / numpy_s:8.1f} images/s  {mbytes / numpy_s:8.0f} MB/s")
    print(f"speed-up         : {numpy_s / kernel_s:8.1f}x")


if __name__ == "__main__":
    main()
