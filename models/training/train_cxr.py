"""Train, evaluate and export the demo chest-radiograph model ``cxr_screen`` (synthetic data).

    .venv/bin/pip install -e '.[train]'
    .venv/bin/python models/training/train_cxr.py --out models/cxr_screen --seed 0

Deterministic for a given seed on one CPU thread. Writes ``<out>/1/model.onnx``,
``<out>/metrics.json`` and the operating thresholds into ``<out>/nidaan.toml``. Only this script
needs torch; Nidaan's runtime reads the ONNX file.

The network is a small fully convolutional detector: a 32 x 32 heatmap of logits per finding,
and an image-level logit by log-sum-exp pooling of the heatmap, so the image score is driven by
where the model sees the lesion (and the heatmap peak localises it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
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
    target = np.zeros((len(LABELS), GRID, GRID), np.float32)
    for k, label in enumerate(LABELS):
        m = np.zeros((SIZE, SIZE), bool)
        m[oy : oy + h, ox : ox + w] = masks[label]
        target[k] = m.reshape(GRID, SIZE // GRID, GRID, SIZE // GRID).any(axis=(1, 3))
    labels = np.array([nodule, tb], np.float32)
    return (canvas - MEAN) / STD, labels, target


def dataset(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    xs, ys, ts = zip(*(letterboxed_sample(rng) for _ in range(n)), strict=True)
    return (
        torch.from_numpy(np.stack(xs)[:, None]),
        torch.from_numpy(np.stack(ys)),
        torch.from_numpy(np.stack(ts)),
    )


def block(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CxrScreen(nn.Module):
    """Heatmap logits per finding at 1/8 resolution, image logit = LSE pooling + bias."""

    def __init__(self, n: int = len(LABELS), r: float = 8.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            block(1, 12, 5, 2),
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
    model: CxrScreen, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, thresholds: list[float]
) -> dict[str, dict[str, float]]:
    model.eval()
    with torch.no_grad():
        probs, heat = zip(*(model(x[i : i + 64]) for i in range(0, len(x), 64)), strict=True)
    p = torch.cat(probs).numpy()
    h = torch.cat(heat).numpy()
    out = {}
    for k, label in enumerate(LABELS):
        lab = y[:, k].numpy()
        pred = p[:, k] >= thresholds[k]
        tp = np.nonzero(pred & (lab == 1))[0]
        hits = 0
        for i in tp:  # does the heatmap peak fall on the lesion (dilated by one cell)?
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


def export(model: CxrScreen, path: Path) -> float:
    """Export to ONNX (opset 17, dynamic batch) and return max |torch - onnxruntime|."""
    import onnx
    import onnxruntime as ort

    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 1, SIZE, SIZE)
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
    x = torch.randn(3, 1, SIZE, SIZE)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/cxr_screen"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=600)
    parser.add_argument("--test", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    # Separate seeds: training, validation (threshold choice) and held-out test never overlap.
    x, y, t = dataset(args.seed * 1000 + 1, args.train)
    xv, yv, tv = dataset(args.seed * 1000 + 2, args.val)
    xt, yt, tt = dataset(args.seed * 1000 + 3, args.test)
    print(f"data: {args.train}/{args.val}/{args.test} images in {time.time() - started:.0f} s")
    model = CxrScreen()
    steps = args.epochs * (args.train // 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    bce = nn.BCEWithLogitsLoss()
    # Lesion cells are ~0.3% of the heatmap: weigh them up, or the heatmap learns "all clear".
    heat_bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(25.0))
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
    thresholds = [youden_threshold(pv[:, k], yv[:, k].numpy()) for k in range(len(LABELS))]
    metrics = evaluate(model, xt, yt, tt, thresholds)
    diff = export(model, args.out / "1" / "model.onnx")
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


if __name__ == "__main__":
    main()
