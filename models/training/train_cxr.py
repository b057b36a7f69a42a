"""Train, evaluate and export the demo chest-radiograph model ``cxr_screen`` (synthetic data).

    .venv/bin/pip install -e '.[train]'
    .venv/bin/python models/training/train_cxr.py --out models/cxr_screen --seed 0

Deterministic for a given seed and thread count. Writes ``<out>/1/model.onnx``,
``<out>/metrics.json`` and the operating thresholds into ``<out>/nidaan.toml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Dataset, arguments, grid_targets, run  # noqa: E402
from synthetic import synthesize_radiograph  # noqa: E402

SIZE = 256
GRID = 32
LABELS = ("nodule", "tb")
MEAN, STD = 0.5, 0.25


def letterboxed_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample as the server would present it: a random-aspect image letterboxed
    into SIZE x SIZE (black padding), normalised; its labels and its GRID x GRID lesion targets."""
    nodule, tb = rng.random() < 1 / 3, rng.random() < 1 / 3
    aspect = rng.uniform(0.75, 1.3)  # height / width
    h, w = (SIZE, round(SIZE / aspect)) if aspect >= 1 else (round(SIZE * aspect), SIZE)
    img, masks = synthesize_radiograph(rng, h, w, nodule=nodule, tb=tb)
    canvas = np.zeros((SIZE, SIZE), np.float32)
    oy, ox = (SIZE - h) // 2, (SIZE - w) // 2
    canvas[oy : oy + h, ox : ox + w] = img
    placed = []
    for label in LABELS:
        m = np.zeros((SIZE, SIZE), bool)
        m[oy : oy + h, ox : ox + w] = masks[label]
        placed.append(m)
    target = grid_targets(placed, SIZE, GRID)
    labels = np.array([nodule, tb], np.float32)
    return (canvas - MEAN) / STD, labels, target


def dataset(seed: int, n: int) -> Dataset:
    rng = np.random.default_rng(seed)
    xs, ys, ts = zip(*(letterboxed_sample(rng) for _ in range(n)), strict=True)
    return (
        torch.from_numpy(np.stack(xs)[:, None]),
        torch.from_numpy(np.stack(ys)),
        torch.from_numpy(np.stack(ts)),
    )


if __name__ == "__main__":
    args = arguments(__doc__.split("\n")[0], "models/cxr_screen", 4000, 600, 1200, 10)
    run(args, dataset, LABELS, channels=1, size=SIZE)
