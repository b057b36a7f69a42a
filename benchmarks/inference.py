"""Preprocessing plus inference, against inference alone on the same tensors, at one batch size.

    .venv/bin/python benchmarks/inference.py [--model cxr_screen] [--batch 32] [--rounds 5]
                                             [--size 2048] [--quick | --smoke] [--json PATH]

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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from nidaan.core.config import InferenceConfig
from nidaan.kernels import PixelTransform, preprocess, resolve_backend, to_host
from nidaan.server.inference import OnnxRuntimeBackend, is_device_array
from nidaan.server.model_repository import load_repository
from nidaan.server.pipeline import layout_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # report.py, also when not run as a script

import report  # noqa: E402


def measure(model_name: str, batch: int, rounds: int, size: int) -> dict[str, Any]:
    """Median seconds of inference alone and of preprocessing + inference, printed as lines."""
    models = {m.name: m for m in load_repository(ROOT / "models")}
    model = models[model_name]
    layout = layout_of(model)
    backend = OnnxRuntimeBackend(InferenceConfig(device="auto"))
    kernels = resolve_backend("auto")
    if kernels == "cuda" and not backend.accepts_device_arrays:
        kernels = "cpu"  # GPU kernels feeding a CPU provider would measure a host copy
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 4096, (size, size)).astype(np.uint16) for _ in range(batch)]
    t = PixelTransform(
        window_centre=2048.0, window_width=4096.0, invert=True, bits_stored=12, signed=False
    )
    transforms = [t] * len(images)

    def prepared() -> object:
        out, _ = preprocess(images, transforms, layout, backend=kernels)
        return out if is_device_array(out) and backend.accepts_device_arrays else to_host(out)

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
    for _ in range(rounds):
        alone.append(infer_only())
        full.append(end_to_end())
    a, f = statistics.median(alone), statistics.median(full)
    print(
        f"{model.name}, batch {batch}, {size}x{size} uint16 -> "
        f"{layout.channels}x{layout.height}x{layout.width} {layout.dtype}; kernels {kernels}, "
        f"ONNX Runtime {backend.providers[0]}; medians of {rounds} alternated rounds"
    )
    print(f"inference alone (tensors ready):  {batch / a:9.1f} images/s")
    print(f"preprocessing + inference:        {batch / f:9.1f} images/s")
    print(f"ratio (preprocessing + inference / inference alone): {a / f:.2f}")
    return {
        "alone_s": a,
        "full_s": f,
        "kernels": kernels,
        "provider": backend.providers[0],
        "alone_runs": alone,
        "full_runs": full,
    }


def run(
    smoke: bool = False,
    *,
    model: str = "cxr_screen",
    batch: int = 32,
    rounds: int = 5,
    size: int = 2048,
) -> dict[str, Any]:
    """The benchmark convention's dict (benchmarks/README.md); ``smoke`` is ``--quick``."""
    if smoke:
        batch, size, rounds = 4, 512, 2
    m = measure(model, batch, rounds, size)
    args = [] if smoke else [f"--model {model}", f"--batch {batch}", f"--rounds {rounds}"]
    return report.result(
        "inference",
        f"{model} at batch {batch}: preprocessing ({m['kernels']} kernels) + inference "
        f"({m['provider']}) vs inference alone, {size}x{size} uint16 images",
        report.command_line("inference.py", smoke, *args),
        [
            report.row(
                f"{model}: preprocessing + inference, batch {batch}",
                batch / m["full_s"],
                "images/s",
                baseline="inference alone on ready tensors",
                baseline_value=batch / m["alone_s"],
            )
        ],
        report.plot_spec(
            "bar",
            f"{model}, batch {batch}, median of {rounds} rounds",
            "",
            "images/s",
            ["inference alone", "preprocessing + inference"],
            {"images/s": [batch / m["alone_s"], batch / m["full_s"]]},
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cxr_screen")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="4 images of 512 x 512, 2 rounds")
    report.add_convention_arguments(parser)
    args = parser.parse_args()
    data = run(
        args.quick or args.smoke,
        model=args.model,
        batch=args.batch,
        rounds=args.rounds,
        size=args.size,
    )
    report.write_json(data, args.json)


if __name__ == "__main__":
    main()
