"""A synthetic chest CT *volume* for tests of lesions that span slices.

One base anatomy (``synthesize_ct_slice`` of the demo models' generator, without a nodule) runs
through every slice, as a straight stack of the same chest, with fresh quantum noise per slice;
spherical nodules are planted in it: on slice z a nodule of radius R centred at slice position
z0 has the cross-section radius sqrt(R^2 - (z - z0)^2), with the generator's solid-nodule
density (+820 to +900 HU over the lung) and a 2 mm soft edge centred on that radius. Each slice
has a real CT header (pydicom's example CT) with Image Position/Orientation (Patient), Slice
Thickness, Spacing Between Slices and Pixel Spacing that agree with where the pixels are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from factory import ct_header, synthetic_module

#: Width of a nodule's soft edge in mm (density ramps from full to none across it).
EDGE_MM = 2.0
#: HU below which a pixel counts as aerated lung when choosing where a nodule fits.
LUNG_HU = -600.0


@dataclass(frozen=True)
class Nodule:
    """A nodule to plant: near (``y``, ``x``) (fractions of the image height and width), centred on
    slice ``slice`` (0 = the top, most superior slice), ``diameter_mm`` across."""

    y: float
    x: float
    slice: int
    diameter_mm: float


@dataclass(frozen=True)
class Planted:
    """Where a nodule was planted: its centre in source pixels (column, row; SCOORD, pixel
    centres at +0.5), its centre slice, diameter, and the slices it shows on."""

    column: float
    row: float
    slice: int
    diameter_mm: float
    slices: tuple[int, ...]
    density_hu: float


def _clear_lung(hu: np.ndarray, near: tuple[float, float], radius_px: float) -> tuple[int, int]:
    """The pixel nearest ``near`` (row, column) around which a disc of ``radius_px`` is all
    aerated lung (no vessel, wall or mediastinum)."""
    size = hu.shape[0]
    r = int(math.ceil(radius_px))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = yy**2 + xx**2 <= radius_px**2
    rows, cols = np.mgrid[r : size - r, r : size - r]
    dist = (rows - near[0]) ** 2 + (cols - near[1]) ** 2
    for i in np.argsort(dist, axis=None, kind="stable"):
        row, col = int(rows.flat[i]), int(cols.flat[i])
        if hu[row - r : row + r + 1, col - r : col + r + 1][disc].max() < LUNG_HU:
            return row, col
    raise ValueError(f"no room in the lungs for a nodule of radius {radius_px:.1f} pixels")


def synthetic_ct_volume(
    seed: int,
    nodules: Sequence[Nodule],
    *,
    slices: int = 40,
    size: int = 512,
    fov_mm: float = 500.0,
    spacing_mm: float = 2.5,
    top_mm: float = -50.0,
    study_uid: str | None = None,
) -> tuple[list[Dataset], list[Planted]]:
    """An axial chest CT series of ``slices`` contiguous slices (superior first, ``spacing_mm``
    apart and thick, the top one at z = ``top_mm``) with ``nodules`` planted; also where."""
    gen = synthetic_module()
    rng = np.random.default_rng(seed)
    base, _ = gen.synthesize_ct_slice(rng, size, nodule=False)
    base = base.astype(np.float64)
    pixel = fov_mm / size
    centre = np.arange(size) + 0.5  # SCOORD of pixel centres
    planted = []
    volume = np.repeat(base[None], slices, axis=0)
    for nodule in nodules:
        radius = nodule.diameter_mm / 2.0
        row, col = _clear_lung(
            base, (nodule.y * size, nodule.x * size), (radius + EDGE_MM + 2.0) / pixel
        )
        density = float(rng.uniform(820.0, 900.0))
        cx, cy = col + 0.5, row + 0.5
        d = np.hypot(centre[None, :] - cx, centre[:, None] - cy) * pixel  # mm from the centre
        shows = []
        for k in range(slices):
            dz = (k - nodule.slice) * spacing_mm
            if abs(dz) >= radius:
                continue
            r_k = math.sqrt(radius**2 - dz**2)
            profile = np.clip((r_k - d) / EDGE_MM + 0.5, 0.0, 1.0)
            volume[k] += density * profile
            shows.append(k)
        planted.append(Planted(cx, cy, nodule.slice, nodule.diameter_mm, tuple(shows), density))
    study = study_uid or generate_uid()
    series, frame = generate_uid(), generate_uid()
    out = []
    for k in range(slices):
        hu = volume[k] + rng.normal(0.0, 8.0, (size, size))
        z = top_mm - k * spacing_mm
        ds = copy.deepcopy(ct_header())
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.FrameOfReferenceUID = frame
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "CHEST"
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        # Image Position (Patient) is the centre of the first pixel (PS3.3 C.7.6.2.1.1).
        ds.ImagePositionPatient = [-fov_mm / 2 + pixel / 2, -fov_mm / 2 + pixel / 2, z]
        ds.SliceLocation = z
        ds.SliceThickness = ds.SpacingBetweenSlices = spacing_mm
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [pixel, pixel]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        stored = np.round(np.clip(hu, -1024.0, 3071.0) + 1024.0).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        out.append(ds)
    return out, planted
