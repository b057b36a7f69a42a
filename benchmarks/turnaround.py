"""Turnaround under a fixed arrival rate: Orthanc sends studies to ``nidaan serve`` on a schedule
(open loop) and the time from each send until its SR is stored back in Orthanc is measured.

    .venv/bin/python benchmarks/turnaround.py [--seconds 60]
        [--cases radiograph,radiograph_sr,jpeg2000,jpeg2000_sr,ct] [--smoke] [--json PATH]

A real Orthanc (Debian's ``Orthanc``) is the PACS. Before each case it is given, over REST, the
case's studies, each with new Study/Series/SOP Instance UIDs; then a ``nidaan serve`` (with
Orthanc as its peer, reports to ``@source``) is started, and study i is sent at t0 + i / rate by
``POST /modalities/nidaan/store`` in a thread of its own, whether or not the previous sends have
finished: the arrival rate does not slow down when the server does (open loop, not back to back).
A poller reads Orthanc's ``/changes`` every 10 ms; a study's turnaround is from the start of its
send to the poll that first sees its new SR series (so it is at most one poll late). Before
the clock starts, one more study is sent and its report awaited, and not counted: a server's
first study pays for loading the models (and compiling the kernels when Numba's cache is
cold). Cases, each for ``--seconds`` (fresh Orthanc and Nidaan per case):

- radiograph: pydicom-data's chest PA CR ``RG1_UNCR`` (1955 x 1841, MONOCHROME1, uncompressed)
  at 5 studies/s; target p95 <= 1 s;
- jpeg2000: the same image as JPEG 2000 lossless (``RG1_J2KR``) at 2 studies/s; target p95 <= 2 s;
- ct: a 100-slice 512 x 512 CT study (synthesised as benchmarks/ingest.py does) at 0.2
  studies/s; no target.

Printed per case: p50/p95/p99 turnaround, the median C-STORE (Orthanc's store call), whether the
latency rises through the run (median of the last third of sends over the first third; "flat"
when at most 1.5x), and the failures: a store Orthanc reports as failed (association rejected,
a failure status; Orthanc's error details are printed) or a study whose report has not arrived
``--drain`` seconds after the last send. ``--smoke``: 3 studies per case, a 10-slice CT. Not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))  # when imported by run_all.py

import report  # noqa: E402
from workload import (  # noqa: E402
    ROOT,
    Orthanc,
    ct_series_datasets,
    free_port,
    nidaan_config,
    part10,
    sample_file,
    start_nidaan,
    stop,
    wait_for_port,
    with_new_uids,
)

#: A rise of the median from the first to the last third of the sends above this is "rising".
FLAT = 1.5
POLL_S = 0.01


@dataclass(frozen=True)
class Case:
    """One arrival-rate case: what is sent, how often, and the p95 target (seconds) if any."""

    name: str
    label: str
    rate: float
    p95_target: float | None
    sample: str | None = None  # a pydicom-data file; None: a synthetic CT series
    slices: int = 100
    #: What Orthanc gets of each study (``[[peers]] objects``); None: the product's default
    #: (the SR, a Segmentation and a presentation state of each study with a finding).
    objects: tuple[str, ...] | None = None


CASES = (
    Case("radiograph", "chest CR 1955x1841 uncompressed", 5.0, 1.0, sample="RG1_UNCR.dcm"),
    Case(
        "radiograph_sr",
        "chest CR 1955x1841 uncompressed, the SR alone to the PACS",
        5.0,
        1.0,
        sample="RG1_UNCR.dcm",
        objects=("sr",),
    ),
    Case("jpeg2000", "chest CR 1955x1841 JPEG 2000 lossless", 2.0, 2.0, sample="RG1_J2KR.dcm"),
    Case(
        "jpeg2000_sr",
        "chest CR 1955x1841 JPEG 2000 lossless, the SR alone to the PACS",
        2.0,
        2.0,
        sample="RG1_J2KR.dcm",
        objects=("sr",),
    ),
    Case("ct", "CT series of 512x512 slices", 0.2, None),
)

CASE_NAMES = tuple(c.name for c in CASES)


@dataclass
class Study:
    """One sent study: Orthanc's ID for it, and what happened."""

    orthanc_id: str
    index: int
    scheduled: float = 0.0
    sent: float | None = None
    store_s: float | None = None
    reported: float | None = None
    error: str | None = None

    @property
    def turnaround(self) -> float | None:
        if self.sent is None or self.reported is None or self.error:
            return None
        return self.reported - self.sent


@dataclass
class Outcome:
    """A case's studies and the run's own bookkeeping."""

    case: Case
    studies: list[Study]
    instances: int
    mb: float
    schedule_lag_max: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


def _case_datasets(case: Case, slices: int) -> list[pydicom.Dataset]:
    """A template study for ``case`` (new UIDs are given per uploaded study)."""
    if case.sample is not None:
        return [pydicom.dcmread(sample_file(case.sample))]
    return ct_series_datasets(slices)


def upload_studies(
    orthanc: Orthanc, case: Case, n: int, slices: int
) -> tuple[list[Study], int, float]:
    """Give Orthanc ``n`` copies of the case's study, each with new UIDs; the studies, the
    instances per study and the MB per study. Two uploads at a time (Orthanc indexes each
    instance in SQLite)."""
    template = _case_datasets(case, slices)

    def one(i: int) -> tuple[Study, int]:
        study, series = generate_uid(), generate_uid()
        parent, size = "", 0
        for ds in template:
            data = part10(with_new_uids(ds, study, series))
            size += len(data)
            parent = orthanc.upload(data)["ParentStudy"]
        return Study(parent, i), size

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(one, range(n)))
    return [s for s, _ in done], len(template), done[0][1] / 1e6


class ReportWatcher:
    """Polls Orthanc's ``/changes`` and stamps each awaited study when its SR series appears."""

    def __init__(self, orthanc: Orthanc, studies: list[Study]) -> None:
        self.orthanc = orthanc
        self.pending = {s.orthanc_id: s for s in studies}
        self.last = int(orthanc.get("/changes?last")["Last"])
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="report-watcher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                answer = self.orthanc.get(f"/changes?since={self.last}&limit=1000")
            except OSError:
                time.sleep(POLL_S)
                continue
            seen = time.perf_counter()  # the change happened before this answer came back
            for change in answer["Changes"]:
                if change["ChangeType"] != "NewSeries":
                    continue
                series = self.orthanc.get(f"/series/{change['ID']}")
                study = self.pending.get(series.get("ParentStudy", ""))
                if study is not None and series["MainDicomTags"].get("Modality") == "SR":
                    study.reported = study.reported or seen
            self.last = int(answer["Last"])
            if answer.get("Done", True):
                time.sleep(POLL_S)

    def outstanding(self) -> int:
        return sum(1 for s in self.pending.values() if s.reported is None and s.error is None)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def _send(orthanc: Orthanc, study: Study) -> None:
    """Have Orthanc C-STORE the study to Nidaan (synchronous REST call); record the outcome."""
    study.sent = time.perf_counter()
    try:
        orthanc.request("POST", "/modalities/nidaan/store", study.orthanc_id.encode(), "text/plain")
    except urllib.error.HTTPError as exc:
        try:
            details = json.loads(exc.read() or b"{}")
            why = details.get("Details") or details.get("Message") or str(exc)
        except (ValueError, OSError):
            why = str(exc)
        study.error = f"store failed: {why}"
    except OSError as exc:
        study.error = f"store failed: {exc}"
    finally:
        study.store_s = time.perf_counter() - study.sent


def run_case(case: Case, seconds: float, slices: int, n: int | None, drain: float) -> Outcome:
    """Upload, start Nidaan, send on schedule, wait for the reports; everything stopped after."""
    n = n if n is not None else max(1, round(case.rate * seconds))
    work = Path(tempfile.mkdtemp(prefix=f"nidaan-turnaround-{case.name}-"))
    nidaan_port = free_port()
    orthanc = Orthanc(work / "orthanc", {"nidaan": ("NIDAAN", "127.0.0.1", nidaan_port)})
    server = None
    try:
        uploaded, instances, mb = upload_studies(orthanc, case, n + 1, slices)
        warmup, studies = uploaded[0], uploaded[1:]
        for i, study in enumerate(studies):
            study.index = i
        config = nidaan_config(
            work / "nidaan.toml",
            port=nidaan_port,
            data_dir=work / "data",
            models=ROOT / "models",
            peers={orthanc.aet: orthanc.dicom_port},  # reports go back to @source: Orthanc
            peer_objects=case.objects,
        )
        server = start_nidaan(config, work / "nidaan.log")
        wait_for_port(nidaan_port, timeout=180, proc=server)
        # One study first, not counted: the server's first study loads the models' sessions
        # (and compiles the kernels when Numba's cache is cold), which no later study pays.
        warm = ReportWatcher(orthanc, [warmup])
        _send(orthanc, warmup)
        deadline = time.perf_counter() + 180
        while warm.outstanding() and warmup.error is None and time.perf_counter() < deadline:
            time.sleep(0.05)
        warm.close()
        if warmup.reported is None:
            raise RuntimeError(f"the warm-up study got no report: {warmup.error or 'timeout'}")
        watcher = ReportWatcher(orthanc, studies)
        senders = []
        lag = 0.0
        t0 = time.perf_counter() + 0.5
        for study in studies:
            study.scheduled = t0 + study.index / case.rate
            wait = study.scheduled - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            lag = max(lag, time.perf_counter() - study.scheduled)
            sender = threading.Thread(target=_send, args=(orthanc, study), daemon=True)
            sender.start()
            senders.append(sender)
        deadline = time.perf_counter() + drain
        while watcher.outstanding() and time.perf_counter() < deadline:
            time.sleep(0.05)
        for sender in senders:
            sender.join(timeout=max(0.0, deadline - time.perf_counter()) + 1)
        watcher.close()
        for study in studies:
            if study.error is None and study.reported is None:
                study.error = f"no report within {drain:.0f} s of the last send"
        errors: dict[str, int] = {}
        for study in studies:
            if study.error:
                errors[study.error] = errors.get(study.error, 0) + 1
        return Outcome(case, studies, instances, mb, lag, errors)
    finally:
        if server is not None:
            stop(server)
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, linear between order statistics."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarise(o: Outcome) -> dict[str, Any]:
    """Percentiles, the rise through the run, C-STORE times and failures of one case."""
    times = [s.turnaround for s in o.studies if s.turnaround is not None]
    third = max(1, len(o.studies) // 3)
    first = [s.turnaround for s in o.studies[:third] if s.turnaround is not None]
    last = [s.turnaround for s in o.studies[-third:] if s.turnaround is not None]
    stores = [s.store_s for s in o.studies if s.store_s is not None and not s.error]
    rise = statistics.median(last) / statistics.median(first) if first and last else None
    return {
        "n": len(o.studies),
        "reported": len(times),
        "failed": sum(1 for s in o.studies if s.error),
        "p50": _quantile(times, 0.50) if times else None,
        "p95": _quantile(times, 0.95) if times else None,
        "p99": _quantile(times, 0.99) if times else None,
        "first_third_p50": statistics.median(first) if first else None,
        "last_third_p50": statistics.median(last) if last else None,
        "rise": rise,
        "store_p50": statistics.median(stores) if stores else None,
        "store_max": max(stores) if stores else None,
        "errors": o.errors,
        "schedule_lag_max": o.schedule_lag_max,
        "turnarounds": [s.turnaround for s in o.studies],
    }


def _print_case(o: Outcome, m: dict[str, Any]) -> None:
    c = o.case

    def s(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f} s"

    print(
        f"{c.name}: {c.label}, {m['n']} studies of {o.instances} instance(s) ({o.mb:.1f} MB "
        f"each) at {c.rate:g}/s from Orthanc, open loop (latest send {o.schedule_lag_max * 1e3:.0f}"
        " ms behind schedule)"
    )
    print(
        f"  send -> SR stored in Orthanc: p50 {s(m['p50'])}, p95 {s(m['p95'])}, p99 {s(m['p99'])}"
    )
    if m["rise"] is not None:
        trend = "flat" if m["rise"] <= FLAT else "RISING"
        print(
            f"  through the run: first third p50 {s(m['first_third_p50'])}, last third p50 "
            f"{s(m['last_third_p50'])}: {m['rise']:.2f}x, {trend}"
        )
    print(f"  C-STORE (Orthanc's store call): median {s(m['store_p50'])}, max {s(m['store_max'])}")
    print(f"  reported {m['reported']}/{m['n']}, failed {m['failed']}")
    for why, count in sorted(m["errors"].items(), key=lambda kv: -kv[1]):
        print(f"    {count} x {why}")
    if c.p95_target is not None and m["p95"] is not None:
        verdict = "met" if m["p95"] <= c.p95_target else "MISSED"
        print(f"  target p95 <= {c.p95_target:g} s: {verdict}")


def _why(m: dict[str, Any]) -> str:
    """Why a target was missed, from what this run measured."""
    parts = []
    if m["store_p50"] is not None:
        parts.append(f"the C-STORE alone took a median {m['store_p50']:.2f} s")
    if m["rise"] is not None and m["rise"] > FLAT:
        parts.append(
            f"latency rose {m['rise']:.1f}x from the first to the last third: the server falls "
            "behind the arrival rate"
        )
    if m["failed"]:
        parts.append(f"{m['failed']} of {m['n']} studies failed")
    return "; ".join(parts) or "see the run's printed lines"


def run(
    smoke: bool = False,
    *,
    seconds: float = 60.0,
    cases: tuple[str, ...] = CASE_NAMES,
    drain: float = 120.0,
) -> dict[str, Any]:
    """The benchmark convention's dict (benchmarks/README.md); ``smoke``: 3 studies per case
    and a 10-slice CT."""
    rows = []
    per_case: dict[str, dict[str, Any]] = {}
    for case in (c for c in CASES if c.name in cases):
        outcome = run_case(
            case,
            seconds,
            slices=10 if smoke else case.slices,
            n=3 if smoke else None,
            drain=60.0 if smoke else drain,
        )
        m = summarise(outcome)
        per_case[case.name] = m
        _print_case(outcome, m)
        at = f"{case.name} at {case.rate:g}/s"
        why = _why(m)
        rows.append(report.row(f"{at}: p50 send -> SR in Orthanc", m["p50"], "s"))
        target = f"<= {case.p95_target:g} s" if case.p95_target is not None else None
        rows.append(report.row(f"{at}: p95", m["p95"], "s", target=target, why=why))
        rows.append(report.row(f"{at}: p99", m["p99"], "s"))
        if m["rise"] is not None:
            rows.append(
                report.row(
                    f"{at}: last third's p50 / first third's",
                    m["rise"],
                    "x",
                    target=f"<= {FLAT:g}",
                    why=why,
                )
            )
        rows.append(report.row(f"{at}: C-STORE from Orthanc, median", m["store_p50"], "s"))
        errors = "; ".join(f"{n} x {w}" for w, n in m["errors"].items())
        rows.append(
            report.row(
                f"{at}: failed studies of {m['n']}",
                m["failed"],
                "studies",
                target="<= 0",
                why=errors[:300],
            )
        )
    longest = max((len(m["turnarounds"]) for m in per_case.values()), default=0)
    series = {
        name: m["turnarounds"] + [None] * (longest - len(m["turnarounds"]))
        for name, m in per_case.items()
    }
    args = [] if smoke else [f"--seconds {seconds:g}", f"--cases {','.join(cases)}"]
    return report.result(
        "turnaround",
        "Turnaround at a fixed arrival rate: Orthanc sends (open loop) -> nidaan serve -> SR "
        "stored in Orthanc",
        report.command_line("turnaround.py", smoke, *args),
        rows,
        report.plot_spec(
            "line",
            "Send -> SR stored in Orthanc, in send order",
            "study (send order)",
            "turnaround (s)",
            list(range(1, longest + 1)),
            series,
        ),
        detail=per_case,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="run length per case")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--drain", type=float, default=120.0, help="wait for reports after")
    report.add_convention_arguments(parser)
    args = parser.parse_args()
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = set(cases) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    data = run(args.smoke, seconds=args.seconds, cases=cases, drain=args.drain)
    report.write_json(data, args.json)


if __name__ == "__main__":
    main()
