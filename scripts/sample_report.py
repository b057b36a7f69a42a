"""Write the sample report and overlay shown in the README (docs/samples/).

    .venv/bin/python scripts/sample_report.py

A synthetic chest radiograph with two planted nodules (the demo model's own generator, a real CR
header from pydicom-data, made-up patient data) goes through the real pipeline (``cxr_screen``)
and the real writers: the SR in English and Hindi rendered by dcmtk's ``dsr2html`` and
``dsrdump``, that HTML photographed by Debian's chromium (Playwright, no browser download) as
``report.png``, and the Secondary Capture fallback saved as ``overlay.png`` (and the top band of a
Hindi peer's, ``overlay-hi.png``).
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nidaan.core.config import InferenceConfig
from nidaan.pacs_bridge.languages import load_language
from nidaan.pacs_bridge.lesions import group_findings
from nidaan.pacs_bridge.overlays import build_secondary_captures, overlay_uids
from nidaan.pacs_bridge.reports import (
    build_report,
    report_uids,
    software_version,
    study_attributes,
)
from nidaan.server.backends import create_backend
from nidaan.server.model_repository import load_repository
from nidaan.server.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "samples"


def _radiograph() -> pydicom.Dataset:
    spec = importlib.util.spec_from_file_location(
        "synthetic", ROOT / "models" / "training" / "synthetic.py"
    )
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rng = np.random.default_rng(7)
    img, _ = gen.synthesize_radiograph(rng, 1024, 900, nodule=True, tb=True)
    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        sys.exit("pydicom-data is needed: pip install pydicom-data")
    ds = copy.deepcopy(pydicom.dcmread(path, stop_before_pixels=True))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = "Sample^Synthetic", "SAMPLE-0001"
    ds.Rows, ds.Columns = 1024, 900
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.clip(np.round(img * 4095), 0, 4095).astype(np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _photograph(html: Path, png: Path) -> None:
    """The rendered report as a radiologist's browser shows it: Debian's chromium, headless,
    through Playwright (Devanagari from fonts-lohit-deva), the whole page."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium", path="/usr/bin:/usr/local/bin")
    if chromium is None:
        sys.exit("chromium is needed: apt-get install chromium fonts-lohit-deva")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(html.resolve().as_uri())
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    models = load_repository(ROOT / "models")
    pipeline = Pipeline(models, create_backend(InferenceConfig(), models))
    ds = _radiograph()
    analyses = pipeline.analyse([ds])
    findings = group_findings(analyses)
    study = str(ds.StudyInstanceUID)
    series, sop = report_uids(study, "sample")
    sr = build_report(
        analyses,
        findings=findings,
        series_instance_uid=series,
        sop_instance_uid=sop,
        device_observer_uid="2.25.1",
        institution_name="Sample Hospital",
        language="hi",
    )
    sr_path = OUT / "report.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    for tool, args, name in (
        ("dsr2html", ["+U8"], "report.html"),
        ("dsrdump", ["+U8", "+Pl"], "report.txt"),
    ):
        exe = shutil.which(tool, path="/usr/bin:/usr/local/bin")
        if exe is None:
            sys.exit(f"{tool} is needed: apt-get install dcmtk")
        run = subprocess.run([exe, *args, str(sr_path)], capture_output=True, check=True)
        (OUT / name).write_bytes(run.stdout)
    sr_path.unlink()
    _photograph(OUT / "report.html", OUT / "report.png")
    if any(f.present and f.parts for f in findings):
        # The English SC whole; a Hindi peer's (its own UIDs), its top quarter, where the text is.
        for language, name, rows in (("", "overlay.png", 1), ("hi", "overlay-hi.png", 4)):
            kind = "sc" + (f"|{language}" if language else "")
            sc_series, uids = overlay_uids(kind, "sample", [str(ds.SOPInstanceUID)])
            (sc,) = build_secondary_captures(
                findings,
                {str(ds.SOPInstanceUID): ds},
                series_instance_uid=sc_series,
                sop_instance_uids=uids,
                software_versions=software_version(),
                study_attributes=study_attributes([ds]),
                language=load_language(language) if language else None,
            )
            pixels = sc.pixel_array[: sc.pixel_array.shape[0] // rows]
            Image.fromarray(pixels).save(OUT / name, optimize=True)
    pipeline.backend.close()
    pipeline.close()
    for f in findings:
        state = "present" if f.present else "absent"
        print(f"{f.label}: {state} p={f.probability:.3f} parts={len(f.parts)} size={f.size_mm}")


if __name__ == "__main__":
    main()
