"""The report: AI findings as a DICOM Comprehensive 3D SR with a TID 1500 Measurement Report.

Structure (PS3.16 TID 1500 "Measurement Report"):

* Observer context: a device observer (TID 1004) naming this Nidaan instance.
* Procedure reported: chest radiography (the studies Nidaan's models read).
* One measurement group per finding per analysed image:

  - present findings with a region: TID 1410 "Planar ROI Measurements and Qualitative
    Evaluations", whose Image Region is a closed POLYLINE (5 points, a rectangle) in the source
    image's pixel coordinates (SCOORD, PS3.3 C.18.6.1.1);
  - other findings: TID 1501 "Measurement and Qualitative Evaluation Group" with the source image
    referenced;
  - each group names the finding (Finding Type = the model's code), the algorithm and its version
    (TID 4019 Algorithm Identification), the model's probability as the measurement "Certainty of
    Finding" (DCM 111012, CID 6048, in UCUM "1", i.e. a ratio in [0, 1]), and whether the finding
    is present at the model's operating threshold (a qualitative evaluation, SCT Present/Absent).

A model trained on synthetic data is marked NOT FOR DIAGNOSIS twice: in the Series Description
(what a PACS shows in its study browser) and as a TID 4019 Algorithm Parameter, the one TEXT item
TID 1500 allows inside each measurement group, so it travels with every finding.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from nidaan.server.findings import BoundingBox, CodedValue, Finding, ImageAnalysis

from .uids import derived_uid

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
#: SCT 399208008 "Plain chest X-ray": the procedure the reported images belong to.
_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


def report_uids(study_instance_uid: str, key: str) -> tuple[str, str]:
    """Deterministic (Series Instance UID, SOP Instance UID) of a report.

    Derived (as ``2.25.<hash>`` UIDs, PS3.5 B.2) from the study and ``key`` (the models' versions
    and the analysed instances), so building the same report again yields the same UIDs and a
    re-sent report replaces, rather than duplicates, the one in the PACS.
    """
    if not study_instance_uid or not key:
        raise ValueError("report UIDs need a study UID and a key")
    return (
        derived_uid("sr-series", study_instance_uid, key),
        derived_uid("sr-instance", study_instance_uid, key),
    )


def _concept(code: CodedValue) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _polyline(box: BoundingBox, rows: int, columns: int) -> np.ndarray:
    # Clip to the image so the region never points outside it (dciodvfy checks nothing here, but
    # viewers may refuse such coordinates).
    x0, x1 = max(0.0, box.x_min), min(float(columns), box.x_max)
    y0, y1 = max(0.0, box.y_min), min(float(rows), box.y_max)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _group(
    analysis: ImageAnalysis,
    finding: Finding,
    tracking_uid: str,
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    algo = analysis.algorithm
    params = (
        [f"{NOT_FOR_DIAGNOSIS}: trained on synthetic images only"]
        if algo.not_for_diagnosis
        else None
    )
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algo.name, version=algo.version, parameters=params
    )
    finding_type = _concept(finding.code)
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid, identifier=f"{finding.label} ({algo.name} {algo.version})"[:64]
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=round(finding.probability, 6),
            unit=_NO_UNITS,
            algorithm_id=algorithm_id,
        )
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=finding_type, value=codes.SCT.Present if finding.present else codes.SCT.Absent
        )
    ]
    src = analysis.source
    if finding.region is not None and finding.present:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_polyline(finding.region, int(src.Rows), int(src.Columns)),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=src.SOPClassUID,
                referenced_sop_instance_uid=src.SOPInstanceUID,
            ),
        )
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=region,
            finding_type=finding_type,
            algorithm_id=algorithm_id,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_type,
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=src.SOPClassUID,
                referenced_sop_instance_uid=src.SOPInstanceUID,
            )
        ],
    )


def build_report(
    analyses: Sequence[ImageAnalysis],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    device_observer_uid: str,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the SR for one study's analyses; raise ValueError naming what is inconsistent."""
    if not analyses:
        raise ValueError("a report needs at least one analysed image")
    studies = {str(a.source.StudyInstanceUID) for a in analyses}
    if len(studies) != 1:
        raise ValueError(f"analyses come from {len(studies)} studies; a report covers one study")
    for a in analyses:
        for kw in ("Rows", "Columns"):
            if kw not in a.source:
                raise ValueError(f"source image header lacks {kw}")
    groups = []
    for i, a in enumerate(analyses):
        for j, f in enumerate(a.findings):
            tracking = derived_uid("sr-tracking", sop_instance_uid, str(i), str(j), f.label)
            groups.append(_group(a, f, str(tracking)))
    if not groups:
        raise ValueError("the analyses hold no findings to report")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid,
            name="Nidaan",
            manufacturer_name="Nidaan",
            model_name="Nidaan inference server",
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_CHEST_XRAY,
        imaging_measurements=groups,
    )
    # Evidence: one header per analysed image, each once (highdicom copies the patient and
    # study modules from it and lists it in Current Requested Procedure Evidence Sequence).
    evidence: dict[str, Dataset] = {}
    for a in analyses:
        evidence.setdefault(str(a.source.SOPInstanceUID), a.source)
    synthetic = any(a.algorithm.not_for_diagnosis for a in analyses)
    description = "Nidaan AI findings" + (f" - {NOT_FOR_DIAGNOSIS}" if synthetic else "")
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence.values()),
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer="Nidaan",
        institution_name=institution_name,
        is_complete=True,
        series_description=description,
    )
    return sr
