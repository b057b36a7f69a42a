"""What a positive study's result objects cost, and what building them in processes gives.

    .venv/bin/python benchmarks/result_objects.py [--studies 20] [--smoke] [--json PATH]

The study: pydicom-data's chest PA CR ``RG1_UNCR`` (1955 x 1841), analysed by the demo model
``cxr_screen`` through the real pipeline (it marks three nodules on it), so the objects are the
ones a PACS gets by default (``[[peers]] objects = ["sr", "seg", "gsps"]``). Measured, each on
the same order:

- each object alone, built and written in this process (``server.result_objects.build`` with
  one slot): mean milliseconds over ``--studies`` builds;
- whole orders (SR, SEG, GSPS) from two threads at once, ``--studies`` orders: built in the
  threads themselves (``reports.workers = -1``, the baseline: one interpreter lock) against
  built by ``ResultBuilder`` with two report builder processes (the default on 2 cores).

Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # report.py, also when not run as a script

import report  # noqa: E402
from workload import sample_file  # noqa: E402

KINDS = ("sr", "seg", "gsps")


def _order(work: Path) -> Any:
    """The positive radiograph's order, its source file copied into ``work``."""
    import shutil

    import pydicom

    from nidaan.core.config import InferenceConfig
    from nidaan.pacs_bridge.lesions import group_findings
    from nidaan.pacs_bridge.reports import report_key, study_attributes
    from nidaan.server.backends import create_backend
    from nidaan.server.model_repository import load_repository
    from nidaan.server.pipeline import Pipeline
    from nidaan.server.result_objects import ObjectOrder, slot

    source = work / "source.dcm"
    shutil.copyfile(sample_file("RG1_UNCR.dcm"), source)
    models = load_repository(ROOT / "models")
    pipeline = Pipeline(models, create_backend(InferenceConfig(), models))
    try:
        header = pydicom.dcmread(source, stop_before_pixels=True)
        analyses = pipeline.analyse([header], load_pixels=lambda ds: pydicom.dcmread(source))
    finally:
        pipeline.backend.close()
        pipeline.close()
    findings = group_findings(analyses)
    uid = str(header.SOPInstanceUID)
    (work / "reports").mkdir()
    return ObjectOrder(
        study_uid=str(header.StudyInstanceUID),
        analyses=analyses,
        findings=findings,
        key=report_key(analyses, [uid]),
        sources={uid: source},
        study_attributes=study_attributes([header]),
        reports_dir=work / "reports",
        device_uid="2.25.1",
        series_number=9901,
        institution_name="",
        slots=tuple(slot(k, "") for k in KINDS),
    )


def _orders_per_s(build: Any, order: Any, n: int, threads: int = 2) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for built in pool.map(lambda _: build(order), range(n)):
            assert built.objects[("sr", "")], "no SR"
    return n / (time.perf_counter() - started)


def run(smoke: bool = False, studies: int = 20) -> dict[str, Any]:
    """Measure; the benchmark convention's dict (benchmarks/README.md)."""
    from nidaan.server.result_objects import ResultBuilder, build

    if smoke:
        studies = 2
    command = (
        ".venv/bin/python benchmarks/result_objects.py --smoke"
        if smoke
        else f".venv/bin/python benchmarks/result_objects.py --studies {studies}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        order = _order(Path(tmp))
        drawn = sum(len(f.parts) for f in order.findings if f.present)
        print(f"{drawn} region(s) on the radiograph", flush=True)
        build(order)  # imports, the version lookup
        each: dict[str, float] = {}
        for kind in KINDS:
            one = dataclasses.replace(order, slots=((kind, ""),))
            times = []
            for _ in range(studies):
                started = time.perf_counter()
                if kind == "sr":
                    build(one)
                else:  # the English SR is always in an order: time it out
                    built = build(one)
                    assert built.objects[(kind, "")], f"no {kind}"
                times.append(time.perf_counter() - started)
            each[kind] = statistics.mean(times) * 1000
        each["seg"] -= each["sr"]
        each["gsps"] -= each["sr"]
        for kind, ms in each.items():
            print(f"{kind.upper()}: {ms:.1f} ms built and written in process", flush=True)
        in_threads = _orders_per_s(build, order, studies)
        builder = ResultBuilder(workers=2)
        try:
            builder.start()
            builder.build(order)  # each worker's first import of the study's modules
            in_processes = _orders_per_s(builder.build, order, studies)
        finally:
            builder.close()
    print(
        f"whole orders from 2 threads: {in_threads:.2f}/s in the threads, "
        f"{in_processes:.2f}/s with 2 report builder processes "
        f"({in_processes / in_threads:.2f}x)",
        flush=True,
    )
    rows = [
        report.row(f"{k.upper()} of the positive radiograph, built and written", v, "ms")
        for k, v in each.items()
    ]
    rows.append(
        report.row(
            "orders (SR, SEG, GSPS) from 2 threads, 2 report builder processes",
            in_processes,
            "orders/s",
            baseline="built in the 2 threads (one interpreter lock)",
            baseline_value=in_threads,
        )
    )
    return report.result(
        "result_objects",
        "A positive chest radiograph's result objects: each one's cost, and building them in "
        "processes",
        command,
        rows,
        report.plot_spec(
            "bar",
            "orders/s from 2 threads",
            "",
            "orders/s",
            ["in the threads", "2 builder processes"],
            {"orders/s": [round(in_threads, 2), round(in_processes, 2)]},
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = run(smoke=args.smoke, studies=args.studies)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
