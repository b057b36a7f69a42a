"""What the demo models' training scripts share: the detector, the training loop, the held-out
evaluation (AUC, sensitivity and specificity at the operating threshold, localisation), the ONNX
export and the report written next to the model.

Only the training scripts need torch; Nidaan's runtime reads the ONNX files.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: A dataset: normalised inputs (N, C, S, S), image labels (N, K), lesion targets (N, K, G, G).
Dataset = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def block(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LsePoolDetector(nn.Module):
    """Heatmap logits per finding at 1/8 resolution, image logit = LSE pooling + bias.

    The image score is driven by where the model sees the lesion, so the heatmap peak localises it.
    """

    def __init__(self, n: int, channels: int = 1, r: float = 8.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            block(channels, 12, 5, 2),
            block(12, 24, 3, 2),
            block(24, 32, 3, 2),
            block(32, 48),
            block(48, 48, dilation=2),
            block(48, 48, dilation=4),
        )
        self.head = nn.Conv2d(48, n, 1)
        self.bias = nn.Parameter(torch.zeros(n))
        self.r = r

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heat = self.head(self.features(x))
        flat = heat.flatten(2)
        lse = (torch.logsumexp(self.r * flat, dim=2) - float(np.log(flat.shape[2]))) / self.r
        return lse + self.bias, heat

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, heat = self.logits(x)
        return torch.sigmoid(image), torch.sigmoid(heat)


def grid_targets(masks: list[np.ndarray], size: int, grid: int) -> np.ndarray:
    """Lesion masks (size x size) max-pooled to the heatmap grid."""
    cell = size // grid
    return np.stack([m.reshape(grid, cell, grid, cell).any(axis=(1, 3)) for m in masks]).astype(
        np.float32
    )


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    best, best_t = -1.0, 0.5
    for t in np.unique(scores):
        pred = scores >= t
        j = pred[labels == 1].mean() + (~pred[labels == 0]).mean() - 1
        if j > best:
            best, best_t = j, float(t)
    return best_t


def evaluate(
    model: LsePoolDetector, data: Dataset, labels: tuple[str, ...], thresholds: list[float]
) -> dict[str, dict[str, float]]:
    """Held-out metrics per finding; localisation = the fraction of true positives whose heatmap
    peak cell falls on the lesion (its grid mask dilated by one cell)."""
    x, y, t = data
    model.eval()
    with torch.no_grad():
        probs, heat = zip(*(model(x[i : i + 64]) for i in range(0, len(x), 64)), strict=True)
    p = torch.cat(probs).numpy()
    h = torch.cat(heat).numpy()
    out = {}
    for k, label in enumerate(labels):
        lab = y[:, k].numpy()
        pred = p[:, k] >= thresholds[k]
        tp = np.nonzero(pred & (lab == 1))[0]
        hits = 0
        for i in tp:
            target = t[i, k].numpy() > 0
            dil = target.copy()
            dil[1:] |= target[:-1]
            dil[:-1] |= target[1:]
            dil[:, 1:] |= dil[:, :-1].copy()
            dil[:, :-1] |= dil[:, 1:].copy()
            peak = np.unravel_index(np.argmax(h[i, k]), h[i, k].shape)
            hits += bool(dil[peak])
        out[label] = {
            "auc": round(auc(p[:, k], lab), 4),
            "threshold": round(thresholds[k], 4),
            "sensitivity": round(float(pred[lab == 1].mean()), 4),
            "specificity": round(float((~pred[lab == 0]).mean()), 4),
            "localisation": round(hits / max(1, len(tp)), 4),
            "positives": int(lab.sum()),
            "negatives": int((lab == 0).sum()),
        }
    return out


def export(model: LsePoolDetector, path: Path, channels: int, size: int) -> float:
    """Export to ONNX (opset 17, dynamic batch) and return max |torch - onnxruntime|."""
    import onnx
    import onnxruntime as ort

    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, channels, size, size)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["probabilities", "heatmap"],
        opset_version=17,
        dynamic_axes={
            "image": {0: "batch"},
            "probabilities": {0: "batch"},
            "heatmap": {0: "batch"},
        },
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        tp, th = model(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    op, oh = sess.run(None, {"image": x.numpy()})
    return float(max(np.abs(op - tp.numpy()).max(), np.abs(oh - th.numpy()).max()))


def write_thresholds(sidecar: Path, thresholds: list[float]) -> None:
    """Put the operating thresholds into the sidecar's [[findings]] (matched by index order)."""
    text = sidecar.read_text()
    parts = text.split("[[findings]]")
    for k in range(min(len(thresholds), len(parts) - 1)):
        parts[k + 1] = re.sub(
            r"threshold = [0-9.]+", f"threshold = {thresholds[k]:.4f}", parts[k + 1], count=1
        )
    sidecar.write_text("[[findings]]".join(parts))


def arguments(description: str, out: str, train: int, val: int, test: int, epochs: int):  # type: ignore[no-untyped-def]
    """The command line every training script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--val", type=int, default=val)
    parser.add_argument("--test", type=int, default=test)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def run(
    args: argparse.Namespace,
    dataset: Callable[[int, int], Dataset],
    labels: tuple[str, ...],
    channels: int,
    size: int,
    heat_pos_weight: float = 25.0,
) -> None:
    """Train on synthetic data, choose thresholds on validation, measure on the held-out test set,
    export ONNX and write ``metrics.json`` and the sidecar's thresholds."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    # Separate seeds: training, validation (threshold choice) and held-out test never overlap.
    x, y, t = dataset(args.seed * 1000 + 1, args.train)
    xv, yv, tv = dataset(args.seed * 1000 + 2, args.val)
    test = dataset(args.seed * 1000 + 3, args.test)
    print(f"data: {args.train}/{args.val}/{args.test} images in {time.time() - started:.0f} s")
    model = LsePoolDetector(len(labels), channels)
    steps = args.epochs * (args.train // 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    bce = nn.BCEWithLogitsLoss()
    # Lesion cells are a tiny share of the heatmap: weigh them up, or it learns "all clear".
    heat_bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(heat_pos_weight))
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x) - 31, 32):
            idx = order[i : i + 32]
            xb = x[idx]
            if torch.rand(1, generator=gen).item() < 0.5:  # left-right flip
                xb, tb = xb.flip(-1), t[idx].flip(-1)
            else:
                tb = t[idx]
            image, heat = model.logits(xb)
            loss = bce(image, y[idx]) + heat_bce(heat, tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {total / (len(x) // 32):.4f} "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
    model.eval()
    with torch.no_grad():
        pv = torch.cat([model(xv[i : i + 64])[0] for i in range(0, len(xv), 64)]).numpy()
    thresholds = [youden_threshold(pv[:, k], yv[:, k].numpy()) for k in range(len(labels))]
    metrics = evaluate(model, test, labels, thresholds)
    diff = export(model, args.out / "1" / "model.onnx", channels, size)
    report = {
        "seed": args.seed,
        "train_images": args.train,
        "validation_images": args.val,
        "test_images": args.test,
        "epochs": args.epochs,
        "threads": args.threads,
        "threshold_rule": "Youden's J on the validation set",
        "onnx_max_abs_diff_vs_torch": diff,
        "wall_seconds": round(time.time() - started, 1),
        "test": metrics,
    }
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    if (args.out / "nidaan.toml").exists():
        write_thresholds(args.out / "nidaan.toml", thresholds)
    print(json.dumps(report, indent=2))
