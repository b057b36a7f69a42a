"""Throughput of the embedded dynamic batcher against unbatched concurrent calls.

    .venv/bin/python benchmarks/batching.py [--callers 16] [--requests 256] [--rounds 5]

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    models = load_repository(ROOT / "models")
    engine = OnnxRuntimeBackend()
    for model in models:
        shape = (1, model.input.channels, model.input.height, model.input.width)
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(args.requests)]
        batcher = DynamicBatcher(engine, [model])
        engine.infer(model, inputs[0])  # load the session outside the timing
        direct, batched = [], []
        for _ in range(args.rounds):
            direct.append(_rate(engine, model, inputs, args.callers))
            batched.append(_rate(batcher, model, inputs, args.callers))
        stats = batcher.stats()[model.name]
        batcher.stop()
        d, b = statistics.median(direct), statistics.median(batched)
        print(
            f"{model.name}: {args.callers} callers, {args.requests} one-image requests, "
            f"median of {args.rounds} alternated rounds on {np.prod(shape[1:]) * 4 / 1e6:.2f} MB "
            f"inputs\n  unbatched {d:7.1f} images/s\n  batched   {b:7.1f} images/s "
            f"({b / d:.2f}x), mean batch {stats.inference_count / stats.execution_count:.1f} "
            f"images over {stats.execution_count} batches",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
