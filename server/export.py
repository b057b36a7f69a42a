"""De-identified dataset export (``nidaan export --deidentify OUT``).

Writes the analysed studies in the data dir (their images, SRs and region objects) as an
anonymised dataset, with a manifest of the AI labels, for a national dataset platform:

- DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile: the profile's table of
  attributes and actions (X remove, Z empty, D dummy, U new UID, and the combinations) comes from
  the ``dicom-anonymizer`` library (its copy of the standard's table, 2026c), not from a list
  kept here. Every attribute is acted on at every depth: the profile is applied to each item of
  each sequence that remains (so a report's Contributing Equipment loses its Institution Name).
  A Structured Report keeps its content tree, cleaned item by item the same way (the Clean
  Structured Content Option, DCM 113104), so its findings survive and its names do not. Private
  attributes are removed.
- UIDs are replaced by keyed ones (``2.25.`` + 128 bits of HMAC-SHA-256 of the UID under a secret
  key kept only in the data dir, ``export.key``): the same in an image, in the SR that
  references it and in its overlays, and in every later export from this site, and
  irreversible without the key. Patient ID and Patient's Name become one keyed pseudonym, so a
  patient's studies stay linked.
- Options from config ``[export]``: Retain Longitudinal Temporal Information with Full Dates
  (off by default), Retain Patient Characteristics (off by default).
- Patient Identity Removed = YES, De-identification Method and its Code Sequence (the profile
  and each option used) are set in every object.
- An image whose Burned In Annotation is not NO (text in its pixels the profile cannot reach:
  including Nidaan's own Secondary Capture, which burns its legend in) is left out and listed.
- ``manifest.csv`` and ``manifest.json``: one row per exported source image, with its
  pseudonymous UIDs, modality, body part, and each model's findings, probabilities and version
  as its report states them, with the radiologists' verdicts on each (``server.feedback``:
  counts of agree and disagree; never a comment or a reader).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from nidaan.core.config import Config
from nidaan.core.errors import InputError
from nidaan.pacs_bridge.audit import AuditLog
from nidaan.pacs_bridge.state import StateStore

#: The standard's table the profile is applied from (dicom-anonymizer's copy of PS3.15 E.1-1).
PROFILE_TABLE = "dicomfields_2026c"
KEY_FILE = "export.key"
#: Studies that have been analysed.
EXPORTABLE_STATES = ("analysed", "reported", "delivered")
#: Attributes the Retain Patient Characteristics Option keeps (PS3.15 E.3.9).
PATIENT_CHARACTERISTICS = (
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "SmokingStatus",
    "PregnancyStatus",
    "PatientSexNeutered",
    "AllergyRequiredFlags",
    "PreMedication",
    "SpecialNeeds",
)
_DATE_VRS = ("DA", "DT", "TM")
# PS3.16 CID 7050 De-identification Methods.
_BASIC = ("113100", "Basic Application Confidentiality Profile")
_CLEAN_STRUCTURED = ("113104", "Clean Structured Content Option")
_FULL_DATES = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")
_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def load_key(data_dir: Path) -> bytes:
    """The site's pseudonymisation key (32 random bytes in ``<data dir>/export.key``, readable
    by its owner only), made on first use. Whoever has it can link pseudonyms to identities:
    it never leaves the data dir."""
    path = Path(data_dir) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        key = path.read_bytes()
    if len(key) < 32:
        raise InputError(f"{path} is not a Nidaan export key (too short)")
    return key


class Pseudonyms:
    """Keyed, consistent replacements for UIDs and patient identities."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """A UID under 2.25 (PS3.5 B.2) from 128 bits of the keyed hash of ``uid``."""
        uid = str(uid).strip()
        return f"2.25.{int.from_bytes(self._mac('uid', uid)[:16], 'big')}" if uid else uid

    def patient(self, patient_id: str) -> str:
        return "NDN-" + self._mac("patient", str(patient_id).strip()).hex()[:16].upper()


def _profile_actions(pseudonyms: Pseudonyms, cfg: Config) -> dict[tuple[int, ...], Callable]:
    """The profile's action per tag, with UIDs keyed and the configured options applied."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
    from dicomanonymizer.simpledicomanonymizer import (
        delete_or_empty_or_replace_UID,
        initialize_actions,
        keep,
    )
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    def keyed_uid(dataset: Dataset, tag: tuple[int, int]) -> None:
        element = dataset.get(tag)
        if element is None or element.VR != "UI" or not element.value:
            if element is not None and element.VR != "UI":
                delete_or_empty_or_replace_UID(dataset, tag)
            return
        if isinstance(element.value, MultiValue | list):
            element.value = [pseudonyms.uid(v) for v in element.value]
        else:
            element.value = pseudonyms.uid(element.value)

    actions: dict[tuple[int, ...], Callable] = initialize_actions(PROFILE_TABLE)
    tables = dicom_anonymization_database_selector(PROFILE_TABLE)
    for tag in [*tables["U_TAGS"], *tables["X_Z_U_STAR_TAGS"]]:
        actions[tag] = keyed_uid
    actions[(0x0040, 0xA730)] = keep  # Content Sequence: cleaned item by item (113104)
    if cfg.export.retain_dates:
        for tag in list(actions):
            if len(tag) == 2:
                try:
                    vr = dictionary_VR((tag[0] << 16) | tag[1])
                except KeyError:
                    continue
                if vr in _DATE_VRS:
                    actions[tag] = keep
    if cfg.export.retain_patient_characteristics:
        for keyword in PATIENT_CHARACTERISTICS:
            t = tag_for_keyword(keyword)
            if t is not None:
                actions[(t >> 16, t & 0xFFFF)] = keep
    return actions


def deidentify(ds: Dataset, pseudonyms: Pseudonyms, cfg: Config, actions: dict) -> None:
    """Apply the profile to ``ds`` in place (every depth), then pseudonyms and the markers."""
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset

    patient_id = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")

    def clean(item: Dataset) -> None:
        anonymize_dataset(item, None, True, lambda: actions)
        for element in list(item):
            if element.VR == "SQ" and isinstance(element.value, DicomSequence):
                for nested in element.value:
                    clean(nested)

    clean(ds)
    pseudonym = pseudonyms.patient(patient_id)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    ds.PatientIdentityRemoved = "YES"
    methods = [_BASIC, _CLEAN_STRUCTURED]
    if cfg.export.retain_dates:
        methods.append(_FULL_DATES)
    if cfg.export.retain_patient_characteristics:
        methods.append(_PATIENT_CHARACTERISTICS)
    ds.DeidentificationMethod = (
        f"PS3.15 Annex E Basic Profile by Nidaan with dicom-anonymizer {_version()}"
    )[:64]
    codes = []
    for value, meaning in methods:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = (
        "UNMODIFIED" if cfg.export.retain_dates else "REMOVED"
    )
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword in (
            "SourceApplicationEntityTitle",
            "SendingApplicationEntityTitle",
            "ReceivingApplicationEntityTitle",
            "PrivateInformationCreatorUID",
            "PrivateInformation",
        ):
            if keyword in meta:
                delattr(meta, keyword)


def _version() -> str:
    try:
        return metadata.version("dicom-anonymizer")
    except metadata.PackageNotFoundError:
        return "?"


# --- the findings a report states, per image -------------------------------------------------


def _walk(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _name(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence", [])
    return str(names[0].CodeValue) if names else ""


def report_findings(sr: Dataset, labels: dict[tuple[str, str, str], str]) -> dict[str, dict]:
    """Per source SOP Instance UID: {model: {"version", "findings": {label: {probability,
    present}}}} as a Nidaan SR states them. ``labels`` maps (algorithm name, version, finding
    code value) to the repository's model and label ("model/label")."""
    out: dict[str, dict] = {}
    for group in _walk(sr):
        if group.get("ValueType") != "CONTAINER" or _name(group) != "125007":
            continue
        items = {_name(i): i for i in _walk(group)}
        finding = items.get("121071")
        name, version = items.get("111001"), items.get("111003")
        if finding is None or name is None or not finding.get("ConceptCodeSequence"):
            continue
        code = finding.ConceptCodeSequence[0]
        algorithm = str(name.get("TextValue", ""))
        ver = "" if version is None else str(version.get("TextValue", ""))
        model, _, label = labels.get(
            (algorithm, ver, str(code.CodeValue)), f"{algorithm}/{code.CodeMeaning}"
        ).partition("/")
        probability = None
        certainty = items.get("111012")
        if certainty is not None and certainty.get("MeasuredValueSequence"):
            probability = float(certainty.MeasuredValueSequence[0].NumericValue)
        evaluation = items.get(str(code.CodeValue))
        present = bool(
            evaluation is not None
            and evaluation.get("ConceptCodeSequence")
            and evaluation.ConceptCodeSequence[0].CodeValue == "52101004"
        )
        sops = {
            str(ref.ReferencedSOPInstanceUID)
            for item in _walk(group)
            for ref in item.get("ReferencedSOPSequence", [])
        }
        for sop in sops:
            entry = out.setdefault(sop, {}).setdefault(model, {"version": ver, "findings": {}})
            seen = entry["findings"].get(label)
            if seen is None or (probability or 0.0) > (seen["probability"] or 0.0):
                entry["findings"][label] = {"probability": probability, "present": present}
            elif present:
                seen["present"] = True
    return out


# --- the export ------------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    studies: int = 0
    files: int = 0
    manifest: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)


#: SOP classes of Structured Reports (PS3.4 B.5).
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _is_image(ds: Dataset) -> bool:
    return "PixelData" in ds and str(ds.get("SOPClassUID", "")) != _SEG_SOP_CLASS


def export(
    cfg: Config,
    out: Path,
    *,
    since: dt.datetime | None = None,
    model: str | None = None,
    progress: bool = True,
) -> ExportResult:
    """Export the analysed studies (received since ``since``; with ``model``, those it has
    findings in) de-identified to ``out``; returns what was written and left out."""
    from tqdm import tqdm

    from .model_repository import load_repository

    data = Path(cfg.storage.data_dir)
    if not (data / "state.sqlite3").is_file():
        raise InputError(f"storage.data_dir {data} holds no state database: nothing to export")
    out = Path(out)
    if out.resolve().is_relative_to(data.resolve()):
        raise InputError(f"{out} is inside the data dir: export somewhere else")
    models = load_repository(cfg.models.repository, check_onnx=False)
    labels = {
        (m.algorithm.name, m.version, f.code.value): f"{m.name}/{f.label}"
        for m in models
        for f in m.findings
    }
    digests = {m.name: (m.version, m.algorithm.digest) for m in models}
    if model is not None and model not in digests:
        raise InputError(f"no model {model!r} in {cfg.models.repository}")
    pseudonyms = Pseudonyms(load_key(data))
    actions = _profile_actions(pseudonyms, cfg)
    state = StateStore(data / "state.sqlite3")
    result = ExportResult(out)
    try:
        cutoff = None if since is None else since.timestamp()
        rows = [
            r
            for r in state.recent_studies(limit=1_000_000_000)
            if r.state in EXPORTABLE_STATES
            and (cutoff is None or (r.received_at or r.updated_at) >= cutoff)
        ]
        for row in tqdm(rows, desc="exporting", unit="study", disable=not progress):
            _export_study(
                state, row.study_uid, out, pseudonyms, cfg, actions, labels, digests, model, result
            )
    finally:
        state.close()
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, result)
    audit = AuditLog(data / "audit.jsonl")
    audit.record(
        "export",
        out=str(out),
        since=None if since is None else since.isoformat(),
        model=model,
        studies=result.studies,
        files=result.files,
        excluded=len(result.excluded),
    )
    audit.close()
    return result


def _export_study(
    state: StateStore,
    study_uid: str,
    out: Path,
    pseudonyms: Pseudonyms,
    cfg: Config,
    actions: dict,
    labels: dict[tuple[str, str, str], str],
    digests: dict[str, tuple[str, str]],
    model: str | None,
    result: ExportResult,
) -> None:
    report = state.latest_report(study_uid)
    findings: dict[str, dict] = {}
    tracked: dict[str, set[str]] = {}
    if report is not None and report[0].is_file():
        sr = dcmread(report[0])
        findings = report_findings(sr, labels)
        tracked = _tracked_images(sr)
    verdicts = state.feedback(study_uid)
    if model is not None and not any(model in per for per in findings.values()):
        return
    sources = {str(r.path) for r in state.instances(study_uid)}
    results = [str(p) for p in state.report_files(study_uid)]
    objects = [Path(p) for p in dict.fromkeys([*sorted(sources), *results])]
    written = 0
    for path in objects:
        if not path.is_file():
            continue
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        sop = str(ds.SOPInstanceUID)
        new_sop = pseudonyms.uid(sop)
        if _is_image(ds) and str(ds.get("BurnedInAnnotation", "")).upper() != "NO":
            result.excluded.append(
                {
                    "sop_instance_uid": new_sop,
                    "study_instance_uid": pseudonyms.uid(study_uid),
                    "modality": str(ds.get("Modality", "")),
                    "reason": "Burned In Annotation is "
                    + (str(ds.BurnedInAnnotation) if "BurnedInAnnotation" in ds else "absent")
                    + ", not NO: text in the pixels may identify the patient",
                }
            )
            continue
        if str(path) in sources and str(ds.get("SOPClassUID", "")).startswith(_SR_PREFIX):
            # A report someone else wrote (a radiologist's review, say): its free text (a
            # Comment's TextValue) is kept by the profile's table, so it may name anyone.
            # Its verdicts on Nidaan's findings are in the manifest instead.
            result.excluded.append(
                {
                    "sop_instance_uid": new_sop,
                    "study_instance_uid": pseudonyms.uid(study_uid),
                    "modality": str(ds.get("Modality", "")),
                    "reason": "a structured report Nidaan received, not one it made: its free "
                    "text may identify someone (its verdicts on findings are in the manifest)",
                }
            )
            continue
        modality = str(ds.get("Modality", ""))
        body_part = str(ds.get("BodyPartExamined", ""))
        deidentify(ds, pseudonyms, cfg, actions)
        target = out / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{new_sop}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        written += 1
        result.files += 1
        if str(path) in sources and _is_image(ds):
            per_model = findings.get(sop, {})
            if model is not None:
                per_model = {k: v for k, v in per_model.items() if k == model}
            for name, entry in per_model.items():
                version, digest = digests.get(name, ("", ""))
                entry["sha256"] = digest if version == entry["version"] else ""
                for label, f_ in entry["findings"].items():
                    f_["feedback"] = _feedback_on(verdicts, tracked, sop, name, label)
            result.manifest.append(
                {
                    "file": str(target.relative_to(out)),
                    "patient_pseudonym": str(ds.PatientID),
                    "study_instance_uid": str(ds.StudyInstanceUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "sop_instance_uid": new_sop,
                    "modality": modality,
                    "body_part": body_part,
                    "models": per_model,
                }
            )
    if written:
        result.studies += 1


def _tracked_images(sr: Dataset) -> dict[str, set[str]]:
    """Per Tracking Unique Identifier of a Nidaan SR, the SOP Instance UIDs its group is about."""
    out: dict[str, set[str]] = {}
    for group in _walk(sr):
        if group.get("ValueType") != "CONTAINER" or _name(group) != "125007":
            continue
        items = {_name(i): i for i in _walk(group)}
        tracking = items.get("112040")
        if tracking is None:
            continue
        out.setdefault(str(tracking.get("UID", "")), set()).update(
            str(r.ReferencedSOPInstanceUID)
            for item in _walk(group)
            for r in item.get("ReferencedSOPSequence", [])
        )
    return out


def _feedback_on(
    verdicts: list[Any], tracked: dict[str, set[str]], sop: str, model: str, label: str
) -> dict[str, int]:
    """Verdicts on a model's finding about one image: those naming a finding it is in (by
    Tracking UID), and those naming the model and finding of its study."""
    counts = {"agree": 0, "disagree": 0}
    for v in verdicts:
        if v.model != model or v.finding != label:
            continue
        if v.tracking_uid and sop not in tracked.get(v.tracking_uid, ()):
            continue
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    return counts


def _write_manifest(out: Path, result: ExportResult) -> None:
    (out / "manifest.json").write_text(
        json.dumps({"images": result.manifest, "excluded": result.excluded}, indent=1) + "\n"
    )
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "file",
                "patient_pseudonym",
                "study_instance_uid",
                "series_instance_uid",
                "sop_instance_uid",
                "modality",
                "body_part",
                "model",
                "model_version",
                "finding",
                "probability",
                "present",
                "feedback_agree",
                "feedback_disagree",
            ]
        )
        for row in result.manifest:
            base = [
                row["file"],
                row["patient_pseudonym"],
                row["study_instance_uid"],
                row["series_instance_uid"],
                row["sop_instance_uid"],
                row["modality"],
                row["body_part"],
            ]
            if not row["models"]:
                w.writerow([*base, "", "", "", "", "", "", ""])
            for name, entry in sorted(row["models"].items()):
                for label, f_ in sorted(entry["findings"].items()):
                    p = f_["probability"]
                    verdicts = f_.get("feedback", {})
                    w.writerow(
                        [
                            *base,
                            name,
                            entry["version"],
                            label,
                            "" if p is None else f"{p:.4f}",
                            "yes" if f_["present"] else "no",
                            verdicts.get("agree", 0),
                            verdicts.get("disagree", 0),
                        ]
                    )
    if result.excluded:
        with open(out / "excluded.csv", "w", newline="") as f:
            dw = csv.DictWriter(f, fieldnames=list(result.excluded[0]))
            dw.writeheader()
            dw.writerows(result.excluded)
