"""The use-cases: analyse a study and report it, whichever entrance it came through.

- :meth:`Studies.report_study`: a study received over DICOM is complete: analyse its images
  (routing rules choose the models), write one SR into the spool and queue it for each
  destination (the outbox delivers it).
- :meth:`Studies.analyse_request`: the instances of one gRPC request: prepare each (a bad one is
  named by its index), analyse them together, and build the SR the PACS would get, if asked.

Both run the same :class:`~nidaan.server.pipeline.Pipeline`, so their images share the models'
batchers. The entrances (``pacs_bridge.scp``, ``server.api``) only admit input and call these;
``server.app`` only wires them together.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from nidaan.core.config import SOURCE, Config
from nidaan.core.errors import InputError
from nidaan.core.findings import ImageAnalysis, ReportedFinding
from nidaan.pacs_bridge.audit import AuditLog
from nidaan.pacs_bridge.lesions import group_findings
from nidaan.pacs_bridge.reports import (
    report_key,
    report_uids,
    study_attributes,
)
from nidaan.pacs_bridge.routing import Router
from nidaan.pacs_bridge.spool import FileChunks, Spool
from nidaan.pacs_bridge.state import StateStore
from nidaan.pacs_bridge.uids import ref

from .drift import DriftRecorder
from .feedback import Feedback, is_sr
from .metrics import Metrics
from .pipeline import Pipeline, Prepared
from .result_objects import ObjectOrder, ResultBuilder, Slot, slot

log = logging.getLogger("nidaan.studies")


@dataclass(frozen=True)
class RequestResult:
    """What one gRPC request's instances gave: per-image analyses and, if asked, the SR."""

    study_uid: str
    analyses: list[ImageAnalysis]
    not_analysed: list[str]
    report: bytes | None


class Studies:
    """The study use-cases over one pipeline, state store and spool."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        router: Router,
        state: StateStore,
        spool: Spool,
        metrics: Metrics,
        audit: AuditLog,
        *,
        device_uid: str,
        wake_outbox: Callable[[], None] = lambda: None,
        feedback: Feedback | None = None,
        results: ResultBuilder | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.router = router
        self.state = state
        self.spool = spool
        self.metrics = metrics
        self.audit = audit
        self.device_uid = device_uid
        #: Builds and writes each reported study's SR and region objects (worker processes).
        self.results = results or ResultBuilder(-1)
        self._wake_outbox = wake_outbox
        #: Radiologists' verdicts (gRPC RecordFeedback, and verified SRs stored in a study).
        self.feedback = feedback
        self._accepted = {m.name: set(m.accepts.modalities) for m in pipeline.models}
        self._drift = DriftRecorder(
            state.record_findings,
            lambda r: metrics.observe_finding(r[1], r[2], r[3], r[5], r[4]),
        )

    def close(self) -> None:
        """Write the drift rows still queued (before the state database closes)."""
        self._drift.close()

    # --- a DICOM study ---------------------------------------------------------------------------

    def destinations(self, calling_ae: str, named: Sequence[str] | None = None) -> list[str]:
        """AE titles a study's report goes to (``@source`` = the sender, when it is a peer)."""
        out: list[str] = []
        for d in self.config.reports.destinations if named is None else named:
            ae = calling_ae if d == SOURCE else d
            if self.config.peer(ae) is not None and ae not in out:
                out.append(ae)
        return out

    def report_study(self, study_uid: str) -> None:
        """Analyse a complete study, write its report and queue it for delivery."""
        info = self.state.study(study_uid)
        if info is None:
            return
        _, _, calling_ae = info
        stored = self.state.instances(study_uid)
        records = [r for r in stored if r.is_image]
        verdicts = self._take_feedback(study_uid, stored)
        if records and self.state.reported_images(study_uid) == len(records):
            # Only objects that are not images (a radiologist's SR, a presentation state)
            # arrived since the report, which they cannot change: not analysed again.
            self._unchanged(study_uid, calling_ae, verdicts)
            return
        if not records:
            self._skip(study_uid)
            return
        paths = {r.sop_instance_uid: r.path for r in records}
        headers = [dcmread(r.path, stop_before_pixels=True) for r in records]

        def load_pixels(ds: Dataset) -> Dataset:
            return dcmread(paths[str(ds.SOPInstanceUID)])

        decisions = {str(h.SOPInstanceUID): self.router.decide(h, calling_ae) for h in headers}
        headers = [h for h in headers if decisions[str(h.SOPInstanceUID)] is not None]

        def allowed(ds: Dataset) -> frozenset[str] | None:
            decision = decisions[str(ds.SOPInstanceUID)]
            return None if decision is None else decision.models

        failures: list[str] = []

        def failed(ds: Dataset, exc: InputError) -> None:
            failures.append(str(exc))
            self._image_failed(study_uid, ds, paths[str(ds.SOPInstanceUID)], exc)

        analyses = self.pipeline.analyse(
            headers, load_pixels=load_pixels, allowed=allowed, on_error=failed
        )
        note = ""
        if failures:
            note = f"{len(failures)} image(s) could not be analysed: {failures[0]}"
        if not analyses:
            if failures:  # acknowledged images, none usable: a visible failure, not a skip
                raise InputError(note)
            self._skip(study_uid)
            return
        try:
            # The SR and the region objects all carry what the images agree on.
            agreed = study_attributes(
                list({str(a.source.SOPInstanceUID): a.source for a in analyses}.values())
            )
        except ValueError as exc:  # names the attribute, never its values (patient data)
            raise InputError(f"no report: {exc}") from exc
        self.state.set_study_state(study_uid, "analysed", note)
        log.info("study %s analysed: %s", ref(study_uid), _summary(analyses))
        writing = time.monotonic()
        findings = group_findings(analyses)
        named = [d for dec in decisions.values() if dec is not None for d in dec.destinations]
        destinations = self.destinations(calling_ae, named)
        wanted: list[tuple[str, Slot]] = []
        for dest in destinations:
            peer = self.config.peer(dest)
            assert peer is not None  # destinations() keeps configured peers only
            wanted += [(dest, slot(kind, peer.language)) for kind in peer.objects]
        # Every object of the study in one order, built off this process's GIL
        # (server.result_objects); the English SR always (GetStudy reads it), sent or not.
        built = self.results.build(
            ObjectOrder(
                study_uid=study_uid,
                analyses=analyses,
                findings=findings,
                key=report_key(analyses, paths),
                sources=paths,
                study_attributes=agreed,
                reports_dir=self.spool.reports_dir,
                device_uid=self.device_uid,
                series_number=self.config.reports.series_number,
                institution_name=self.config.reports.institution_name,
                slots=tuple(s for _, s in wanted),
            )
        )
        ((path, sop_uid),) = built.objects[("sr", "")]
        for kind, problem in built.problems.items():
            log.warning("study %s: %s", ref(study_uid), problem)
            self.metrics.result_objects_failed.labels(kind).inc()
        if not destinations:
            why = self._no_destination(calling_ae)
            self.state.report_study(
                study_uid, why, (path, sop_uid), (), findings_summary(findings), len(records)
            )
            self.metrics.stage("report", time.monotonic() - writing)
            log.warning(
                "study %s reported, report %s not sent: %s",
                ref(study_uid),
                ref(sop_uid),
                why,
            )
            return
        queue = [(p, uid, dest) for dest, s in wanted for p, uid in built.objects[s]]
        if built.problems:
            note = "; ".join(filter(None, [note, *built.problems.values()]))
        # The state, the queue and the report in one transaction: the outbox's "delivered"
        # comes after it and is never overwritten, and nobody (GetStudy, a crash) ever sees a
        # reported study with nothing queued.
        self.state.report_study(
            study_uid, note, (path, sop_uid), queue, findings_summary(findings), len(records)
        )
        self.metrics.stage("report", time.monotonic() - writing)
        self.metrics.studies.labels("reported").inc()
        self._wake_outbox()

    def _take_feedback(self, study_uid: str, stored: Sequence[Any]) -> int:
        """Record the verdicts of the study's verified SRs that reference Nidaan's reports
        (``server.feedback``; an SR read before records nothing new); how many were new."""
        if self.feedback is None:
            return 0
        n = 0
        for r in stored:
            if not r.is_image and is_sr(r.sop_class_uid):
                n += len(self.feedback.take_sr(r.path, study_uid).recorded)
        return n

    def _unchanged(self, study_uid: str, calling_ae: str, verdicts: int) -> None:
        """Put back the state a reported study had before an object that is not an image
        reopened it: delivered when every result object was, else reported."""
        outbox = self.state.study_outbox_counts(study_uid)
        if not outbox:
            self.state.set_study_state(study_uid, "reported", self._no_destination(calling_ae))
        elif set(outbox) == {"delivered"}:
            self.state.set_study_state(study_uid, "delivered")
        else:
            self.state.set_study_state(study_uid, "reported")
        log.info(
            "study %s: no new image since its report, not analysed again (%d new verdict(s))",
            ref(study_uid),
            verdicts,
        )

    def observe(self, analyses: Sequence[ImageAnalysis]) -> None:
        """The pipeline's ``on_analysed`` (wired by ``server.app``, so every entrance's results
        are counted: a DICOM study, gRPC Analyze and AnalyzeStudy).

        Drift: each image's probability and presence per model and finding, into the state
        database (the status page's last day, kept across restarts) and the metrics (labelled
        by model, finding and modality only). An image analysed again (a study reopened, a
        gRPC request repeated) counts once: images are told apart by a digest of their SOP
        Instance UID, which is all the database keeps of them. The rows are written on a
        thread of their own (:mod:`server.drift`), so the caller waits for no commit."""
        rows = []
        for a in analyses:
            model = a.algorithm.model or a.algorithm.name
            modality = str(a.source.get("Modality", "")).upper()
            if modality not in self._accepted.get(model, ()):
                modality = "other"  # never a free-text header value as a label
            image = hashlib.sha256(str(a.source.SOPInstanceUID).encode()).hexdigest()[:32]
            rows += [
                (image, model, f.label, modality, f.present, f.probability) for f in a.findings
            ]
        # Written and counted on the drift thread, many calls' rows per transaction.
        self._drift.submit(rows)

    def _no_destination(self, calling_ae: str) -> str:
        """Why a study's report goes nowhere, and how to have it delivered."""
        kept = "the report is kept in the data dir's reports/ folder (GetStudy returns it)"
        if self.config.peers and self.config.peer(calling_ae) is None:
            return (
                f"the sender, AE {calling_ae!r}, is not a configured peer, so '@source' in "
                f"reports.destinations cannot reach it; {kept}; to deliver reports to it, add a "
                f"[[peers]] entry with ae_title = {calling_ae!r} and its host and port, then "
                "have the study sent again"
            )
        return (
            f"no destination is configured (no [[peers]] entry for AE {calling_ae!r} and none "
            f"in reports.destinations); {kept}; to deliver reports, add the PACS as a "
            "[[peers]] entry"
        )

    def _image_failed(self, study_uid: str, ds: Dataset, path: Path, exc: InputError) -> None:
        """An acknowledged image that cannot be analysed: kept in quarantine with the reason (the
        spool keeps the study's copy), in the audit log and the metrics, and named in the log by
        digest only. Decoding follows Success (nothing slow runs on an association's thread),
        so this is where an undecodable instance becomes visible."""
        sop_uid = str(ds.SOPInstanceUID)
        status = f"0x{exc.status:04X}"
        try:
            self.spool.quarantine(
                FileChunks(path, path.stat().st_size),
                str(exc),
                status=exc.status,
                size=path.stat().st_size,
                min_free_bytes=self.config.dicom.min_free_bytes,
                stage="analysis",
            )
        except OSError as err:
            log.error("could not quarantine instance %s: %s", ref(sop_uid), err.strerror)
        self.metrics.images_failed.inc()
        self.audit.record(
            "instance_failed", status=status, reason=str(exc), study=study_uid, sop_instance=sop_uid
        )
        log.warning("instance %s of study %s not analysed: %s", ref(sop_uid), ref(study_uid), exc)

    def _skip(self, study_uid: str) -> None:
        self.state.set_study_state(study_uid, "skipped", "no image that a model applies to")
        self.metrics.studies.labels("skipped").inc()

    # --- a gRPC request --------------------------------------------------------------------------

    def analyse_request(
        self, datasets: Sequence[Dataset], models: frozenset[str] | None, *, report: bool
    ) -> RequestResult:
        """Analyse one request's instances (all of one study) with ``models`` (None = any).

        Each instance is decoded and preprocessed in turn, so that a bad one is named: the
        InputError says which (``index``). Its tensors stay in this call (never in the DICOM
        path's arrival cache), so a request can only ever run the models it asked for.
        """
        studies = {str(ds.StudyInstanceUID) for ds in datasets}
        if len(studies) != 1:
            raise InputError(
                f"the instances belong to {len(studies)} studies; send one study per request"
            )
        study_uid = studies.pop()
        prepared: dict[str, dict[str, Prepared]] = {}
        for i, ds in enumerate(datasets):
            try:
                prepared[str(ds.SOPInstanceUID)] = self.pipeline.prepare(ds, models)
            except InputError as exc:
                error = type(exc)(f"instance {i}: {exc}", status=exc.status)
                error.index = i
                raise error from exc
        analyses = self.pipeline.analyse(datasets, allowed=lambda ds: models, prepared=prepared)
        analysed = {str(a.source.SOPInstanceUID) for a in analyses}
        not_analysed = [
            str(ds.SOPInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) not in analysed
        ]
        sr = self.request_report(study_uid, analyses) if report and analyses else None
        return RequestResult(study_uid, analyses, not_analysed, sr)

    def request_report(self, study_uid: str, analyses: list[ImageAnalysis]) -> bytes:
        """The SR a gRPC request asked for (the same TID 1500 report the PACS would get), built
        by a report builder process."""
        key = report_key(analyses, (str(a.source.SOPInstanceUID) for a in analyses))
        series_uid, sop_uid = report_uids(study_uid, "grpc|" + key)
        # The same findings and Tracking UIDs as the DICOM route's report of the same study.
        try:
            return self.results.report(
                analyses,
                series_instance_uid=series_uid,
                sop_instance_uid=sop_uid,
                series_number=self.config.reports.series_number,
                device_uid=self.device_uid,
            )
        except ValueError as exc:  # e.g. the instances name two patients
            raise InputError(f"no report: {exc}") from exc

    # --- GetStudy (gRPC) ---

    def study_record(self, study_uid: str) -> tuple[str, str, int, str | None, str] | None:
        """What the node knows of a study received over DICOM: (state, reason, instances
        stored, the path of its newest report or None, that report's SOP Instance UID or ''), or
        None for a study it never received. Read-only; the report is the SR in the spool."""
        info = self.state.study(study_uid)
        if info is None:
            return None
        state, reason, _ = info
        count = self.state.instance_count(study_uid)
        report = self.state.latest_report(study_uid)
        if report is None or not report[0].is_file():
            return state, reason, count, None, ""
        return state, reason, count, str(report[0]), report[1]


def findings_summary(findings: Sequence[ReportedFinding]) -> str:
    """The status page's line for a study: what is present, with probability and size, or
    that nothing is (finding labels and numbers only, no patient data)."""
    present = [
        f"{f.label} {f.probability:.2f}" + (f" {f.size_mm:.0f} mm" if f.size_mm else "")
        for f in findings
        if f.present
    ]
    return "; ".join(present) if present else "nothing present"


def _summary(analyses: list[ImageAnalysis]) -> str:
    """Findings for the log: labels and probabilities, no patient data."""
    return "; ".join(
        f"{a.algorithm.name}: "
        + ", ".join(
            f"{f.label} {'present' if f.present else 'absent'} ({f.probability:.2f})"
            for f in a.findings
        )
        for a in analyses
    )
