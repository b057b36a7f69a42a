"""Real DICOM inputs for tests: pydicom-data's chest radiograph, and synthetic ones built from real
headers (pydicom-data's CR, pydicom's CT) with pixels from the demo models' generator
(models/training/synthetic.py)."""

from __future__ import annotations

import copy
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]


def sample_file(name: str) -> Path:
    """A file from pydicom's test data or pydicom-data (e.g. RG1_UNCR.dcm, RG1_J2KR.dcm)."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not in pydicom's test data (pip install pydicom-data)")
    return Path(str(path))


@cache
def synthetic_module():  # type: ignore[no-untyped-def]
    """The demo model's NumPy-only generator, loaded by path (models/ is not a package)."""
    path = ROOT / "models" / "training" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("nidaan_synthetic", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _rg1_header() -> Dataset:
    return pydicom.dcmread(sample_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def synthetic_cxr(
    seed: int,
    *,
    nodule: bool = False,
    tb: bool = False,
    rows: int = 1024,
    columns: int = 900,
    study_uid: str | None = None,
    monochrome1: bool = False,
) -> tuple[Dataset, dict[str, np.ndarray]]:
    """A 12-bit chest radiograph with a real CR header and synthetic pixels; also lesion masks."""
    gen = synthetic_module()
    rng = np.random.default_rng(seed)
    img, masks = gen.synthesize_radiograph(rng, rows, columns, nodule=nodule, tb=tb)
    stored = np.clip(np.round(img * 4095.0), 0, 4095).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    ds = copy.deepcopy(_rg1_header())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    for kw in ("RescaleSlope", "RescaleIntercept"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    return ds, masks


@cache
def _ct_header() -> Dataset:
    from pydicom import examples

    ds = copy.deepcopy(examples.ct)
    del ds.PixelData
    return ds


def synthetic_ct_series(
    seed: int,
    nodule_slices: tuple[int, ...] = (),
    *,
    slices: int = 4,
    size: int = 512,
    study_uid: str | None = None,
    patient: Dataset | None = None,
) -> tuple[list[Dataset], dict[int, np.ndarray]]:
    """An axial chest CT series (signed 16-bit, Rescale Intercept -1024) with a real CT header and
    synthetic slices; a nodule in each slice listed in ``nodule_slices``. Also the nodule masks.

    ``patient``: a dataset whose Patient module the slices take (to share a study with it)."""
    gen = synthetic_module()
    rng = np.random.default_rng(seed)
    study = study_uid or generate_uid()
    series = generate_uid()
    out, masks = [], {}
    for k in range(slices):
        hu, mask = gen.synthesize_ct_slice(rng, size, nodule=k in nodule_slices)
        if k in nodule_slices:
            masks[k] = mask
        ds = copy.deepcopy(_ct_header())
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        if patient is not None:  # one patient's study: its Patient and General Study modules
            for kw in (
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "PatientSex",
                "StudyID",
                "StudyDate",
                "StudyTime",
                "AccessionNumber",
                "ReferringPhysicianName",
                "StudyDescription",
            ):
                setattr(ds, kw, patient.get(kw, ""))
        ds.ImagePositionPatient = [-250.0, -250.0, -100.0 - 5.0 * k]
        ds.SliceLocation = -100.0 - 5.0 * k
        ds.BodyPartExamined = "CHEST"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [500.0 / size, 500.0 / size]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        stored = np.round(hu + 1024.0).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        out.append(ds)
    return out, masks


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def with_new_uids(path: Path, out: Path) -> Path:
    """A copy of a real file as a new study (new Study/Series/SOP UIDs; pixel data untouched).

    pydicom-data's RG1 files share one study: tests that send both need them apart.
    """
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return save(ds, out)
