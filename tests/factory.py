"""Real DICOM inputs for tests: pydicom-data's chest radiograph, and synthetic ones built from real
headers (pydicom-data's CR, pydicom's CT) with pixels from the demo models' generator
(models/training/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from peers import workload

# One implementation for the tests and the benchmarks (benchmarks/workload.py): pydicom-data's
# files, and the synthetic radiographs and CT series built from their real headers.
sample_file = workload().sample_file
synthetic_module = workload().synthetic_module
synthetic_cxr = workload().synthetic_cxr
synthetic_ct_series = workload().synthetic_ct_series
save = workload().save
ct_header = workload().ct_header


def with_new_uids(path: Path, out: Path) -> Path:
    """A copy of a real file as a new study (new Study/Series/SOP UIDs; pixel data untouched).

    pydicom-data's RG1 files share one study: tests that send both need them apart.
    """
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return save(ds, out)
