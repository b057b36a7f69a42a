"""Radiologists' feedback: a verdict (agree or disagree) on a finding of one of Nidaan's reports.

Two entrances reach it (docs/governance.md, "Radiologist feedback"):

- gRPC ``RecordFeedback``: a study, a finding (its Tracking UID in Nidaan's report, or the model
  and finding label), a verdict, an optional comment and reader.
- C-STORE of a *verified* SR (Verification Flag VERIFIED) that references Nidaan's report (in the
  Predecessor Documents, Current Requested Procedure Evidence or Identical Documents Sequence, or
  a content item's referenced SOP) and states a verdict per finding, Nidaan's convention::

      CONTAINER (any title, e.g. (126000, DCM, "Imaging Measurement Report"))
        CONTAINER (125007, DCM, "Measurement Group")   one per finding reviewed
          UIDREF (112040, DCM, "Tracking Unique Identifier") = the finding's in Nidaan's report
          CODE   (121071, DCM, "Finding") = the finding's code   (instead of the Tracking UID:
                                            every finding of that code in the report)
          CODE   (AIAGREE, 99NIDAAN, "Agreement with AI finding")
                 = (122775, DCM, "Agreement with prior findings")
                 | (122776, DCM, "Disagreement with prior findings")
                 (or (373066001, SCT, "Yes") | (373067005, SCT, "No"))
          TEXT   (121106, DCM, "Comment")   optional

  The SR is stored like every non-image object (the SCP stores it before it answers); when its
  study is next processed, :meth:`Feedback.take_sr` reads it. An SR that is not verified, or
  that references no report Nidaan made, is not feedback: it stays an ordinary stored object,
  and the log says why, naming it by digest only.

Verdicts go to the state database (``feedback`` table), the metrics
(``nidaan_feedback_total{model,finding,verdict}``), the audit log (without comment or reader)
and the export manifest. The reader is kept only as a keyed digest (``feedback.key`` in the data
dir), so the same reader's verdicts can be told apart from another's without naming anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from nidaan.core.errors import InputError
from nidaan.pacs_bridge.audit import AuditLog
from nidaan.pacs_bridge.state import FeedbackRecord, StateStore
from nidaan.pacs_bridge.uids import is_valid_uid, ref

from .metrics import Metrics
from .model_repository import ModelSpec

log = logging.getLogger("nidaan.feedback")

#: The convention's codes (module docstring).
AGREEMENT = ("AIAGREE", "99NIDAAN", "Agreement with AI finding")
AGREE = ("122775", "DCM", "Agreement with prior findings")
DISAGREE = ("122776", "DCM", "Disagreement with prior findings")
_VERDICT_CODES = {
    ("122775", "DCM"): "agree",
    ("122776", "DCM"): "disagree",
    ("373066001", "SCT"): "agree",
    ("373067005", "SCT"): "disagree",
}
_TRACKING_UID = "112040"
_FINDING = "121071"
_COMMENT = "121106"
_GROUP = "125007"
_ALGORITHM_NAME = "111001"
_ALGORITHM_PARAMETERS = "111002"
_PRESENT = "52101004"
_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_MODEL_IN_PARAMETERS = re.compile(r"\bmodel (\S+) file SHA-256\b")
KEY_FILE = "feedback.key"
VERDICTS = ("agree", "disagree")
#: Longest comment kept (characters).
MAX_COMMENT = 1024


class UnknownReport(InputError):
    """The feedback names a study, report or finding Nidaan has no report of (gRPC NOT_FOUND)."""


@dataclass(frozen=True)
class ReportFinding:
    """One measurement group of a Nidaan report, as feedback refers to it."""

    tracking_uid: str
    model: str
    finding: str
    code: str
    present: bool


@dataclass(frozen=True)
class Outcome:
    """What :meth:`Feedback.take_sr` made of an SR: ``recorded`` verdicts, or why none."""

    recorded: tuple[FeedbackRecord, ...] = ()
    why_not: str = ""


def _name(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence", [])
    return str(names[0].CodeValue) if names else ""


def _walk(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def _code(item: Dataset | None) -> tuple[str, str, str] | None:
    if item is None or not item.get("ConceptCodeSequence"):
        return None
    c = item.ConceptCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator), str(c.get("CodeMeaning", ""))


def report_findings(sr: Dataset, models: Sequence[ModelSpec]) -> list[ReportFinding]:
    """The findings of a Nidaan SR (``pacs_bridge.reports``: one measurement group each), with
    the repository's model and finding label where the model is still there."""
    labels = {
        (m.algorithm.name, f.code.value): (m.name, f.label) for m in models for f in m.findings
    }
    by_model_code = {(m.name, f.code.value): f.label for m in models for f in m.findings}
    out = []
    for group in _walk(sr):
        if group.get("ValueType") != "CONTAINER" or _name(group) != _GROUP:
            continue
        items = {_name(i): i for i in _walk(group)}
        tracking, finding = items.get(_TRACKING_UID), _code(items.get(_FINDING))
        if tracking is None or finding is None:
            continue
        algorithm = (
            str(items[_ALGORITHM_NAME].get("TextValue", "")) if (_ALGORITHM_NAME in items) else ""
        )
        model, label = labels.get((algorithm, finding[0]), ("", ""))
        if not model:  # a model no longer in the repository: named in its parameters
            for item in _walk(group):
                if _name(item) == _ALGORITHM_PARAMETERS:
                    match = _MODEL_IN_PARAMETERS.search(str(item.get("TextValue", "")))
                    if match:
                        model = match.group(1)
            model = model or algorithm
            label = by_model_code.get((model, finding[0]), finding[2])
        evaluation = _code(items.get(finding[0]))
        out.append(
            ReportFinding(
                tracking_uid=str(tracking.get("UID", "")),
                model=model,
                finding=label,
                code=finding[0],
                present=evaluation is not None and evaluation[0] == _PRESENT,
            )
        )
    return out


def referenced_sops(ds: Dataset) -> list[str]:
    """SOP Instance UIDs an SR references: its Predecessor Documents, Current Requested
    Procedure Evidence and Identical Documents Sequences (PS3.3 C.17.2), then its content."""
    out: list[str] = []
    for keyword in (
        "PredecessorDocumentsSequence",
        "CurrentRequestedProcedureEvidenceSequence",
        "IdenticalDocumentsSequence",
        "PertinentOtherEvidenceSequence",
    ):
        for study in ds.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for item in series.get("ReferencedSOPSequence", []):
                    out.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for item in _walk(ds):
        for r in item.get("ReferencedSOPSequence", []):
            out.append(str(r.get("ReferencedSOPInstanceUID", "")))
    return [u for u in dict.fromkeys(out) if u]


def is_sr(sop_class_uid: str) -> bool:
    """Whether the SOP class is a Structured Report's (PS3.4 B.5, ``...88.x``)."""
    return sop_class_uid.startswith(_SR_CLASS_PREFIX)


def load_key(data_dir: Path) -> bytes:
    """The data dir's key for readers' digests (32 random bytes, made on first use, 0600)."""
    path = data_dir / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


class Feedback:
    """Records verdicts on findings, from gRPC and from verified SRs."""

    def __init__(
        self,
        state: StateStore,
        metrics: Metrics,
        models: Sequence[ModelSpec],
        data_dir: Path,
        audit: AuditLog | None = None,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.models = list(models)
        self.audit = audit
        self._key = load_key(data_dir)

    def reader_digest(self, reader: str) -> str:
        """A reader's identity as kept: a keyed digest (HMAC-SHA-256, 16 bytes), '' for none."""
        reader = reader.strip()
        if not reader:
            return ""
        return hmac.new(self._key, reader.encode(), hashlib.sha256).hexdigest()[:32]

    # --- the use-cases ---------------------------------------------------------------------------

    def record(
        self,
        study_uid: str,
        verdict: str,
        *,
        tracking_uid: str = "",
        model: str = "",
        finding: str = "",
        comment: str = "",
        reader: str = "",
    ) -> tuple[str, list[FeedbackRecord]]:
        """A verdict over gRPC on the finding with ``tracking_uid`` in the study's newest report,
        or on each finding of ``model`` labelled (or coded) ``finding`` in it; returns the
        report's SOP Instance UID and what was recorded. InputError for a malformed request,
        :class:`UnknownReport` when the study, report or finding is not Nidaan's."""
        if verdict not in VERDICTS:
            raise InputError(f"verdict must be one of {', '.join(VERDICTS)}")
        if not is_valid_uid(study_uid):
            raise InputError("study_instance_uid is not a valid UID")
        if tracking_uid and not is_valid_uid(tracking_uid):
            raise InputError("tracking_uid is not a valid UID")
        if not tracking_uid and not (model and finding):
            raise InputError("name the finding: its tracking_uid, or model and finding")
        report = self.state.latest_report(study_uid)
        if report is None or not report[0].is_file():
            raise UnknownReport("Nidaan has no report of this study (received over DICOM)")
        path, report_uid = report
        targets = self._targets(
            report_findings(dcmread(path), self.models), tracking_uid, [(model, finding)]
        )
        if not targets:
            raise UnknownReport(
                "the study's report has no finding with this tracking_uid"
                if tracking_uid
                else f"the study's report has no finding {finding!r} of model {model!r}"
            )
        recorded = [
            r
            for r in (
                self._add(
                    FeedbackRecord(
                        study_uid=study_uid,
                        report_uid=report_uid,
                        tracking_uid=t.tracking_uid if tracking_uid else "",
                        model=t.model,
                        finding=t.finding,
                        verdict=verdict,
                        reader=self.reader_digest(reader),
                        comment=comment.strip()[:MAX_COMMENT],
                        source="grpc",
                    )
                )
                # By model and finding: one verdict, however many lesions the report lists.
                for t in (targets if tracking_uid else targets[:1])
            )
            if r is not None
        ]
        return report_uid, recorded

    def take_sr(self, path: Path, study_uid: str) -> Outcome:
        """An SR stored in ``study_uid``: its verdicts recorded when it is a verified SR
        referencing a report Nidaan made (once: an SR read again records nothing new);
        otherwise why it is not feedback. The log names it by digest only."""
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            return Outcome(why_not=f"unreadable ({type(exc).__name__})")
        sop = str(ds.get("SOPInstanceUID", ""))
        if self.state.nidaan_report(sop) is not None:
            return Outcome(why_not="Nidaan's own report")
        reports = [
            (uid, found)
            for uid in referenced_sops(ds)
            if (found := self.state.nidaan_report(uid)) is not None
        ]
        if not reports:
            why = "it references no report Nidaan made"
            log.info("SR %s of study %s is not feedback: %s", ref(sop), ref(study_uid), why)
            return Outcome(why_not=why)
        if str(ds.get("VerificationFlag", "")).upper() != "VERIFIED":
            why = "it references Nidaan's report but is not verified (Verification Flag)"
            log.warning("SR %s of study %s is not feedback: %s", ref(sop), ref(study_uid), why)
            return Outcome(why_not=why)
        report_uid, (report_study, report_path) = reports[0]
        if not report_path.is_file():
            why = "the report it references is no longer kept"
            log.warning("SR %s of study %s is not feedback: %s", ref(sop), ref(study_uid), why)
            return Outcome(why_not=why)
        findings = report_findings(dcmread(report_path), self.models)
        reader = ""
        for observer in ds.get("VerifyingObserverSequence", []):
            reader = str(observer.get("VerifyingObserverName", "")) or reader
            break
        recorded: list[FeedbackRecord] = []
        verdicts = list(_verdicts(ds))
        if not verdicts:
            why = "it states no verdict (Agreement with AI finding) on a finding"
            log.warning("SR %s of study %s is not feedback: %s", ref(sop), ref(study_uid), why)
            return Outcome(why_not=why)
        for tracking_uid, code, verdict, comment in verdicts:
            targets = self._targets(findings, tracking_uid, [("", code)] if code else [])
            if not targets:
                log.warning(
                    "SR %s: a verdict names no finding of report %s (tracking UID or code)",
                    ref(sop),
                    ref(report_uid),
                )
                continue
            for t in targets:
                rec = self._add(
                    FeedbackRecord(
                        study_uid=report_study,
                        report_uid=report_uid,
                        tracking_uid=t.tracking_uid,
                        model=t.model,
                        finding=t.finding,
                        verdict=verdict,
                        reader=self.reader_digest(reader),
                        comment=comment[:MAX_COMMENT],
                        source="sr",
                        source_uid=sop,
                    )
                )
                if rec is not None:
                    recorded.append(rec)
        if recorded:
            log.info(
                "SR %s: %d verdict(s) on report %s recorded: %s",
                ref(sop),
                len(recorded),
                ref(report_uid),
                ", ".join(f"{r.model}/{r.finding} {r.verdict}" for r in recorded),
            )
        return Outcome(recorded=tuple(recorded))

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _targets(
        findings: list[ReportFinding], tracking_uid: str, named: list[tuple[str, str]]
    ) -> list[ReportFinding]:
        """The report's findings a verdict is about: the one with ``tracking_uid``, else each of
        (model or any, finding label or code) in ``named``."""
        if tracking_uid:
            return [f for f in findings if f.tracking_uid == tracking_uid]
        return [
            f
            for f in findings
            for model, finding in named
            if finding and (not model or f.model == model) and finding in (f.finding, f.code)
        ]

    def _add(self, rec: FeedbackRecord) -> FeedbackRecord | None:
        if not self.state.add_feedback(rec):
            return None  # this SR's verdict on this finding is recorded already
        self.metrics.feedback.labels(rec.model, rec.finding, rec.verdict).inc()
        if self.audit is not None:  # the audit trail names the study; never comment or reader
            self.audit.record(
                "feedback",
                study=rec.study_uid,
                report=rec.report_uid,
                tracking_uid=rec.tracking_uid or None,
                model=rec.model,
                finding=rec.finding,
                verdict=rec.verdict,
                source=rec.source,
                sr=rec.source_uid,
            )
        return rec


def _verdicts(ds: Dataset) -> Iterator[tuple[str, str, str, str]]:
    """(tracking UID, finding code value, verdict, comment) of each content item that holds an
    Agreement with AI finding item (the convention in the module docstring)."""
    containers = [ds, *(i for i in _walk(ds) if i.get("ContentSequence"))]
    for container in containers:
        children = list(container.get("ContentSequence", []))
        agreement = next((c for c in children if _name(c) == AGREEMENT[0]), None)
        if agreement is None:
            continue
        value = _code(agreement)
        verdict = _VERDICT_CODES.get(value[:2]) if value else None
        if verdict is None:
            continue
        items = {_name(c): c for c in children}
        tracking = items.get(_TRACKING_UID)
        finding = _code(items.get(_FINDING))
        comment = items.get(_COMMENT)
        yield (
            str(tracking.get("UID", "")) if tracking is not None else "",
            finding[0] if finding else "",
            verdict,
            str(comment.get("TextValue", "")) if comment is not None else "",
        )
