"""Preprocessing plus inference, against inference alone on the same tensors, at one batch size.

    .venv/bin/python benchmarks/inference.py [--model cxr_screen] [--batch 32] [--rounds 5]
                                             [--size 2048] [--quick]

``--batch`` stored-pixel images of ``--size`` x ``--size`` (12 bits stored in uint16, MONOCHROME1,
a header window: what ``decode`` hands the kernels for a chest radiograph) go through the model
in two ways, timed in alternation over ``--rounds`` rounds:

- inference alone: the batch's tensors are made once, where the backend reads them (on the GPU
  for ONNX Runtime's CUDA execution provider, bound by device pointer), and only ``infer`` is
  timed;
- preprocessing + inference: from the host pixels, ``preprocess`` (the GPU executor where there
  is a GPU, else the CPU kernels) and then ``infer`` on its output, as the pipeline does.

Prints the median images/s of each and their ratio. With a GPU this is the figure issue 9 asks
for (cxr_screen at batch 32); on the CPU it runs the same code with the CPU kernels and the CPU
provider. Not a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from nidaan.core.config import InferenceConfig
from nidaan.kernels import PixelTransform, preprocess, resolve_backend, to_host
from nidaan.server.inference import OnnxRuntimeBackend, is_device_array
from nidaan.server.model_repository import load_repository
from nidaan.server.pipeline import layout_of

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cxr_screen")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="4 images of 512 x 512, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.rounds = 4, 512, 2

    models = {m.name: m for m in load_repository(ROOT / "models")}
    model = models[args.model]
    layout = layout_of(model)
    backend = OnnxRuntimeBackend(InferenceConfig(device="auto"))
    kernels = resolve_backend("auto")
    if kernels == "cuda" and not backend.accepts_device_arrays:
        kernels = "cpu"  # GPU kernels feeding a CPU provider would measure a host copy
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 4096, (args.size, args.size)).astype(np.uint16) for _ in range(args.batch)
    ]
    t = PixelTransform(
        window_centre=2048.0, window_width=4096.0, invert=True, bits_stored=12, signed=False
    )
    transforms = [t] * len(images)

    def prepared() -> object:
        batch, _ = preprocess(images, transforms, layout, backend=kernels)
        return batch if is_device_array(batch) and backend.accepts_device_arrays else to_host(batch)

    tensors = prepared()
    backend.infer(model, tensors)  # load the session and warm both paths
    prepared()

    def infer_only() -> float:
        start = time.perf_counter()
        backend.infer(model, tensors)
        return time.perf_counter() - start

    def end_to_end() -> float:
        start = time.perf_counter()
        backend.infer(model, prepared())
        return time.perf_counter() - start

    alone, full = [], []
    for _ in range(args.rounds):
        alone.append(infer_only())
        full.append(end_to_end())
    a, f = statistics.median(alone), statistics.median(full)
    print(
        f"{model.name}, batch {args.batch}, {args.size}x{args.size} uint16 -> "
        f"{layout.channels}x{layout.height}x{layout.width} {layout.dtype}; kernels {kernels}, "
        f"ONNX Runtime {backend.providers[0]}; medians of {args.rounds} alternated rounds"
    )
    print(f"inference alone (tensors ready):  {args.batch / a:9.1f} images/s")
    print(f"preprocessing + inference:        {args.batch / f:9.1f} images/s")
    print(f"ratio (preprocessing + inference / inference alone): {a / f:.2f}")


if __name__ == "__main__":
    main()
