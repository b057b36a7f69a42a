"""Preprocessing throughput against this machine's memory-read roofline, measured in one run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/preprocess.py [--images 32] [--size 2048] [--out 512]

32 images of 2048 x 2048 uint16 (12 bits stored, MONOCHROME1, header window) to a 512 x 512
float32 batch. Prints images/s and GB/s of pixels read for: the fused CPU backend; the plain NumPy
reference (``nidaan.kernels.reference``); OpenCV's ``resize`` with INTER_AREA (resizing only, no
pixel transform: a lower bound on what a library call costs); and the memory-read bandwidth of
this machine (a parallel Numba reduction over the same bytes), with each as a fraction of that
roofline. With a CUDA GPU it also times the CUDA backend against the device's copy bandwidth.
Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from nidaan.kernels import InputLayout, PixelTransform, preprocess
from nidaan.kernels.preprocess import cuda_available, plan_image
from nidaan.kernels.reference import preprocess_one


@njit(parallel=True, cache=True)
def _read_all(stack):  # type: ignore[no-untyped-def]
    total = 0
    for i in prange(stack.shape[0]):
        s = 0
        for j in range(stack.shape[1]):
            s += stack[i, j]
        total += s
    return total


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs, in seconds (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--out", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 4096, (args.size, args.size)).astype(np.uint16) for _ in range(args.images)
    ]
    nbytes = sum(i.nbytes for i in images)

    def read_images() -> int:
        # The roofline reads the very arrays the kernel reads (same pages, same 32 calls).
        return sum(int(_read_all(i)) for i in images)

    t = PixelTransform(
        window_centre=2048.0, window_width=4096.0, invert=True, bits_stored=12, signed=False
    )
    layout = InputLayout(args.out, args.out, "letterbox", 0.0, 0.5, 0.25)
    out = np.empty(layout.shape(len(images)), np.float32)

    # The roofline and the kernel are timed in alternation, so a passing disturbance (another
    # process, a frequency change) hits both; the ratio reported is the median of the pairs.
    def run_cpu() -> object:
        return preprocess(images, [t] * len(images), layout, out=out, backend="cpu")

    run_cpu()
    read_images()
    pairs = []
    for _ in range(9):
        pairs.append((best_of(read_images, 2), best_of(run_cpu, 2)))
    ratios = sorted(read / cpu for read, cpu in pairs)
    read_s = sorted(read for read, _ in pairs)[len(pairs) // 2]
    cpu_s = sorted(cpu for _, cpu in pairs)[len(pairs) // 2]
    roofline = nbytes / read_s
    rows = [("memory read (roofline)", read_s), ("nidaan CPU backend", cpu_s)]
    placement = plan_image(images[0], t, layout).placement
    few = images[:4]
    numpy_s = best_of(lambda: [preprocess_one(i, t, placement, 0.0, 0.5, 0.25) for i in few], 2)
    rows.append(("NumPy reference", numpy_s * len(images) / len(few)))
    try:
        import cv2

        cv_out = np.empty((args.out, args.out), np.uint16)
        rows.append(
            (
                "OpenCV resize INTER_AREA only",
                best_of(
                    lambda: [
                        cv2.resize(
                            i, (args.out, args.out), dst=cv_out, interpolation=cv2.INTER_AREA
                        )
                        for i in images
                    ]
                ),
            )
        )
    except ImportError:
        print("(OpenCV not installed: pip install -e '.[bench]')")
    gpu_lines = []
    if cuda_available():
        import cupy as cp

        def run_cuda() -> None:
            preprocess(images, [t] * len(images), layout, backend="cuda")
            cp.cuda.Device().synchronize()

        on_device = [cp.asarray(i) for i in images]

        def device_read() -> None:
            for d in on_device:
                d.sum(dtype=cp.int64)
            cp.cuda.Device().synchronize()

        cuda_s, dev_s = best_of(run_cuda), best_of(device_read)
        rows.append(("nidaan CUDA backend (host->GPU incl.)", cuda_s))
        gpu_lines.append(
            f"CUDA backend: {len(images) / cuda_s:.1f} images/s = {dev_s / cuda_s:.1%} of the "
            f"device's read bandwidth measured in the same run ({nbytes / dev_s / 1e9:.0f} GB/s; "
            "the backend's time includes copying the images from host memory)"
        )
    print(
        f"{len(images)} images {args.size}x{args.size} uint16 -> {args.out}x{args.out} "
        f"float32, {nbytes / 1e6:.0f} MB of pixels"
    )
    print(
        f"CPU backend / roofline, 9 alternating pairs: median {ratios[4]:.1%}, "
        f"range {ratios[0]:.1%}-{ratios[-1]:.1%}"
    )
    print(f"{'':38s} {'images/s':>9s} {'GB/s':>7s} {'of roofline':>12s}")
    for name, seconds in rows:
        gbs = nbytes / seconds / 1e9
        print(
            f"{name:38s} {len(images) / seconds:9.1f} {gbs:7.2f} "
            f"{nbytes / seconds / roofline:11.1%}"
        )
    for line in gpu_lines:
        print(line)


if __name__ == "__main__":
    main()
