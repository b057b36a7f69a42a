"""A reported study's result objects (the SR per language, and the Segmentations, presentation
states and Secondary Captures of its regions), built and written in worker processes.

Why processes: highdicom builds an object in pure Python, and a positive chest radiograph's SR,
SEG and presentation state cost about 120 ms of CPU together. In the server's process that time
holds the GIL every association, analysis worker and the outbox need: at 5 studies/s the
objects alone wanted most of the one core a Python process can use, and the reports' turnaround
rose all through the run (``benchmarks/turnaround.py``). One :class:`ObjectOrder` per study goes
to a :class:`~nidaan.server.worker_pool.WorkerPool` of ``reports.workers`` processes, which
builds every object the study's destinations asked for, writes each into the reports folder
(atomically) and returns their paths; the study's worker thread waits with the GIL released.

:func:`build` is the same work in the caller's process (``reports.workers = -1``; tests).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset

from nidaan.core.errors import ReportError
from nidaan.core.findings import ImageAnalysis, ReportedFinding
from nidaan.core.machine import usable_cores
from nidaan.pacs_bridge.languages import load_language
from nidaan.pacs_bridge.overlays import (
    build_presentation_states,
    build_secondary_captures,
    build_segmentations,
    legend_in,
    overlay_uids,
)
from nidaan.pacs_bridge.reports import (
    MANUFACTURER,
    MODEL_NAME,
    build_report,
    encode,
    report_uids,
    serial_number,
    software_version,
)
from nidaan.pacs_bridge.spool import atomic_write

from .worker_pool import WorkerPool

T = TypeVar("T")
_UID_IN_TEXT = re.compile(r"\b\d+(\.\d+){2,}\b")

#: The kinds of result object (``[[peers]] objects``).
KINDS = ("sr", "seg", "gsps", "sc")
#: (kind, language): one object kind in one language ('' = English alone).
Slot = tuple[str, str]


def slot(kind: str, language: str) -> Slot:
    """The slot an object of ``kind`` for a destination of ``language`` fills: the SR, the
    presentation state and the SC's burned-in text carry the destination's language; the SEG
    has no text to translate (docs/reports.md)."""
    if kind not in KINDS:
        raise ValueError(f"unknown result object {kind!r}")
    return (kind, language if kind != "seg" else "")


@dataclass(frozen=True)
class ObjectOrder:
    """Everything a worker needs to build one study's result objects (it pickles: no open
    files, no server objects)."""

    study_uid: str
    analyses: list[ImageAnalysis]
    findings: list[ReportedFinding]
    #: What the report's UIDs derive from (``report_key``): a rebuild replaces, never duplicates.
    key: str
    #: SOP Instance UID -> the spooled source file (region objects read the pixels there).
    sources: dict[str, Path]
    #: The Patient and General Study attributes the SR carries: the region objects too.
    study_attributes: dict[str, object]
    reports_dir: Path
    device_uid: str
    series_number: int
    institution_name: str
    #: The objects wanted; the English SR is always made (GetStudy returns it).
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class Built:
    """What an order gave: (path, SOP Instance UID) of each object per slot (empty where there
    was nothing to draw), and why region objects were left out: kind -> one line."""

    objects: dict[Slot, list[tuple[Path, str]]]
    problems: dict[str, str]


def build(order: ObjectOrder) -> Built:
    """Build and write the order's objects, the English SR first. An SR that cannot be made
    raises (ValueError naming why); a region object that cannot (highdicom refuses a
    Segmentation of slices that share a position, for one) is left out and named in
    ``problems``: the SR, which says everything, still goes out."""
    objects: dict[Slot, list[tuple[Path, str]]] = {}
    problems: dict[str, str] = {}
    full: dict[str, Dataset] = {}
    for kind, language in dict.fromkeys((("sr", ""), *order.slots)):
        if kind == "sr":
            objects[(kind, language)] = [_write_report(order, language)]
            continue
        try:
            objects[(kind, language)] = _region_objects(order, kind, language, full)
        except (ValueError, TypeError, AttributeError, OSError) as exc:
            # UIDs out of the message: the log names studies by digest only.
            detail = _UID_IN_TEXT.sub("<uid>", str(exc))[:200]
            problems[kind] = f"no {kind.upper()}: {type(exc).__name__}: {detail}"
            objects[(kind, language)] = []
    return Built(objects, problems)


def encoded_report(
    analyses: list[ImageAnalysis],
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    device_uid: str,
    *,
    findings: list[ReportedFinding] | None = None,
    institution_name: str = "",
    language: str = "",
) -> bytes:
    """The SR of ``analyses`` as Part 10 bytes (a gRPC request's, or a study's before it is
    written); ValueError naming why the analyses cannot make one (e.g. two patients)."""
    return encode(
        build_report(
            analyses,
            findings=findings,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            series_number=series_number,
            device_observer_uid=device_uid,
            institution_name=institution_name or None,
            language=language,
        )
    )


def _write_report(order: ObjectOrder, language: str) -> tuple[Path, str]:
    """The study's SR (with ``language`` beside English) in the reports folder: its path and
    SOP Instance UID. The UIDs derive from the study, the models' versions, the analysed
    instances and the language, so a re-sent report is the same object."""
    series_uid, sop_uid = report_uids(
        order.study_uid, order.key + (f"|lang={language}" if language else "")
    )
    data = encoded_report(
        order.analyses,
        series_uid,
        sop_uid,
        order.series_number,
        order.device_uid,
        findings=order.findings,
        institution_name=order.institution_name,
        language=language,
    )
    path = order.reports_dir / f"{sop_uid}.dcm"
    atomic_write(path, [data])
    return path, sop_uid


def _region_objects(
    order: ObjectOrder, kind: str, language: str, full: dict[str, Dataset]
) -> list[tuple[Path, str]]:
    drawable = [f for f in order.findings if f.present and f.parts]
    if not drawable:
        return []  # nothing to draw: the SR says so
    if not full:  # the source images, pixels too, read once for every kind
        wanted = {str(p.source.SOPInstanceUID) for f in drawable for p in f.parts}
        full.update((uid, dcmread(order.sources[uid])) for uid in sorted(wanted))
    images = full
    key = f"{order.study_uid}|{order.key}"
    common: dict[str, Any] = {
        "software_versions": software_version(),
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "study_attributes": order.study_attributes,
    }
    series = sorted({str(images[u].SeriesInstanceUID) for u in images})
    made: Sequence[Dataset]
    if kind == "seg":
        series_uid, uids = overlay_uids("seg", key, series)
        made = build_segmentations(
            order.findings,
            images,
            series_instance_uid=series_uid,
            sop_instance_uids=uids,
            device_serial_number=serial_number(order.device_uid),
            **common,
        )
    elif kind == "gsps":
        pr_kind = "pr" + (f"|{language}" if language else "")
        series_uid, uids = overlay_uids(pr_kind, key, series)
        made = build_presentation_states(
            order.findings,
            images,
            series_instance_uid=series_uid,
            sop_instance_uids=uids,
            device_serial_number=serial_number(order.device_uid),
            legend=legend_in(load_language(language) if language else None),
            **common,
        )
    else:  # "sc"
        sc_kind = "sc" + (f"|{language}" if language else "")
        series_uid, uids = overlay_uids(sc_kind, key, sorted(images))
        made = build_secondary_captures(
            order.findings,
            images,
            series_instance_uid=series_uid,
            sop_instance_uids=uids,
            language=load_language(language) if language else None,
            **common,
        )
    out = []
    for ds in made:
        path = order.reports_dir / f"{ds.SOPInstanceUID}.dcm"
        atomic_write(path, [encode(ds)])
        out.append((path, str(ds.SOPInstanceUID)))
    return out


def _warm() -> None:
    """In each new worker: the builders' imports and the version lookup, before a study waits."""
    import highdicom  # noqa: F401

    software_version()


#: ``reports.workers = 0`` gives one builder per core up to this many: a positive radiograph's
#: objects take about 0.15 s of one core, so four builders keep up with about 25 positive
#: studies/s, and each builder holds about 164 MiB (docs/sizing.md).
MAX_AUTO_WORKERS = 4


class ResultBuilder:
    """Builds orders in ``workers`` processes (0 = one per core, at most
    :data:`MAX_AUTO_WORKERS`), or in the caller's thread when ``workers`` is -1. A worker that
    dies or runs past ``timeout_s`` fails only its orders, with :class:`ReportError`."""

    def __init__(self, workers: int = 0, timeout_s: float = 300.0) -> None:
        if workers == 0:
            workers = min(usable_cores(), MAX_AUTO_WORKERS)
        self._pool = (
            None
            if workers < 0
            else WorkerPool(
                workers,
                timeout_s,
                name="report builder",
                what="building the study's result objects",
                error=ReportError,
                warm=_warm,
            )
        )

    @property
    def workers(self) -> int:
        """Worker processes (0 when orders are built in the caller's thread)."""
        return 0 if self._pool is None else self._pool.workers

    @property
    def restarts(self) -> int:
        """Pools replaced after a worker died or overran (for the status page)."""
        return 0 if self._pool is None else self._pool.restarts

    def start(self) -> None:
        """Start the workers now (``nidaan serve`` does, so the first study does not wait)."""
        if self._pool is not None:
            self._pool.start()

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker, or here when there are none."""
        return fn(*args) if self._pool is None else self._pool.call(fn, *args)

    def build(self, order: ObjectOrder) -> Built:
        """The order's objects, built and written (see :func:`build`)."""
        return self._run(build, order)

    def report(
        self,
        analyses: list[ImageAnalysis],
        *,
        series_instance_uid: str,
        sop_instance_uid: str,
        series_number: int,
        device_uid: str,
    ) -> bytes:
        """A gRPC request's SR as Part 10 bytes (see :func:`encoded_report`), built in a worker:
        a call that asks for its report holds no other call up while highdicom builds it."""
        return self._run(
            encoded_report,
            analyses,
            series_instance_uid,
            sop_instance_uid,
            series_number,
            device_uid,
        )

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._pool is not None:
            self._pool.close()
