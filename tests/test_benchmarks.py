"""The preprocessing benchmark runs (``--quick``: a few images, a few pairs) and prints its roofline
checks and a fraction of the roofline for every path, so the benchmark itself does not rot; and
``benchmarks/run_all.py --smoke`` runs every benchmark and leaves a JSON result and a PNG for
each. Timings are printed, never asserted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PATHS = ("common", "padding", "SIGMOID", "CT", "non-integer factor")

#: The keys of a result row (the convention in benchmarks/README.md).
ROW_KEYS = (
    "figure",
    "value",
    "unit",
    "baseline",
    "baseline_value",
    "ratio",
    "target",
    "met",
    "why",
)

#: Benchmarks whose run() exists now; the others may be "not adapted" yet.
ADAPTED = (
    "preprocess",
    "inference",
    "batching",
    "end_to_end",
    "turnaround",
    "result_objects",
    "locust_dicom",
    "soak",
)


def test_preprocess_benchmark_quick_prints_every_fraction() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "preprocess.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,  # mostly compiling the kernels when Numba's cache is cold
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert re.search(r"roofline: every 64-byte line read.* [\d.]+ GB/s", out), out
    assert re.search(r"check: every word ORed.* [\d.]+ GB/s", out), out
    assert re.search(r"check: NumPy max over uint64 words.* [\d.]+ GB/s", out), out
    for name in PATHS:
        line = re.search(rf"^  {re.escape(name)}: .*$", out, re.MULTILINE)
        assert line, f"no line for the {name} path:\n{out}"
        assert re.search(r"[\d.]+ GB/s = [\d.]+% of the roofline", line.group(0)), line.group(0)


def test_run_all_smoke_writes_json_and_png_for_every_benchmark(tmp_path: Path) -> None:
    """``run_all.py --smoke`` runs every benchmark in its list (each in seconds), and each one
    that has ``run()`` leaves a result with rows and a PNG; the READMEs are left alone."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run_all import BENCHMARKS

    readmes = {p: p.read_text() for p in (ROOT / "README.md", ROOT / "benchmarks" / "README.md")}
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke"]
        + ["--results", str(results), "--no-readme"],
        capture_output=True,
        text=True,
        timeout=1800,  # mostly starting servers and compiling kernels when Numba's cache is cold
        cwd=ROOT,
    )
    out = run.stdout[-6000:] + run.stderr[-3000:]
    failed = {
        p.stem: json.loads(p.read_text()).get("error")
        for p in results.glob("*.json")
        if json.loads(p.read_text()).get("status") == "failed"
    }
    assert run.returncode == 0 and not failed, f"failed: {failed}\n{out}"
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        assert path.is_file(), f"no result for {name}:\n{out}"
        data = json.loads(path.read_text())
        assert data["name"] == name
        assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1, data["machine"]
        assert data["status"] in ("ok", "not adapted", "missing"), (name, data.get("error"))
        if data["status"] != "ok":
            assert not (results / f"{name}.png").exists()
            continue
        assert data["rows"], f"{name} reported no figures"
        for row in data["rows"]:
            assert set(ROW_KEYS) <= set(row), (name, row)
        assert data["command"].endswith("--smoke"), data["command"]
        assert data["plot"]["kind"] in ("bar", "line") and data["plot"]["x"], (name, data["plot"])
        assert (results / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The benchmarks this project adapted to the convention must have run, not been skipped.
    for name in ADAPTED:
        assert json.loads((results / f"{name}.json").read_text())["status"] == "ok", name
    # The soak's 20 s: every study of the mix (radiographs, JPEG 2000, CT) went in and came
    # back as an SR at the PACS.
    soak = {
        r["figure"]: r["value"] for r in json.loads((results / "soak.json").read_text())["rows"]
    }
    assert soak["studies sent"] >= 30, soak
    assert soak["C-STORE refused or failed"] == 0, soak
    assert soak["studies acknowledged without an SR at the PACS"] == 0, soak
    for path, text in readmes.items():
        assert path.read_text() == text, f"{path} was rewritten by a --no-readme run"


def test_state_commit_benchmark_reports_each_thread_count(tmp_path: Path) -> None:
    """benchmarks/state_commit.py runs (a few instances per thread) and prints a row for 1, 2,
    4 and 8 threads (one thread commits once per instance, by construction of the measure),
    then the cap check's cost for each study size."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "state_commit.py"), "--instances", "20"]
        + ["--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = run.stdout.splitlines()
    rows = [line.split() for line in lines[1:5]]
    assert [r[0] for r in rows] == ["1", "2", "4", "8"], run.stdout
    assert rows[0][2] == "1.00" and rows[0][3] == "1.00x"
    assert all(float(r[1]) > 0 and 0 < float(r[2]) <= 1 for r in rows)
    cap = [line.split() for line in lines[7:]]  # the per-study cap's check, by study size
    assert [r[0] for r in cap] == ["300", "3000", "10000"], run.stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in cap)
    assert list(tmp_path.iterdir()) == []  # its databases are removed
