"""Train, evaluate and export the demo chest CT slice model ``ct_nodule`` (synthetic data).

    .venv/bin/pip install -e '.[train]'
    .venv/bin/python models/training/train_ct.py --out models/ct_nodule --seed 0

A slice-level lung nodule detector: each axial slice is one image. The input is two VOI windows
of the Hounsfield units (lung and mediastinum), as the server's kernels make them from the
sidecar's ``windows``. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Dataset, arguments, grid_targets, run  # noqa: E402
from synthetic import synthesize_ct_slice  # noqa: E402

SIZE = 256
GRID = 32
LABELS = ("nodule",)
#: (centre, width) in HU: lung and mediastinal windows, as in models/ct_nodule/nidaan.toml.
WINDOWS = ((-600.0, 1500.0), (40.0, 400.0))
MEAN, STD = 0.5, 0.25


def windowed(hu: np.ndarray) -> np.ndarray:
    """One channel per window, DICOM PS3.3 C.11.2.1.2.1 LINEAR, display values in [0, 1]."""
    return np.stack(
        [np.clip((hu - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0) for c, w in WINDOWS]
    ).astype(np.float32)


def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One normalised two-window slice, its label and its GRID x GRID lesion target."""
    nodule = rng.random() < 0.4
    hu, mask = synthesize_ct_slice(rng, SIZE, nodule=nodule)
    return (
        (windowed(hu) - MEAN) / STD,
        np.array([nodule], np.float32),
        grid_targets([mask], SIZE, GRID),
    )


def dataset(seed: int, n: int) -> Dataset:
    rng = np.random.default_rng(seed)
    xs, ys, ts = zip(*(sample(rng) for _ in range(n)), strict=True)
    return (
        torch.from_numpy(np.stack(xs)),
        torch.from_numpy(np.stack(ys)),
        torch.from_numpy(np.stack(ts)),
    )


if __name__ == "__main__":
    args = arguments(__doc__.split("\n")[0], "models/ct_nodule", 3000, 500, 1000, 10)
    run(args, dataset, LABELS, channels=len(WINDOWS), size=SIZE)
