"""The report: AI findings as a DICOM Comprehensive 3D SR, a TID 1500 Measurement Report laid out
as IHE AI Results (AIR) asks.

The SR joins the *source* study (Patient and General Study modules from the analysed images, once
they are checked to agree) as a new series, so a PACS files it next to the images it describes.
Content tree (PS3.16 TID 1500 "Measurement Report")::

    CONTAINER Imaging Measurement Report                          TID 1500
      Language of Content Item and Descendants = en-US            TID 1204
      Observer Type = Device, Device Observer UID/Name/...        TID 1002/1004 (this node)
      Procedure reported = CID 100 code for the source modality   TID 1500 row 4
      CONTAINER Image Library: every analysed image               TID 1600
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group  (one per lesion, or one Absent statement per model+finding)
          Tracking Identifier "Pulmonary nodule 1" / Tracking UID  TID 4108
          Finding = what the model detects (a finding, not a disease)
          Algorithm Name/Version/Manufacturer/Family/Parameters    TID 4019
          NUM Certainty of Finding = probability, UCUM "1"        TID 300
          NUM Threshold Value = the operating threshold, UCUM "1"
          NUM Long axis = longest in-plane diameter, UCUM "mm"    (lesions with Pixel Spacing)
          CODE <finding code> = Present | Absent                  "Qualitative Evaluations", CID 241
          SCOORD Image Region (closed POLYLINE outline)           TID 1410, one image
          or SCOORD Image Region per slice                        TID 1411, a lesion over slices
          or IMAGE Source of Measurement                          TID 1501 (no region)
      CONTAINER Qualitative Evaluations                           TID 1500 row 12
        TEXT Summary (English, then the destination's language; starting with NOT FOR
             DIAGNOSIS when a model's card says so)
        TEXT Comment: NOT FOR DIAGNOSIS, what Present means, each model's intended use

Choices, and the reason for each:

* One group per lesion: :func:`nidaan.pacs_bridge.lesions.group_findings` joins a finding's
  regions across adjacent slices; Absent is stated once per study, model and finding, not per
  image, and lists every image it covers.
* Probability: (111012, DCM, "Certainty of Finding") as a ratio in [0, 1] with unit (1, UCUM),
  and beside it (122411, DCM, "Threshold Value"), the model's operating threshold in the same
  unit; Present means probability >= threshold, which the report also says in words and in TID
  4019's Algorithm Parameters.
* Finding codes name what a model detects (e.g. (112033, DCM, "Abnormal opacity"), CID 6101
  "Chest CAD Findings"), never a disorder a screening model cannot diagnose.
* Tracking Unique Identifiers derive from the study, the model and the lesion
  (:attr:`ReportedFinding.key`), never from the report's own UID: the same finding has the same
  UID in the DICOM and the gRPC report and in every revision of the report.
* The algorithm is named in each group (TID 4019) and, as AIR 6.5.3.1 asks, in the Contributing
  Equipment Sequence (PS3.3 C.7.5.1) with Purpose of Reference (Newcode1, 99IHE, "Processing
  Algorithm"): manufacturer, model name, software version, and a Device UID derived from the
  model's name, version and SHA-256, so it changes whenever the model does.
* The device observer (TID 1004) is this installation: a node UID made once in the data dir
  (:func:`~nidaan.pacs_bridge.uids.node_uid`); the header carries Nidaan's software version and a
  Device Serial Number derived from that UID.
* Texts for a person (summary, finding names, intended use, NOT FOR DIAGNOSIS) come from
  ``pacs_bridge/languages/`` in English and, per destination, one more language, each TEXT item
  of the other language marked with its own Language of Content Item (TID 1204) modifier.
  Specific Character Set is ISO_IR 192 (UTF-8) whenever any text needs more than ASCII.
* Preliminary, unverified, complete (PS3.3 C.17.2): nobody has confirmed an AI result.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as Sequence_
from pydicom.sr.codedict import codes

from nidaan.core.findings import (
    MAX_LESIONS,
    NOT_FOR_DIAGNOSIS,
    AlgorithmInfo,
    CodedValue,
    ImageAnalysis,
    LesionPart,
    ReportedFinding,
)

from .languages import Language, load_language
from .lesions import group_findings
from .lesions import numbered as lesion_numbers
from .uids import derived_uid, is_valid_uid, tracking_uid

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "PROCESSING_ALGORITHM",
    "algorithm_device_uid",
    "build_report",
    "encode",
    "report_key",
    "report_uids",
    "serial_number",
    "software_version",
    "study_attributes",
]

_NFD_STATEMENT = f"{NOT_FOR_DIAGNOSIS}: model trained on synthetic images only"
_SERIES_DESCRIPTION = "Nidaan AI findings"
MANUFACTURER = "Nidaan project"
MODEL_NAME = "Nidaan inference server"

#: AIR 6.5.3.1: Purpose of Reference of the algorithm's Contributing Equipment item.
PROCESSING_ALGORITHM = CodedValue("Newcode1", "99IHE", "Processing Algorithm")

#: (1, UCUM, "no units"): the unit of a ratio such as a probability in [0, 1] (PS3.16 CID 7181).
_RATIO = hd.sr.CodedConcept("1", "UCUM", "no units")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

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

#: Patient and General Study attributes the report takes from its images: they must agree.
_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
#: Value representations that hold text (PS3.5 6.2), for the character set check.
_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}

#: Certainty values are written with this many decimals (NUM is a DS, at most 16 characters).
_DECIMALS = 6


@functools.cache
def software_version() -> str:
    """Nidaan's version, as installed (read once: ``importlib.metadata`` scans the installed
    distributions on each call, about 35 ms here, three times a study)."""
    try:
        return metadata.version("nidaan")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def algorithm_device_uid(algorithm: AlgorithmInfo) -> str:
    """The Device UID of a model in the Contributing Equipment Sequence: derived from its name,
    version and the SHA-256 of its file, so a changed model is a different device."""
    return derived_uid(
        "algorithm", algorithm.model or algorithm.name, algorithm.version, algorithm.digest or "-"
    )


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
    language: str = "",
    findings: Sequence[ReportedFinding] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the SR of one study's analyses (see the module docstring for its structure).

    ``analyses`` are the findings of one or more algorithms on images of one study;
    ``findings`` the same grouped per lesion (default: :func:`group_findings` of them);
    ``series_instance_uid`` and ``sop_instance_uid`` are the report's (see :func:`report_uids`);
    ``device_observer_uid`` identifies this Nidaan installation (TID 1004); ``language`` a
    second language for the texts (a tag of ``pacs_bridge/languages``; '' = English only).

    Raises ValueError, naming the problem, when the input cannot make a conformant report: no
    analyses or no findings, images from more than one study or that disagree on a patient or
    study attribute, malformed UIDs or ones that collide with a source image's, or a region
    outside its image or on a multi-frame image.
    """
    _check(analyses, series_instance_uid, sop_instance_uid, device_observer_uid)
    evidence: dict[str, Dataset] = {}
    for analysis in analyses:
        evidence.setdefault(str(analysis.source.SOPInstanceUID), analysis.source)
    agreed = study_attributes(list(evidence.values()))
    reported = list(group_findings(analyses) if findings is None else findings)
    if not reported:
        raise ValueError("the analyses hold no findings to report")
    english = load_language("en")
    other = load_language(language) if language and language != "en" else None

    # The same numbers as the region objects' segment labels and legends.
    numbered = lesion_numbers(reported)
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [_group(finding, n, english) for finding, n in numbered]

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid,
            name="Nidaan",
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
            serial_number=serial_number(device_observer_uid),
        ),
    )
    modalities = sorted({str(a.source.get("Modality", "")) for a in analyses})
    procedures = list(dict.fromkeys(_PROCEDURES.get(m, _ANY_PROCEDURE) for m in modalities))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedures,
        imaging_measurements=groups,
        referenced_images=[_library_view(ds) for ds in evidence.values()],
    )
    algorithms = list(dict.fromkeys(f.algorithm for f in reported))
    content[0].ContentSequence.append(_statements(numbered, algorithms, english, other))

    not_for_diagnosis = any(a.not_for_diagnosis for a in algorithms)
    description = _SERIES_DESCRIPTION + (f" - {NOT_FOR_DIAGNOSIS}" if not_for_diagnosis else "")
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence.values()),
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        institution_name=institution_name,
        series_description=description,
        # PS3.3 C.17.2: all findings are in (COMPLETE), but nobody has confirmed them.
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = software_version()
    sr.DeviceSerialNumber = serial_number(device_observer_uid)
    # AIR 6.5.3.1: the algorithms, not the source images' scanner or institution.
    # (highdicom's ContributingEquipment accepts DCM purposes only, not AIR's 99IHE one.)
    sr.ContributingEquipmentSequence = Sequence_([_algorithm_equipment(a) for a in algorithms])  # type: ignore[assignment]
    for keyword, value in agreed.items():
        setattr(sr, keyword, value)
    _set_character_set(sr)
    return sr


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


def study_attributes(images: Sequence[Dataset]) -> dict[str, object]:
    """The Patient and General Study attributes the images agree on (one image's empty value
    gives way to another's): what the SR carries, and what the study's region objects (SEG,
    GSPS, SC) must carry too. ValueError naming the attribute (never its values: they are
    patient data) where two images differ."""
    agreed: dict[str, object] = {}
    for keyword in _STUDY_ATTRIBUTES:
        values = {str(ds.get(keyword, "") or "") for ds in images} - {""}
        if len(values) > 1:
            raise ValueError(
                f"the analysed images disagree on {keyword} ({len(values)} different values); "
                "a report belongs to one patient's study"
            )
        if values:
            source = next(ds for ds in images if str(ds.get(keyword, "") or ""))
            agreed[keyword] = source[keyword].value
    return agreed


def _library_view(image: Dataset) -> Dataset:
    """The header the Image Library (TID 1600) describes an image from.

    highdicom adds the projection (TID 1603) or cross-sectional (TID 1604) descriptors by the
    image's Modality and needs every attribute they name; real images may lack one (a CR
    without Imager Pixel Spacing). Such an image is described by the common descriptors only
    (TID 1602: its modality, from the SOP class, and its size), rather than not at all.
    """
    try:
        hd.sr.ImageLibraryEntryDescriptors(image)
        return image
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        view = Dataset()
        for element in image:
            # Never the pixels; and not the image's own Modality element: the view shares the
            # image's elements, so setting its value would change the image's header too (every
            # later report of the study then said "OT" and "Imaging procedure").
            if element.tag not in (0x7FE00010, 0x00080060):
                view.add(element)
        view.Modality = "OT"  # not described by modality; its code comes from the SOP class
        return view


def serial_number(device_observer_uid: str) -> str:
    """A short Device Serial Number (LO) for this installation, from its node UID (the SR's and
    the region objects' General Equipment module)."""
    return "NDN-" + hashlib.sha256(device_observer_uid.encode()).hexdigest()[:12].upper()


def _algorithm_equipment(algorithm: AlgorithmInfo) -> Dataset:
    """A Contributing Equipment Sequence item for a model (PS3.3 C.7.5.1; AIR 6.5.3.1)."""
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = algorithm.manufacturer
    item.ManufacturerModelName = algorithm.name[:64]
    item.SoftwareVersions = algorithm.version
    item.DeviceUID = algorithm_device_uid(algorithm)
    item.ContributionDescription = (
        f"AI model {algorithm.model or algorithm.name} {algorithm.version}"
        + (f", SHA-256 {algorithm.digest}" if algorithm.digest else "")
        + (f"; {NOT_FOR_DIAGNOSIS}" if algorithm.not_for_diagnosis else "")
    )
    return item


def _group(
    finding: ReportedFinding, n: int, english: Language
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    """One measurement group: TID 1410 for a region on one image, TID 1411 for a lesion over
    several, TID 1501 otherwise (an absence, or a finding without a region)."""
    algo = finding.algorithm
    name = english.finding(finding.code)  # never the model's internal label ("tb")
    parameters = [
        f"operating threshold {finding.threshold:g}: {name} is Present when "
        "Certainty of Finding is at or above it"
    ]
    if algo.digest:  # provenance: exactly which weights made this finding
        parameters.append(f"model {algo.model or algo.name} file SHA-256 {algo.digest}")
    if algo.not_for_diagnosis:
        parameters.append(_NFD_STATEMENT)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algo.name,
        version=algo.version,
        manufacturer=algo.manufacturer,
        family=codes.DCM.ArtificialIntelligence,
        parameters=parameters,
    )
    finding_type = _concept(finding.code)
    tracking = hd.sr.TrackingIdentifier(
        uid=tracking_uid(finding.key),
        identifier=f"{name} {n}" if finding.present else f"{name}: absent",
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.DCM.CertaintyOfFinding,
            value=round(finding.probability, _DECIMALS),
            unit=_RATIO,
        ),
        hd.sr.Measurement(
            name=codes.DCM.ThresholdValue, value=round(finding.threshold, _DECIMALS), unit=_RATIO
        ),
    ]
    if finding.size_mm is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.SCT.LongAxis, value=round(finding.size_mm, 1), unit=codes.UCUM.Millimeter
            )
        )
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=finding_type,
            value=codes.cid241.Present if finding.present else codes.cid241.Absent,
        )
    ]
    common: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": finding_type,
        "algorithm_id": algorithm_id,
        "measurements": measurements,
        "qualitative_evaluations": evaluations,
    }
    if len(finding.parts) == 1:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=_region(finding.parts[0], finding.label), **common
        )
    if finding.parts:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_regions=[_region(p, finding.label) for p in finding.parts], **common
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in finding.sources
        ],
        **common,
    )


def _region(part: LesionPart, label: str) -> hd.sr.ImageRegion:
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_outline(part, label),
        source_image=hd.sr.SourceImageForRegion.from_source_image(part.source),
    )


def _outline(part: LesionPart, label: str) -> np.ndarray:
    """The part's outline as a closed POLYLINE of (column, row) points in its image's pixels.

    SCOORD coordinates of an image are continuous, (0, 0) being the top left corner of the top
    left pixel and (Columns, Rows) the bottom right corner of the bottom right one (PS3.3
    C.18.6.1.1). Points past the far edges (rounding in a model's upsampled output) are clipped
    to the image; an outline that starts outside the image is refused.
    """
    source = part.source
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        # A region on a multi-frame image needs Referenced Frame Number (PS3.3 C.18.3.1), which
        # a part does not carry.
        raise ValueError(f"region of {label!r} is on a multi-frame image; no frame is known")
    if "Rows" not in source or "Columns" not in source:
        raise ValueError(f"region of {label!r}: the source image header lacks Rows or Columns")
    rows, columns = float(source.Rows), float(source.Columns)
    box = part.outline.box
    if box.x_min >= columns or box.y_min >= rows:
        raise ValueError(
            f"region of {label!r} starts outside the {int(columns)}x{int(rows)} image: {box}"
        )
    points = np.array(part.outline.points, dtype=np.float32)
    points[:, 0] = np.minimum(points[:, 0], columns)
    points[:, 1] = np.minimum(points[:, 1], rows)
    return points


def _statements(
    numbered: Sequence[tuple[ReportedFinding, int]],
    algorithms: Sequence[AlgorithmInfo],
    english: Language,
    other: Language | None,
) -> hd.sr.ContainerContentItem:
    """TID 1500's root Qualitative Evaluations: the summary and the fixed statements as text a
    reader sees first, in English and in the destination's language."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.TextContentItem] = []
    for language in (english, other):
        if language is None:
            continue
        said = summary(numbered, language)
        if any(a.not_for_diagnosis for a in algorithms):
            # The first text a reader sees says it, not only a comment further down.
            said = f"{language.term('not_for_diagnosis')}: {said}"
        texts = [(codes.DCM.Summary, said)]
        if any(a.not_for_diagnosis for a in algorithms):
            texts.append((codes.DCM.Comment, language.term("not_for_diagnosis")))
        texts.append((codes.DCM.Comment, language.term("present_rule")))
        for f, _ in numbered:
            if f.unlisted:
                texts.append(
                    (
                        codes.DCM.Comment,
                        language.term(
                            "unlisted",
                            count=f.unlisted,
                            name=language.finding(f.code),
                            listed=MAX_LESIONS,
                        ),
                    )
                )
        for algo in algorithms:
            statement = algo.intended_use_in(language.tag)
            if statement:
                texts.append(
                    (
                        codes.DCM.Comment,
                        language.term("intended_use", model=algo.name, statement=statement),
                    )
                )
        texts.append((codes.DCM.Comment, language.term("preliminary")))
        for name, text in texts:
            item = hd.sr.TextContentItem(
                name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            if language is not english:
                item.ContentSequence = hd.sr.ContentSequence([_language_modifier(language)])
            items.append(item)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _language_modifier(language: Language) -> hd.sr.CodeContentItem:
    """TID 1204 Language of Content Item and Descendants, as a concept modifier of one item."""
    return hd.sr.CodeContentItem(
        name=codes.DCM.LanguageOfContentItemAndDescendants,
        value=hd.sr.CodedConcept(language.tag, "RFC5646", language.name),
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )


def summary(numbered: Sequence[tuple[ReportedFinding, int]], language: Language) -> str:
    """One sentence a radiologist reads first: the findings present, numbered as their groups,
    with probability, threshold and size; or that none is."""
    lines = []
    for finding, n in numbered:
        if not finding.present:
            continue
        line = language.term(
            "finding_line",
            name=language.finding(finding.code),
            n=n,
            probability=f"{finding.probability:.2f}",
            threshold=f"{finding.threshold:.2f}",
        )
        if finding.size_mm is not None:
            line += ", " + language.term("finding_size", size=f"{finding.size_mm:.0f}")
        lines.append(line)
    if not lines:
        return language.term("summary_none")
    return language.term("summary_present", findings="; ".join(lines))


def _concept(code: CodedValue) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _set_character_set(ds: Dataset) -> None:
    """ISO_IR 192 (UTF-8, PS3.5 6.1.2.3) when any text needs more than the default repertoire;
    otherwise none, so that a source's single-byte character set is never claimed for text
    that is not in it."""
    if _needs_unicode(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet


def _needs_unicode(ds: Dataset) -> bool:
    for element in ds:
        if element.VR == "SQ":
            if any(_needs_unicode(item) for item in element.value):
                return True
        elif element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            if any(not str(v).isascii() for v in values):
                return True
    return False


def encode(ds: Dataset) -> bytes:
    """A data set as a Part 10 file (PS3.10 7.1: preamble, "DICM", File Meta Information)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
