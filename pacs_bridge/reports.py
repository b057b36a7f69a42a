"""The report: AI findings as a DICOM Comprehensive 3D SR holding a TID 1500 Measurement Report.

The SR joins the *source* study (its Study Instance UID and Patient/Study modules are copied from
the analysed images by highdicom's evidence handling) as a new series, so a PACS files it next to
the images it describes. Content tree (PS3.16 TID 1500 "Measurement Report")::

    CONTAINER Imaging Measurement Report                          TID 1500
      Language of Content Item and Descendants = en-US            TID 1204
      Observer Type = Device, Device Observer UID/Name/...        TID 1002/1004 (device observer)
      Procedure reported = CID 100 code for the source modality   TID 1500 row 4
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group  (one per finding per analysed image)
          Tracking Identifier / Tracking Unique Identifier        TID 4108
          Finding = the model's finding code (Finding.code)       TID 1501/1410 "Finding"
          Algorithm Name/Version/Manufacturer/Family [/Parameters]  TID 4019
          NUM Certainty of Finding = probability, UCUM "1"        TID 300
          CODE <finding code> = Present | Absent                  "Qualitative Evaluations", CID 241
          SCOORD Image Region (closed POLYLINE)  -> IMAGE source  TID 1410 (findings with a region)
          or IMAGE Source of Measurement                          TID 1501 (findings without one)

Choices, and the reason for each:

* Probability: (111012, DCM, "Certainty of Finding"), defined in PS3.16 Annex D as "the likelihood
  that the finding detected is in fact the type of finding identified" (CID 6048), the concept
  DICOM's own CAD templates use for a detector's confidence. The value is the model's probability
  as a ratio in [0, 1] with unit (1, UCUM, "no units"), so a reader needs no scaling. (The CAD SR
  templates, e.g. TID 4104 row 12, pair this concept with "%" 0-100; TID 1500 leaves units open
  and Nidaan's consumers read [0, 1].)
* Presence at the model's operating threshold: a qualitative evaluation named by the finding code
  with value (52101004, SCT, "Present") or (272519000, SCT, "Absent") from CID 241 "Present-Absent
  Only". Absent findings are reported too (probability and "Absent"), so a reader can tell "looked
  and found nothing" from "did not look".
* Region: findings that carry a region get a TID 1410 group whose Image Region is a closed
  POLYLINE of 5 points (a rectangle) in source-image pixel coordinates (SCOORD, PS3.3
  C.18.6.1.1), selected from the source image; the others a TID 1501 group referencing the source
  image. The region is written whenever the finding has one; the Present/Absent evaluation beside
  it says how to read it (the pipeline only localises present findings).
* Algorithm: TID 4019 in every group names the model, its version and manufacturer, with
  Algorithm Family (123110, DCM, "Artificial Intelligence").
* NOT FOR DIAGNOSIS (models trained on synthetic data): said in the Series Description (what a
  PACS study browser and every viewer show) and, in the content, as a TID 4019 "Algorithm
  Parameters" TEXT item in each group, so the statement travels with every finding a viewer or a
  downstream system extracts. DICOM has no coded concept for it, and TID 1501/1410 allow no free
  TEXT item in a group other than through TID 4019; highdicom builds and validates this one, and
  dciodvfy and dsrdump accept it.
* Preliminary, unverified, complete (PS3.3 C.17.2): nobody has confirmed an AI result; Preliminary
  Flag = PRELIMINARY and Verification Flag = UNVERIFIED say so.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from nidaan.core.findings import BoundingBox, CodedValue, Finding, ImageAnalysis

from .uids import derived_uid, is_valid_uid

__all__ = ["NOT_FOR_DIAGNOSIS", "build_report", "report_uids"]

#: The marker a PACS user sees on reports of models trained on synthetic data.
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
_NFD_STATEMENT = f"{NOT_FOR_DIAGNOSIS}: model trained on synthetic images only"
_SERIES_DESCRIPTION = "Nidaan AI findings"
_MANUFACTURER = "Nidaan"
_MODEL_NAME = "Nidaan inference server"

#: (1, UCUM, "no units"): the unit of a ratio such as a probability in [0, 1] (PS3.16 CID 7181).
_RATIO = hd.sr.CodedConcept("1", "UCUM", "no units")

# Procedure Reported (TID 1500 row 4, BCID 100 "Quantitative Diagnostic Imaging Procedures") by
# source Modality; anything else is the generic (363679005, SCT, "Imaging procedure").
_PROCEDURES = {
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
    "RG": codes.cid100.XRUnspecifiedBodyRegion,
    "MG": codes.cid100.XRUnspecifiedBodyRegion,
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
}
_ANY_PROCEDURE = codes.cid100.ImagingProcedure

#: Certainty values are written with this many decimals (NUM is a DS, at most 16 characters).
_DECIMALS = 6


def report_key(analyses: Sequence[ImageAnalysis], sop_instance_uids: Iterable[str]) -> str:
    """The key :func:`report_uids` derives from: the models' names and versions and the instances
    (sorted), so the same analysis of the same images always gives the same report UIDs."""
    models = sorted({f"{a.algorithm.name}@{a.algorithm.version}" for a in analyses})
    return "|".join(models + sorted(sop_instance_uids))


def report_uids(study_instance_uid: str, key: str) -> tuple[str, str]:
    """Deterministic (Series Instance UID, SOP Instance UID) of a report.

    Both are ``2.25.<int>`` UIDs (PS3.5 B.2) derived from the study and ``key`` (e.g. the models'
    versions and the analysed SOP Instance UIDs), so building the same report again yields the
    same UIDs and a re-sent report replaces, rather than duplicates, the one in the PACS.
    (``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` cannot serve: with no prefix
    pydicom 3 ignores the entropy sources and returns a random UUID-based UID.)
    """
    if not study_instance_uid or not key:
        raise ValueError("report UIDs need a study UID and a non-empty key")
    if not is_valid_uid(study_instance_uid):
        raise ValueError(f"not a valid UID: {study_instance_uid!r}")
    return (
        derived_uid("sr-series", study_instance_uid, key),
        derived_uid("sr-instance", study_instance_uid, key),
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
    """Build the SR of one study's analyses (see the module docstring for its structure).

    ``analyses`` are the findings of one or more algorithms on images of one study;
    ``series_instance_uid`` and ``sop_instance_uid`` are the report's (see :func:`report_uids`);
    ``device_observer_uid`` identifies this Nidaan installation (TID 1004).

    Raises ValueError, naming the problem, when the input cannot make a conformant report: no
    analyses or no findings, images from more than one study or patient, malformed UIDs or ones
    that collide with a source image's, or a region outside its image or on a multi-frame image.
    """
    _check(analyses, series_instance_uid, sop_instance_uid, device_observer_uid)
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for i, analysis in enumerate(analyses):
        for j, finding in enumerate(analysis.findings):
            # Tracking UIDs (TID 4108) derive from the report's UID, so a rebuilt report is the
            # same object down to its content.
            tracking_uid = derived_uid("sr-tracking", sop_instance_uid, str(i), str(j))
            groups.append(_group(analysis, finding, tracking_uid))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid,
            name="Nidaan",
            manufacturer_name=_MANUFACTURER,
            model_name=_MODEL_NAME,
        ),
    )
    modalities = sorted({str(a.source.get("Modality", "")) for a in analyses})
    procedures = list(dict.fromkeys(_PROCEDURES.get(m, _ANY_PROCEDURE) for m in modalities))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedures,
        imaging_measurements=groups,
    )

    # Evidence: each analysed image once. highdicom copies the Patient and General Study modules
    # from it and lists it in the Current Requested Procedure Evidence Sequence (PS3.3 C.17.2.3).
    evidence: dict[str, Dataset] = {}
    for analysis in analyses:
        evidence.setdefault(str(analysis.source.SOPInstanceUID), analysis.source)
    not_for_diagnosis = any(a.algorithm.not_for_diagnosis for a in analyses)
    description = _SERIES_DESCRIPTION + (f" - {NOT_FOR_DIAGNOSIS}" if not_for_diagnosis else "")
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence.values()),
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=_MODEL_NAME,
        institution_name=institution_name,
        series_description=description,
        # PS3.3 C.17.2: all findings are in (COMPLETE), but nobody has confirmed them.
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def _check(
    analyses: Sequence[ImageAnalysis],
    series_instance_uid: str,
    sop_instance_uid: str,
    device_observer_uid: str,
) -> None:
    """Refuse input that cannot make a conformant report, saying why."""
    if not analyses:
        raise ValueError("a report needs at least one analysed image")
    studies = sorted({str(a.source.StudyInstanceUID) for a in analyses})
    if len(studies) != 1:
        raise ValueError(
            f"the analyses come from {len(studies)} studies ({', '.join(studies)}); "
            "a report belongs to one study"
        )
    patients = {str(a.source.PatientID) for a in analyses if "PatientID" in a.source}
    if len(patients) > 1:
        raise ValueError(f"the analysed images name {len(patients)} different Patient IDs")
    if not any(a.findings for a in analyses):
        raise ValueError("the analyses hold no findings to report")
    for name, uid in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
        ("device_observer_uid", device_observer_uid),
    ):
        if not is_valid_uid(uid):
            raise ValueError(f"{name} is not a valid UID (PS3.5 9.1): {uid!r}")
    if series_instance_uid == sop_instance_uid:
        raise ValueError("the report's Series and SOP Instance UIDs must differ")
    for a in analyses:
        # PS3.3 C.17: the report is a new instance in a new series of the source study.
        if str(a.source.SeriesInstanceUID) == series_instance_uid:
            raise ValueError("series_instance_uid is an analysed image's series; use a new one")
        if str(a.source.SOPInstanceUID) == sop_instance_uid:
            raise ValueError("sop_instance_uid is an analysed image's SOP Instance UID")


def _group(
    analysis: ImageAnalysis, finding: Finding, tracking_uid: str
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    """One measurement group: TID 1410 when the finding has a region, TID 1501 otherwise."""
    algo = analysis.algorithm
    source = analysis.source
    # TID 4019 Algorithm Identification; the not-for-diagnosis statement rides along as an
    # Algorithm Parameters TEXT item (see the module docstring).
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algo.name,
        version=algo.version,
        manufacturer=algo.manufacturer,
        family=codes.DCM.ArtificialIntelligence,
        parameters=[_NFD_STATEMENT] if algo.not_for_diagnosis else None,
    )
    finding_type = _concept(finding.code)
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid, identifier=f"{finding.label} ({algo.name} {algo.version})"
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=round(finding.probability, _DECIMALS),
            unit=_RATIO,
        )
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=finding_type,
            value=codes.cid241.Present if finding.present else codes.cid241.Absent,
        )
    ]
    if finding.region is not None:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_rectangle(finding.region, source, finding.label),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
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
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _concept(code: CodedValue) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _rectangle(box: BoundingBox, source: Dataset, label: str) -> np.ndarray:
    """The box as a closed POLYLINE of 5 (column, row) points in the source image's pixels.

    SCOORD coordinates of an image are continuous, (0, 0) being the top left corner of the top
    left pixel and (Columns, Rows) the bottom right corner of the bottom right one (PS3.3
    C.18.6.1.1). A box reaching past the far edges (rounding in a model's upsampled output) is
    clipped to the image; a box that starts outside the image is refused.
    """
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        # A region on a multi-frame image needs Referenced Frame Number (PS3.3 C.18.3.1), which
        # a Finding does not carry.
        raise ValueError(f"region of {label!r} is on a multi-frame image; no frame is known")
    if "Rows" not in source or "Columns" not in source:
        raise ValueError(f"region of {label!r}: the source image header lacks Rows or Columns")
    rows, columns = float(source.Rows), float(source.Columns)
    if box.x_min >= columns or box.y_min >= rows:
        raise ValueError(
            f"region of {label!r} starts outside the {int(columns)}x{int(rows)} image: {box}"
        )
    x0, y0 = box.x_min, box.y_min
    x1, y1 = min(box.x_max, columns), min(box.y_max, rows)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def encode(ds: Dataset) -> bytes:
    """A data set as a Part 10 file (PS3.10 7.1: preamble, "DICM", File Meta Information)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
