"""Synthetic chest-radiograph-like images with planted lesions (NumPy only, deterministic).

Used to train the demo model (``train_cxr.py``) and by Nidaan's tests to make DICOM inputs with a
known answer. The images are display-space floats in [0, 1], MONOCHROME2 convention (air dark,
bone and soft tissue bright). They are not radiographs: a model trained on them learns nothing
about real disease.
"""

from __future__ import annotations

import numpy as np


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: y in [0, 1] top to bottom, x in [0, 1] left to right."""
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    return y[:, None], x[None, :]


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float, soft: float
) -> np.ndarray:
    d = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return np.clip((1.0 - d) / soft, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled bilinearly."""
    gh, gw = cells + 1, cells + 1
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    yi = np.linspace(0, gh - 1, height, dtype=np.float32)
    xi = np.linspace(0, gw - 1, width, dtype=np.float32)
    y0 = np.minimum(yi.astype(int), gh - 2)
    x0 = np.minimum(xi.astype(int), gw - 2)
    fy = (yi - y0)[:, None]
    fx = (xi - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def _lungs(y: np.ndarray, x: np.ndarray, anatomy: dict[str, float]) -> tuple[np.ndarray, ...]:
    cy, sep, ry, rx = anatomy["cy"], anatomy["sep"], anatomy["ry"], anatomy["rx"]
    right = _ellipse(y, x, cy, 0.5 - sep, ry, rx, 0.25)  # patient's right: image left
    left = _ellipse(y, x, cy + 0.02, 0.5 + sep, ry * 0.97, rx * 0.95, 0.25)
    return right, left


def synthesize_radiograph(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 256,
    nodule: bool = False,
    tb: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One synthetic frontal chest image and its lesion masks ("nodule", "tb").

    Returns a float32 (height, width) image in [0, 1] and boolean masks of the same shape.
    """
    y, x = _grid(height, width)
    # Anatomy varies: position, size, lung separation (small shifts and scale).
    anatomy = {
        "cy": 0.47 + rng.uniform(-0.04, 0.04),
        "sep": 0.19 + rng.uniform(-0.02, 0.02),
        "ry": 0.30 + rng.uniform(-0.03, 0.03),
        "rx": 0.14 + rng.uniform(-0.015, 0.015),
    }
    xc = 0.5 + rng.uniform(-0.03, 0.03)
    body = _ellipse(y, x, 0.55, xc, 0.65, 0.44 + rng.uniform(-0.04, 0.03), 0.08)
    img = 0.05 + 0.55 * body
    right, left = _lungs(y, x - (xc - 0.5), anatomy)
    lungs = np.maximum(right, left)
    img = img - 0.38 * lungs
    # Mediastinum and heart shadow, bright, slightly to the patient's left (image right).
    heart = _ellipse(y, x, anatomy["cy"] + 0.17, xc + 0.06, 0.14, 0.13, 0.35)
    mediastinum = np.clip(1.0 - np.abs(x - xc) / 0.06, 0, 1) * (y > 0.12) * (y < 0.75)
    img = img + 0.22 * heart + 0.12 * mediastinum
    # Diaphragm domes: brightness below a curve.
    dome = anatomy["cy"] + anatomy["ry"] * 0.85 - 0.08 * np.cos((x - xc) * 6.0)
    img = img + 0.25 * np.clip((y - dome) / 0.03, 0, 1) * body
    # Ribs: faint curved bands over the lungs; clavicles across the top.
    n_ribs = 9
    phase = rng.uniform(0, 2 * np.pi)
    rib_curve = y + 0.10 * (x - xc) ** 2 * 4.0
    ribs = 0.5 + 0.5 * np.sin(rib_curve * n_ribs * 2 * np.pi / 0.7 + phase)
    img = img + 0.07 * (ribs**4) * lungs
    for side in (-1, 1):
        clav = np.exp(-(((y - 0.16 - 0.08 * np.abs(x - xc)) / 0.012) ** 2))
        img = img + 0.10 * clav * (np.sign(x - xc) == side) * (np.abs(x - xc) < 0.3)
    # Texture and noise.
    img = img + 0.03 * _smooth_noise(rng, height, width, 12) * lungs
    img = img + 0.02 * _smooth_noise(rng, height, width, 5)

    masks = {"nodule": np.zeros((height, width), bool), "tb": np.zeros((height, width), bool)}
    px = 1.0 / max(height, width)
    if nodule:
        side = right if rng.random() < 0.5 else left
        for _ in range(200):  # a centre well inside a lung field
            cy, cx = rng.uniform(0.2, 0.75), rng.uniform(0.2, 0.8)
            iy = min(int(cy * height), height - 1)
            ix = min(int(cx * width), width - 1)
            if side[iy, ix] > 0.8:
                break
        r = rng.uniform(0.02, 0.045)
        ry_, rx_ = r * width / height * max(height, width) / width, r
        ry_ = r * max(height, width) / height
        rx_ = r * max(height, width) / width
        blob = _ellipse(y, x, cy, cx, ry_, rx_, 0.5)
        img = img + rng.uniform(0.10, 0.22) * blob
        masks["nodule"] = blob > 0.05
    if tb:
        upper = right if rng.random() < 0.5 else left
        zone = upper * (y < anatomy["cy"] - 0.02)
        ys, xs = np.nonzero(zone > 0.7)
        patch = np.zeros((height, width), np.float32)
        if len(ys):
            for _ in range(int(rng.integers(4, 8))):
                k = int(rng.integers(len(ys)))
                cy, cx = (ys[k] + 0.5) / height, (xs[k] + 0.5) / width
                rr = rng.uniform(0.025, 0.06)
                patch = np.maximum(
                    patch,
                    _ellipse(
                        y,
                        x,
                        cy,
                        cx,
                        rr * max(height, width) / height,
                        rr * max(height, width) / width,
                        0.8,
                    ),
                )
            patch = patch * (0.6 + 0.4 * np.clip(_smooth_noise(rng, height, width, 20), -1, 1))
            if rng.random() < 0.4:  # a cavity: a dark hole with a bright rim
                k = int(rng.integers(len(ys)))
                cy, cx = (ys[k] + 0.5) / height, (xs[k] + 0.5) / width
                rr = rng.uniform(0.015, 0.03)
                ring = _ellipse(
                    y,
                    x,
                    cy,
                    cx,
                    rr * 1.6 * max(height, width) / height,
                    rr * 1.6 * max(height, width) / width,
                    0.4,
                )
                hole = _ellipse(
                    y,
                    x,
                    cy,
                    cx,
                    rr * max(height, width) / height,
                    rr * max(height, width) / width,
                    0.4,
                )
                patch = np.maximum(patch, ring) - 0.8 * hole
        img = img + rng.uniform(0.10, 0.18) * np.clip(patch, -1, 1)
        masks["tb"] = patch > 0.15
    # Acquisition: global contrast, brightness, gamma, and quantum noise.
    img = np.clip(img, 0.0, 1.0)
    img = img ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0.0, rng.uniform(0.005, 0.02), img.shape) * (1.0 + 0.0 * px)
    return np.clip(img, 0.0, 1.0).astype(np.float32), masks


def lesion_centre(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of a lesion mask in continuous pixel coordinates (corner origin)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("the mask is empty")
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def synthesize_ct_slice(
    rng: np.random.Generator, size: int = 256, nodule: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial chest CT slice in Hounsfield units, and its nodule mask.

    Air, a body with a fat rim, two lung fields with vessels (small bright dots: the distractors a
    nodule detector must ignore), mediastinum, heart, aorta, spine, ribs and the table, with
    quantum noise. A nodule is a larger round soft-tissue or part-solid opacity inside a lung.
    Returns float32 HU of shape (size, size) and a boolean mask of the nodule (empty without one).
    """
    y, x = _grid(size, size)
    hu = np.full((size, size), -1000.0, np.float32)
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    ry, rx = 0.33 + rng.uniform(-0.03, 0.03), 0.43 + rng.uniform(-0.04, 0.03)
    body = _ellipse(y, x, cy, cx, ry, rx, 0.02)
    inner = _ellipse(y, x, cy, cx, ry - 0.03, rx - 0.03, 0.02)
    hu = hu + (900.0 + 60.0 * _smooth_noise(rng, size, size, 6)) * body  # fat: about -100
    hu = hu + 140.0 * inner  # muscle and soft tissue: about +40
    # The table under the patient.
    table = np.exp(-(((y - (cy + ry + 0.04)) / 0.01) ** 2)) * (np.abs(x - 0.5) < 0.45)
    hu = hu + 900.0 * table
    # Ribs: small bright ellipses around the inside of the chest wall.
    for k in range(12):
        a = np.pi * (0.1 + 0.8 * k / 11) * (1 if k % 2 else -1) + rng.uniform(-0.05, 0.05)
        ry_r, rx_r = (ry - 0.045) * np.cos(a), (rx - 0.045) * np.sin(a)
        hu = hu + 600.0 * _ellipse(y, x, cy - ry_r, cx + rx_r, 0.012, 0.02, 0.4)
    lung_ry, lung_rx, sep = 0.25 + rng.uniform(-0.03, 0.02), 0.15, 0.2 + rng.uniform(-0.02, 0.02)
    right = _ellipse(y, x, cy - 0.02, cx - sep, lung_ry, lung_rx, 0.1)
    left = _ellipse(y, x, cy - 0.01, cx + sep, lung_ry * 0.97, lung_rx * 0.93, 0.1)
    lungs = np.maximum(right, left)
    hu = hu - 890.0 * lungs + 25.0 * _smooth_noise(rng, size, size, 16) * lungs
    # Mediastinum: heart, aorta (contrast-enhanced or not), spine with a cortical rim.
    heart = _ellipse(y, x, cy + 0.06, cx + 0.05, 0.12, 0.11, 0.15)
    hu = hu + rng.uniform(0, 40) * heart
    aorta = _ellipse(y, x, cy + 0.05, cx - 0.07, 0.04, 0.04, 0.2)
    hu = hu + rng.choice([0.0, 180.0]) * aorta
    spine_y = cy + ry - 0.1
    vertebra = _ellipse(y, x, spine_y, cx, 0.05, 0.05, 0.2)
    hu = hu + 260.0 * vertebra + 500.0 * np.clip(vertebra * (1 - vertebra) * 4, 0, 1)
    # Vessels: many small dots in the lungs, more and larger towards the hila.
    for _ in range(int(rng.integers(25, 45))):
        side = rng.choice([-1.0, 1.0])
        vy = cy + rng.uniform(-0.2, 0.2)
        vx = cx + side * (sep + rng.uniform(-0.12, 0.12))
        near_hilum = 1.0 - min(1.0, abs(vx - cx) / 0.35)
        r = rng.uniform(0.003, 0.006) + 0.006 * near_hilum * rng.random()
        dot = _ellipse(y, x, vy, vx, r, r * rng.uniform(0.7, 1.4), 0.5)
        lung_here = lungs[min(int(vy * size), size - 1), min(int(vx * size), size - 1)]
        hu = hu + rng.uniform(700, 880) * dot * (lung_here > 0.5)
    mask = np.zeros((size, size), bool)
    if nodule:
        side_mask = right if rng.random() < 0.5 else left
        for _ in range(200):  # a centre well inside a lung field
            ny, nx = rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.9)
            if side_mask[min(int(ny * size), size - 1), min(int(nx * size), size - 1)] > 0.95:
                break
        r = rng.uniform(0.014, 0.035)
        blob = _ellipse(y, x, ny, nx, r * rng.uniform(0.85, 1.15), r, 0.35)
        # Lobulated edge: modulate with low-frequency noise.
        blob = np.clip(blob * (1.0 + 0.3 * _smooth_noise(rng, size, size, 24)), 0, 1)
        density = rng.choice([rng.uniform(820, 900), rng.uniform(450, 650)])  # solid or part-solid
        hu = hu + density * blob
        mask = blob > 0.05
    hu = hu + rng.normal(0.0, rng.uniform(8, 25), hu.shape)
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32), mask
