"""Throughput of the embedded dynamic batcher against unbatched concurrent calls.

    .venv/bin/python benchmarks/batching.py [--callers 16] [--requests 256] [--rounds 5]
                                            [--smoke] [--json PATH]

``--callers`` threads each send one-image requests (as many studies or API callers would) to a
demo model, ``--requests`` in all. Baseline, in the same run and alternated with it: the same
threads calling ONNX Runtime directly, one image per run (its sessions are thread-safe). Reports
the median images/s of each over ``--rounds`` and the batcher's mean batch size. Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # report.py, also when not run as a script

import report  # noqa: E402

from nidaan.server.batching import DynamicBatcher  # noqa: E402
from nidaan.server.inference import InferenceBackend, OnnxRuntimeBackend  # noqa: E402
from nidaan.server.model_repository import ModelSpec, load_repository  # noqa: E402


def _rate(
    backend: InferenceBackend, model: ModelSpec, inputs: list[np.ndarray], callers: int
) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        for _ in pool.map(lambda x: backend.infer(model, x), inputs):
            pass
    return len(inputs) / (time.perf_counter() - started)


def measure(callers: int, requests: int, rounds: int) -> list[dict[str, Any]]:
    """Per model: median images/s unbatched and batched, mean batch size, and the line to print."""
    models = load_repository(ROOT / "models")
    engine = OnnxRuntimeBackend()
    out = []
    for model in models:
        shape = (1, model.input.channels, model.input.height, model.input.width)
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(requests)]
        batcher = DynamicBatcher(engine, [model])
        engine.infer(model, inputs[0])  # load the session outside the timing
        direct, batched = [], []
        for _ in range(rounds):
            direct.append(_rate(engine, model, inputs, callers))
            batched.append(_rate(batcher, model, inputs, callers))
        stats = batcher.stats()[model.name]
        batcher.stop()
        d, b = statistics.median(direct), statistics.median(batched)
        mean_batch = stats.inference_count / stats.execution_count
        print(
            f"{model.name}: {callers} callers, {requests} one-image requests, "
            f"median of {rounds} alternated rounds on {np.prod(shape[1:]) * 4 / 1e6:.2f} MB "
            f"inputs\n  unbatched {d:7.1f} images/s\n  batched   {b:7.1f} images/s "
            f"({b / d:.2f}x), mean batch {mean_batch:.1f} "
            f"images over {stats.execution_count} batches",
            flush=True,
        )
        out.append({"model": model.name, "direct": d, "batched": b, "mean_batch": mean_batch})
    return out


def run(
    smoke: bool = False, *, callers: int = 16, requests: int = 256, rounds: int = 5
) -> dict[str, Any]:
    """The benchmark convention's dict (benchmarks/README.md); ``smoke``: 4 callers, 32
    requests, 1 round."""
    if smoke:
        callers, requests, rounds = 4, 32, 1
    measured = measure(callers, requests, rounds)
    rows = []
    for m in measured:
        rows.append(
            report.row(
                f"{m['model']}: batched, {callers} callers (mean batch {m['mean_batch']:.1f})",
                m["batched"],
                "images/s",
                baseline="ONNX Runtime called directly from the same threads",
                baseline_value=m["direct"],
            )
        )
    args = [] if smoke else [f"--callers {callers}", f"--requests {requests}", f"--rounds {rounds}"]
    return report.result(
        "batching",
        f"Embedded dynamic batcher vs direct ONNX Runtime calls, {callers} threads sending "
        "one-image requests",
        report.command_line("batching.py", smoke, *args),
        rows,
        report.plot_spec(
            "bar",
            "Embedded batcher vs direct calls",
            "model",
            "images/s",
            [m["model"] for m in measured],
            {
                "direct": [m["direct"] for m in measured],
                "batched": [m["batched"] for m in measured],
            },
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    report.add_convention_arguments(parser)
    args = parser.parse_args()
    data = run(args.smoke, callers=args.callers, requests=args.requests, rounds=args.rounds)
    report.write_json(data, args.json)


if __name__ == "__main__":
    main()
