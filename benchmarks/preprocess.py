"""Preprocessing throughput against this machine's memory-read roofline, measured in one run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/preprocess.py [--images N] [--pairs 9] [--quick | --smoke]
                                              [--json PATH]

One buffer of stored pixels (by default 4x the last-level cache, so that what is measured is DRAM
bandwidth, not the cache's) is read as five common paths, each through ``preprocess(...,
backend="cpu")`` into a preallocated batch:

- common: 2048 x 2048 uint16, 12 bits stored, MONOCHROME1, header window -> 512 x 512 float32;
- padding: the same images and window with Pixel Padding Value 0 (each image has a zero border);
- SIGMOID: the same images, header window with VOI LUT Function SIGMOID;
- CT: the same bytes as 512 x 512 signed 16-bit slices, rescale intercept -1024, lung and
  mediastinum windows -> 2 x 256 x 256 (``ct_nodule``'s input);
- non-integer factor: the same bytes as 2000 x 1700 images -> 512 x 512 (letterboxed to 512 x 435).

A path's figure is the bytes its kernel moves (pixels read plus batch written) per second, as a
fraction of the read roofline over the very same image bytes. The roofline reads every 64-byte
line of those bytes on every thread Numba has (as many as the usable cores): a Numba
``parallel=True`` loop ORing one uint64 word per line, which brings the whole line in from
memory. Two checks are measured in alternation with it and printed beside it: the same loop ORing
every word (LLVM's 256-bit vector ORs, eight times the work over the same lines), which must not
be faster, else the roofline would not be memory-bound; and an independent read, NumPy's ``max``
over uint64 views from one Python thread per core. The roofline and each kernel are timed in
alternation (best of 2 each, ``--pairs`` pairs) and the fraction is the median of the pairs'
ratios, so a passing disturbance (another process, a frequency change) hits both.

The common path is also timed for the NumPy reference (``nidaan.kernels.reference``) and OpenCV's
``resize`` with INTER_AREA (resizing only, no pixel transform). Where ``cuda_available()``, 32
images of the common path also go through the GPU: host to result through a ``CudaExecutor``
(submit all, wait for all), and the batch kernel's device-resident time (CUDA events, data
already on the device) against the device's HBM bandwidth measured in the same run. Not a test:
timings are never asserted.

On the 2-core development machine (2026-12-01, 4 runs, see README.md) the roofline was 29.6 GB/s
(ORing every word 0.78-0.88x of it, NumPy 5-12% below it) and the common path 56.0% of it (34.2%
before the fused row loops); Pixel Padding 44.4%, CT 20.2%, 2000 x 1700 21.8%, SIGMOID 2.3%.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from nidaan.kernels import InputLayout, PixelTransform, preprocess
from nidaan.kernels.preprocess import cuda_available, plan_image
from nidaan.kernels.reference import preprocess_one

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # report.py, when imported
import report  # noqa: E402

#: Words per block of the roofline's parallel loop (256 KB).
_BLOCK = 1 << 15


@njit(parallel=True, cache=True)
def _read_lines(words):  # type: ignore[no-untyped-def]
    """The roofline: every 64-byte line of ``words`` read (one uint64 word ORed per line, which
    brings the whole line in), in blocks of ``_BLOCK`` words over all threads.

    Each block is a slice indexed from 0, so Numba adds no wraparound select to the loop."""
    n_blocks = words.shape[0] // _BLOCK
    part = np.zeros(n_blocks + 1, np.uint64)
    for k in prange(n_blocks):
        block = words[k * _BLOCK : (k + 1) * _BLOCK]
        acc = np.uint64(0)
        for i in range(0, block.shape[0], 8):
            acc |= block[i]
        part[k] = acc
    tail = words[n_blocks * _BLOCK :]
    acc = np.uint64(0)
    for i in range(0, tail.shape[0], 8):
        acc |= tail[i]
    part[n_blocks] = acc
    total = np.uint64(0)
    for k in range(n_blocks + 1):
        total |= part[k]
    return total


@njit(parallel=True, cache=True)
def _or_words(words):  # type: ignore[no-untyped-def]
    """``_read_lines`` ORing every word (LLVM: four 256-bit ORs per iteration, two loads per
    line): eight times the work over the same lines, for the check that the roofline is
    memory-bound (this must not be faster)."""
    n_blocks = words.shape[0] // _BLOCK
    part = np.zeros(n_blocks + 1, np.uint64)
    for k in prange(n_blocks):
        block = words[k * _BLOCK : (k + 1) * _BLOCK]
        acc = np.uint64(0)
        for i in range(block.shape[0]):
            acc |= block[i]
        part[k] = acc
    tail = words[n_blocks * _BLOCK :]
    acc = np.uint64(0)
    for i in range(tail.shape[0]):
        acc |= tail[i]
    part[n_blocks] = acc
    total = np.uint64(0)
    for k in range(n_blocks + 1):
        total |= part[k]
    return total


def best_of(fn: Callable[[], object], repeats: int = 2) -> float:
    """The fastest of ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def l3_bytes() -> int | None:
    """The last-level (L3) cache size from sysfs, or None."""
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


@dataclass
class Path:
    name: str
    images: list[np.ndarray]
    transform: PixelTransform
    layout: InputLayout
    #: The images' bytes as uint64 words (the images are consecutive views of one buffer).
    words: np.ndarray

    @property
    def read_bytes(self) -> int:
        return sum(i.nbytes for i in self.images)

    @property
    def written_bytes(self) -> int:
        n = len(self.images)
        return int(np.prod(self.layout.shape(n))) * np.dtype(self.layout.dtype).itemsize


def measure(path: Path, pairs: int) -> dict[str, Any]:
    """Alternate the roofline and the kernel ``pairs`` times; the medians and the ratios."""
    words = path.words
    out = np.empty(path.layout.shape(len(path.images)), np.float32)
    transforms = [path.transform] * len(path.images)

    def kernel() -> object:
        return preprocess(path.images, transforms, path.layout, out=out, backend="cpu")

    def roofline() -> object:
        return _read_lines(words)

    kernel()
    roofline()
    moved = path.read_bytes + path.written_bytes
    rows = [(best_of(roofline), best_of(kernel)) for _ in range(pairs)]
    ratios = sorted((moved / k) / (words.nbytes / r) for r, k in rows)
    kernel_s = statistics.median(k for _, k in rows)
    roof_s = statistics.median(r for r, _ in rows)
    return {
        "fraction": statistics.median(ratios),
        "low": ratios[0],
        "high": ratios[-1],
        "gbs": moved / kernel_s / 1e9,
        "roofline": words.nbytes / roof_s / 1e9,
        "images_s": len(path.images) / kernel_s,
    }


def check_roofline(words: np.ndarray, threads: int, rounds: int) -> dict[str, float]:
    """The roofline, the same read doing more work per line, and NumPy's independent read, in
    alternation: GB/s of each."""
    parts = np.array_split(words, threads)
    pool = ThreadPoolExecutor(threads)

    def numpy_read() -> object:
        return list(pool.map(np.max, parts))

    fns: dict[str, Callable[[], object]] = {
        "roofline": lambda: _read_lines(words),
        "words": lambda: _or_words(words),
        "numpy": numpy_read,
    }
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(best_of(fn))
    pool.shutdown()
    return {k: words.nbytes / statistics.median(v) / 1e9 for k, v in times.items()}


def make_paths(n_images: int) -> tuple[list[Path], np.ndarray]:
    """The five paths over one buffer of ``n_images`` 2048 x 2048 uint16 images."""
    size = 2048
    rng = np.random.default_rng(0)
    pixels = np.empty(n_images * size * size, np.uint16)
    # Random 12-bit values; one block repeated with an odd period, so images differ (filling the
    # whole buffer from the generator would take longer than the benchmark).
    block = rng.integers(0, 4096, (1 << 22) + 4099, dtype=np.uint16)
    for s in range(0, pixels.size, block.size):
        pixels[s : s + block.size] = block[: pixels.size - s]
    stack = pixels.reshape(n_images, size, size)
    stack[:, :, :64] = 0  # a collimation border: Pixel Padding for the padding path
    stack[:, :, -64:] = 0
    radiographs = list(stack)
    mono1 = PixelTransform(
        window_centre=2048.0, window_width=4096.0, invert=True, bits_stored=12, signed=False
    )
    cxr = InputLayout(512, 512, "letterbox", 0.0, 0.5, 0.25)
    ct_slices = list(pixels.view(np.int16).reshape(-1, 512, 512))
    ct = PixelTransform(slope=1.0, intercept=-1024.0, bits_stored=16, signed=True)
    ct_layout = InputLayout(
        256, 256, "letterbox", 0.0, 0.5, 0.25, windows=((-600.0, 1500.0), (40.0, 400.0))
    )
    odd = list(pixels[: pixels.size // (2000 * 1700) * 2000 * 1700].reshape(-1, 2000, 1700))

    def path(name: str, images: list[np.ndarray], t: PixelTransform, layout: InputLayout) -> Path:
        nbytes = sum(i.nbytes for i in images)
        return Path(name, images, t, layout, pixels.view(np.uint8)[:nbytes].view(np.uint64))

    paths = [
        path("common: 2048x2048 u16 12-bit MONOCHROME1 window -> 512x512", radiographs, mono1, cxr),
        path(
            "padding: the same with Pixel Padding Value 0",
            radiographs,
            dataclasses.replace(mono1, padding=(0, 0)),
            cxr,
        ),
        path(
            "SIGMOID: the same with VOI LUT Function SIGMOID",
            radiographs,
            dataclasses.replace(mono1, voi_function="SIGMOID"),
            cxr,
        ),
        path("CT: 512x512 int16, rescale, 2 windows -> 2x256x256", ct_slices, ct, ct_layout),
        path("non-integer factor: 2000x1700 u16 -> 512x512", odd, mono1, cxr),
    ]
    return paths, pixels


def others(common: Path, roofline: float) -> list[tuple[str, float, float]]:
    """The NumPy reference and OpenCV's resize on the common path: (name, GB/s, fraction)."""
    rows = []
    t, layout = common.transform, common.layout
    few = common.images[:2]
    placement = plan_image(few[0], t, layout).placement
    ref_s = best_of(lambda: [preprocess_one(i, t, placement, 0.0, 0.5, 0.25) for i in few], 1)
    per_image = few[0].nbytes + common.written_bytes / len(common.images)
    rows.append(("NumPy reference (2 images)", per_image * len(few) / ref_s / 1e9))
    try:
        import cv2
    except ImportError:
        print("(OpenCV not installed: pip install -e '.[bench]')")
    else:
        dst = np.empty((layout.height, layout.width), np.uint16)

        def resize() -> None:
            for i in common.images:
                cv2.resize(i, (layout.width, layout.height), dst=dst, interpolation=cv2.INTER_AREA)

        resize()
        moved = common.read_bytes + dst.nbytes * len(common.images)
        rows.append(("OpenCV resize INTER_AREA only (uint16 out)", moved / best_of(resize) / 1e9))
    return [(name, gbs, gbs / roofline) for name, gbs in rows]


def gpu_report(images: list[np.ndarray], t: PixelTransform, layout: InputLayout) -> list[str]:
    """Host-to-result time through the executor, and the batch kernel's device-resident time
    against the HBM bandwidth measured here (CuPy copy and OR-reduction)."""
    import cupy as cp

    from nidaan.kernels.cuda import (
        BLOCK,
        MODES,
        batch_kernel,
        grid_for,
        layout_of_pack,
        mode_of,
        pack,
        taps_of,
    )
    from nidaan.kernels.executor import CudaExecutor, CupyOps

    plans = [plan_image(i, t, layout) for i in images]
    ops = CupyOps()
    executor = CudaExecutor(ops, max_batch=len(images), max_batch_bytes=1 << 40)

    def host_to_result() -> None:
        futures = [executor.submit(i, p, layout) for i, p in zip(images, plans, strict=True)]
        for f in futures:
            f.result()

    try:
        host_to_result()  # compiles the kernel and sizes the staging slots
        launches = executor.launches
        host_s = statistics.median(best_of(host_to_result, 1) for _ in range(5))
        launches = (executor.launches - launches) / 5
    finally:
        executor.close()

    packed = layout_of_pack(images, plans)
    staging = np.empty(packed.nbytes, np.uint8)
    pack(images, plans, staging)
    dev = cp.asarray(staging)
    src, desc, coef, itab, ftab = packed.views(ops.view, dev)
    out = cp.empty(layout.shape(len(images)), dtype=cp.float32)
    kernel = batch_kernel(plans[0].coeffs.shape[0], mode_of(plans[0]), taps_of(plans[0]))
    args = (src, ops.kernel_array(out), desc, coef, itab, ftab, np.float32(layout.pad_value),
            np.float32(layout.mean), np.float32(1.0 / layout.std))  # fmt: skip
    grid = grid_for(layout.height, layout.width, len(images), BLOCK)
    stream = ops.stream()
    words = dev[: sum(i.nbytes for i in images) // 8 * 8].view(cp.uint64)
    copy = cp.empty_like(words)
    or_reduce = cp.ReductionKernel("uint64 x", "uint64 y", "x", "a | b", "y = a", "0", "nidaan_or")

    def device_s(fn: Callable[[], object], n: int = 20) -> float:
        """Seconds per call of ``fn`` on ``stream``, by CUDA events (after one warm-up)."""
        with stream:
            fn()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            for _ in range(n):
                fn()
            end.record(stream)
            end.synchronize()
        return float(cp.cuda.get_elapsed_time(start, end)) / 1e3 / n

    kernel_s = device_s(lambda: ops.launch(kernel, grid, BLOCK, stream, args))
    copy_tbs = 2 * words.nbytes / device_s(lambda: cp.copyto(copy, words)) / 1e12
    read_tbs = words.nbytes / device_s(lambda: or_reduce(words)) / 1e12
    hbm = max(copy_tbs, read_tbs)
    moved = sum(i.nbytes for i in images) + out.nbytes
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    nominal = 4.8 if "H200" in name else 3.35 if "H100" in name else None
    vs_nominal = f", {moved / kernel_s / 1e12 / nominal:.1%} of nominal" if nominal else ""
    n = len(images)
    mode = {v: k for k, v in MODES.items()}[mode_of(plans[0])]
    return [
        f"GPU {name}: host to result, {n} images submitted at once to a CudaExecutor and all "
        f"futures waited for: {host_s * 1e3:.2f} ms, {n / host_s:.0f} images/s "
        f"({launches:g} launch(es) per batch; packing on the host and the copy to the device "
        "included)",
        f"GPU batch kernel on device-resident data ({mode} mode, "
        f"{taps_of(plans[0])} taps): {kernel_s * 1e6:.0f} us per batch of {n}, "
        f"{moved / kernel_s / 1e12:.2f} TB/s read+written = {moved / kernel_s / 1e12 / hbm:.1%} "
        f"of the HBM bandwidth measured here ({hbm:.2f} TB/s: device-to-device copy "
        f"{copy_tbs:.2f} TB/s counting read+write, OR-reduction of uint64 words "
        f"{read_tbs:.2f} TB/s){vs_nominal}; nominal HBM: H100 SXM 3.35 TB/s, H200 4.8 TB/s",
    ]


def measure_all(n_images: int | None, pairs: int, quick: bool) -> dict[str, Any]:
    """Measure the roofline, its checks and every path, printing the lines as they come; the
    figures as a dict."""
    l3 = l3_bytes()
    image_bytes = 2048 * 2048 * 2
    if quick:
        n_images, pairs = n_images or 4, 3
    elif n_images is None:
        n_images = max(32, -(-4 * (l3 or 256 << 20) // image_bytes))
    threads = numba.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    paths, pixels = make_paths(n_images)
    words = pixels.view(np.uint64)
    data_mb = pixels.nbytes / 1e6
    if l3 is None:
        level = "cache size unknown"
    elif pixels.nbytes >= 2 * l3:
        level = f"{pixels.nbytes / l3:.1f}x the {l3 / 2**20:.0f} MiB L3: DRAM bandwidth"
    elif pixels.nbytes > l3:
        level = f"{pixels.nbytes / l3:.1f}x the {l3 / 2**20:.0f} MiB L3: partly cached"
    else:
        level = f"fits in the {l3 / 2**20:.0f} MiB L3: cache bandwidth, not DRAM"
    rounds = 3 if quick else 5
    check = check_roofline(words, threads, rounds)
    layer = numba.threading_layer()
    print(f"{cores} usable cores, Numba {threads} threads ({layer})")
    print(f"{data_mb:.0f} MB of stored pixels: {level}")
    r = check["roofline"]
    more_work = check["words"] / r
    verdict = "memory-bound" if more_work < 1.05 else "faster: the roofline is NOT memory-bound"
    print(f"read bandwidth over those bytes, medians of {rounds} alternated rounds:")
    print(f"  {'roofline: every 64-byte line read, Numba':58s} {r:7.2f} GB/s")
    print(
        f"  {'check: every word ORed (256-bit loads, 8x the work)':58s} "
        f"{check['words']:7.2f} GB/s  {more_work:.2f}x: {verdict}"
    )
    print(
        f"  {f'check: NumPy max over uint64 words, {threads} Python threads':58s} "
        f"{check['numpy']:7.2f} GB/s  {check['numpy'] / r - 1:+.1%} from the roofline"
    )
    print(
        "kernels: (bytes read + bytes written) / time as a fraction of the roofline over the same "
        f"bytes, median of {pairs} alternating pairs (range)",
        flush=True,
    )
    results = []
    for path in paths:
        m = measure(path, pairs)
        results.append({"path": path.name, **m})
        print(
            f"  {path.name}: {len(path.images)} images, {path.read_bytes / 1e6:.0f} MB read + "
            f"{path.written_bytes / 1e6:.0f} MB written, {m['images_s']:.0f} images/s, "
            f"{m['gbs']:.2f} GB/s = {m['fraction']:.1%} of the roofline "
            f"({m['roofline']:.2f} GB/s; {m['low']:.1%}-{m['high']:.1%})",
            flush=True,
        )
    extra = others(paths[0], results[0]["roofline"])
    for name, gbs, frac in extra:
        print(f"  {name}, common path: {gbs:.2f} GB/s = {frac:.1%} of its roofline")
    gpu: list[str] = []
    if cuda_available():
        common = paths[0]
        gpu = gpu_report(common.images[:32], common.transform, common.layout)
        for line in gpu:
            print(line)
    else:
        print("(no CUDA GPU: GPU section skipped)")
    return {
        "images": n_images,
        "pairs": pairs,
        "level": level,
        "check": check,
        "paths": results,
        "others": [{"name": n, "gbs": g, "fraction": f} for n, g, f in extra],
        "gpu": gpu,
    }


def run(smoke: bool = False, *, images: int | None = None, pairs: int = 9) -> dict[str, Any]:
    """The benchmark convention's dict (benchmarks/README.md); ``smoke`` is ``--quick``."""
    m = measure_all(images, pairs, smoke)
    roof = m["check"]["roofline"]
    rows = [
        report.row(
            "read roofline (every 64-byte line read, Numba, all cores)",
            roof,
            "GB/s",
            baseline="NumPy max over uint64 words (independent check)",
            baseline_value=m["check"]["numpy"],
        )
    ]
    for p in m["paths"]:
        rows.append(
            report.row(
                f"{p['path'].split(':')[0]} path: bytes read+written per second",
                p["gbs"],
                "GB/s",
                baseline="read roofline over the same bytes",
                baseline_value=p["roofline"],
                ratio=p["fraction"],  # the median of the pairs' ratios, not of the medians
            )
        )
    args = [] if smoke else [f"--pairs {pairs}"] + ([f"--images {images}"] if images else [])
    return report.result(
        "preprocess",
        f"CPU preprocessing kernels against the memory-read roofline, {m['images']} 2048x2048 "
        f"uint16 images ({m['level']})",
        report.command_line("preprocess.py", smoke, *args),
        rows,
        report.plot_spec(
            "bar",
            "Preprocessing: fraction of the read roofline",
            "path",
            "fraction of roofline (%)",
            [p["path"].split(":")[0] for p in m["paths"]],
            {"kernel": [100 * p["fraction"] for p in m["paths"]]},
        ),
        detail=m,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, help="2048 x 2048 images in the buffer")
    parser.add_argument("--pairs", type=int, default=9, help="alternating roofline/kernel pairs")
    parser.add_argument(
        "--quick", action="store_true", help="4 images (34 MB: cache, not DRAM), 3 pairs"
    )
    report.add_convention_arguments(parser)
    args = parser.parse_args()
    data = run(args.quick or args.smoke, images=args.images, pairs=args.pairs)
    report.write_json(data, args.json)


if __name__ == "__main__":
    main()
