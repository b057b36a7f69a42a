"""The GPU executor and its batch kernel on small images against the NumPy reference (a script).

Run by tests/test_cuda_kernels.py in its own process: under ``NUMBA_ENABLE_CUDASIM=1`` (and
``NUMBA_DISABLE_JIT=1`` so the ``@njit`` helpers run as Python inside simulated threads) with
the stand-in device of ``sim_device.py``; on a machine with a GPU (``--gpu``) the same checks run
on the device through CuPy. Prints one line per check and exits 1 if any fails.

Checks: the kernel cases one by one through the executor; 16 threads submitting images of
different sizes, pixel types, windows and layouts at once, every output compared with the
reference; the GPU path of ``preprocess`` (``run_on_executor``); that only the executor's thread
touches the device; that an executor whose streams are not ordered by events (or whose results
are handed out before their kernel ends) is caught; shutdown.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any

import numpy as np

from nidaan.kernels import InputLayout, PixelTransform
from nidaan.kernels.executor import CudaExecutor, ExecutorClosed
from nidaan.kernels.preprocess import plan_image, run_on_executor
from nidaan.kernels.reference import preprocess_one
from nidaan.kernels.transform import LookupTable

# The simulator runs the kernels' uint32 arithmetic on NumPy scalars, which warn when it wraps
# (as it is meant to).
warnings.simplefilter("ignore", RuntimeWarning)

GPU = "--gpu" in sys.argv
#: Small blocks in the simulator (one Python thread per CUDA thread); the real shape on a GPU.
BLOCK = (32, 8) if GPU else (8, 4)

rng = np.random.default_rng(0)
u12 = rng.integers(0, 4096, (23, 17)).astype(np.uint16)
dirty = u12 | (rng.integers(0, 16, u12.shape).astype(np.uint16) << 12)
signed = rng.integers(-1500, 1500, (9, 30)).astype(np.int16)
mlut = LookupTable(5, np.linspace(-100.0, 900.0, 3000), 16)
CT = ((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0))

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
        InputLayout(6, 9, "letterbox", 0.0, 0.5, 0.25, windows=CT, dtype="float16"),
    ),
    (
        "one pixel",
        np.array([[1234]], np.uint16),
        PixelTransform(window_centre=1000.0, window_width=500.0),
        InputLayout(3, 4, "letterbox"),
    ),
    (
        "uint32 at and above 2**31",
        np.array([[0, 2**31 - 1, 2**31, 2**32 - 1]], np.uint32),
        PixelTransform(window_centre=2.0**31, window_width=2.0**32),
        InputLayout(1, 4, "stretch"),
    ),
    (
        "signed CT with padding, automatic window",
        np.where(rng.random((20, 16)) < 0.3, -3024, rng.integers(-1000, 1500, (20, 16))).astype(
            np.int16
        ),
        PixelTransform(slope=1.0, intercept=0.0, padding=(-3024, -3024)),
        InputLayout(8, 8, "letterbox", 0.0, 0.5, 0.25),
    ),
    (
        "narrow LINEAR_EXACT far from zero",
        np.arange(59990, 60010, dtype=np.uint16).reshape(4, 5),
        PixelTransform(window_centre=60000.0, window_width=3.0, voi_function="LINEAR_EXACT"),
        InputLayout(4, 5, "stretch"),
    ),
]


def reference(src: np.ndarray, t: PixelTransform, layout: InputLayout) -> np.ndarray:
    plan = plan_image(src, t, layout)
    return preprocess_one(
        src,
        t.for_array(src.dtype),
        plan.placement,
        layout.pad_value,
        layout.mean,
        layout.std,
        layout.windows,
    )


def host(a: Any) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float32)


def tolerance(layout: InputLayout) -> float:
    return 2e-3 if layout.dtype == "float16" else 1e-4


def make_ops(**broken: bool) -> Any:
    if GPU:
        from nidaan.kernels.executor import CupyOps

        return CupyOps()
    from sim_device import SimOps

    return SimOps(**broken)


def concurrent_images(seed: int) -> list[tuple[np.ndarray, PixelTransform, InputLayout]]:
    """Three images per submitting thread: sizes, pixel types, windows and layouts all vary."""
    r = np.random.default_rng(seed)
    one = InputLayout(8, 8, "letterbox", 0.0, 0.5, 0.25)
    three = InputLayout(6, 9, "stretch", 0.1, 0.5, 0.25, windows=CT, dtype="float16")
    out = []
    for k in range(3):
        h, w = int(r.integers(3, 26)), int(r.integers(3, 26))
        kind = int(r.integers(0, 5))
        if kind == 0:
            src = r.integers(0, 4096, (h, w)).astype(np.uint16)
            c = float(r.integers(500, 3500))
            t = PixelTransform(window_centre=c, window_width=float(r.integers(50, 3000)),
                               invert=bool(k % 2), bits_stored=12, signed=False)  # fmt: skip
        elif kind == 1:
            src = r.integers(-1200, 1800, (h, w)).astype(np.int16)
            t = PixelTransform(slope=float(r.choice([1.0, 0.5, 2.0])), intercept=-1024.0,
                               window_centre=float(r.integers(-500, 500)),
                               window_width=float(r.integers(200, 2000)),
                               padding=(-1200, -1100))  # fmt: skip
        elif kind == 2:
            src = r.integers(0, 256, (h, w)).astype(np.uint8)
            t = PixelTransform(window_centre=128.0, window_width=float(r.integers(10, 256)),
                               voi_function="SIGMOID")  # fmt: skip
        elif kind == 3:
            src = r.integers(-(2**20), 2**20, (h, w)).astype(np.int32)
            t = PixelTransform(window_centre=float(r.integers(-1000, 1000)),
                               window_width=float(2**19))  # fmt: skip
        else:
            src = r.integers(0, 4096, (h, w)).astype(np.uint16)
            t = PixelTransform(modality_lut=mlut, window_centre=float(r.integers(100, 700)),
                               window_width=500.0)  # fmt: skip
        out.append((src, t, three if (seed + k) % 3 == 0 else one))
    return out


def run_threads(executor: CudaExecutor, threads: int = 16) -> tuple[int, int, list[str]]:
    """16 threads submit their images at once; returns (checked, wrong, what was wrong)."""
    barrier = threading.Barrier(threads)
    results: dict[int, list[tuple[Any, np.ndarray, InputLayout]]] = {}
    errors: list[str] = []

    def worker(seed: int) -> None:
        items = concurrent_images(seed)
        plans = [plan_image(src, t, layout) for src, t, layout in items]
        barrier.wait()
        try:
            futures = [
                executor.submit(src, plan, layout)
                for (src, _, layout), plan in zip(items, plans, strict=True)
            ]
            results[seed] = [
                (f.result(timeout=600), reference(src, t, layout), layout)
                for f, (src, t, layout) in zip(futures, items, strict=True)
            ]
        except Exception as e:  # reported below
            errors.append(f"thread {seed}: {e!r}")

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    checked = wrong = 0
    for seed, items in sorted(results.items()):
        for k, (got, ref, layout) in enumerate(items):
            checked += 1
            g = host(got)
            if g.shape != ref.shape or not np.abs(g - ref).max() <= tolerance(layout):
                wrong += 1
                errors.append(f"thread {seed} image {k}: differs from the reference")
    return checked, wrong, errors


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    return ok


def main() -> int:
    results: list[bool] = []
    ops = make_ops()
    executor = CudaExecutor(ops, block=BLOCK, max_delay_s=0.005)

    # 1. Each kernel case alone.
    for name, src, t, layout in CASES:
        got = host(executor.submit(src, plan_image(src, t, layout), layout).result(timeout=600))
        diff = float(np.abs(got - reference(src, t, layout)).max())
        results.append(
            check(name, diff <= tolerance(layout), f"max |gpu - reference| = {diff:.2e}")
        )

    # 2. Sixteen threads at once.
    launches, images = executor.launches, executor.images
    checked, wrong, errors = run_threads(executor)
    batched = executor.launches - launches
    results.append(
        check(
            "16 threads, mixed sizes, types, windows and layouts",
            checked == 48 and wrong == 0 and not errors,
            f"{checked} outputs checked, {wrong} wrong, {batched} launches for "
            f"{executor.images - images} images; {'; '.join(errors[:3])}",
        )
    )
    results.append(check("images share launches", batched < checked, f"{batched} < {checked}"))

    # 3. The GPU path of preprocess(): one call, a batch assembled on the device.
    layout = InputLayout(8, 8, "letterbox", 0.0, 0.5, 0.25)
    srcs = [u12, dirty[:11], u12[3:, 2:]]
    ts = [PixelTransform(window_centre=2000.0, window_width=3000.0)] * 3
    plans = [plan_image(s, t, layout) for s, t in zip(srcs, ts, strict=True)]
    batch = host(run_on_executor(executor, srcs, plans, layout))
    refs = np.stack([reference(s, t, layout) for s, t in zip(srcs, ts, strict=True)])
    results.append(check("preprocess on the executor", bool(np.abs(batch - refs).max() <= 1e-4)))

    # 4. A group whose launch fails fails alone; the executor goes on serving.
    if not GPU:
        ops.fail_next_launch = True
        failed = executor.submit(u12, plans[0], layout)
        error = failed.exception(timeout=600)
        after = host(executor.submit(u12, plans[0], layout).result(timeout=600))
        results.append(
            check(
                "a failed launch fails its own images only",
                isinstance(error, RuntimeError) and np.abs(after - refs[0]).max() <= 1e-4,
                repr(error),
            )
        )

    # 5. Only the owner thread made device calls.
    if not GPU:
        results.append(
            check("one owner thread", ops.threads == {"nidaan-gpu0"}, f"callers: {ops.threads}")
        )
        results.append(check("no errors on the streams", not ops.errors(), str(ops.errors()[:1])))
        results.append(
            check("every cross-stream use ordered", not ops.hazards, "; ".join(ops.hazards[:2]))
        )

    # 6. Shutdown: queued work finishes, later submissions are refused.
    last = executor.submit(u12, plan_image(u12, ts[0], layout), layout)
    executor.close()
    finished = last.done() and last.exception() is None
    try:
        executor.submit(u12, plans[0], layout)
        refused = False
    except ExecutorClosed:
        refused = True
    results.append(check("close drains, then refuses", finished and refused and not executor.alive))
    if not GPU:
        ops.close()

        # 7. The checks above can fail: an executor whose streams skip their event waits, or
        # whose results are handed out before their kernel has finished, gives wrong outputs.
        for broken in ("skip_waits", "early_sync"):
            bad_ops = make_ops(**{broken: True})
            bad = CudaExecutor(bad_ops, block=BLOCK, max_delay_s=0.005)
            _, wrong, _ = run_threads(bad)
            bad.close()
            bad_ops.close()
            hazards = len(bad_ops.hazards)
            results.append(
                check(
                    f"an executor with {broken} is caught",
                    wrong > 0 or hazards > 0,
                    f"{wrong} outputs wrong, {hazards} unordered uses found",
                )
            )
        # The clocks alone, without timing: a kernel launched with no wait after its upload.
        lone = make_ops(skip_waits=True)
        ex = CudaExecutor(lone, block=BLOCK)
        ex.submit(u12, plans[0], layout).result(timeout=600)
        ex.close()
        lone.close()
        results.append(check("an unordered upload is found by the clocks", bool(lone.hazards)))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
