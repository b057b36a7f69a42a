"""benchmarks/triton.py runs in its smoke mode (seconds): it sets up perf_analyzer itself, drives
the same tritonserver with it and with Nidaan's Triton backend at concurrency 1, 4 and 16, and
writes the benchmark convention's dict. Timings are never asserted, only that each was measured
and that the ratio and the verdict follow from them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_triton_benchmark_smoke_measures_both_clients_at_each_concurrency(
    tmp_path: Path,
) -> None:
    out = tmp_path / "triton.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # the first run downloads the tritonclient 2.51.0 wheel for perf_analyzer
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["name"] == "triton"
    assert "benchmarks/triton.py" in result["command"] and "--smoke" in result["command"]
    rates = [r for r in result["rows"] if r["unit"] == "inferences/s"]
    assert [r["figure"].split("concurrency ")[1].split(",")[0] for r in rates] == ["1", "4", "16"]
    for row in rates:
        assert row["value"] > 0 and row["baseline_value"] > 0, row  # both clients measured
        assert row["baseline"].startswith("perf_analyzer 2.51.0"), row
        assert abs(row["ratio"] - row["value"] / row["baseline_value"]) < 0.01, row
        assert row["target"] == ">= 0.9x"
        assert row["met"] == (row["ratio"] >= 0.9), row
        assert (row["why"] is None) == row["met"], row  # a missed target says why
    batches = [r for r in result["rows"] if r["figure"].startswith("mean batch")]
    assert len(batches) == 3 and all(r["value"] >= 1 and r["baseline_value"] >= 1 for r in batches)
    plot = result["plot"]
    assert plot["x"] == [1, 4, 16]
    assert plot["series"]["perf_analyzer"] == [r["baseline_value"] for r in rates]
    assert plot["series"]["Nidaan TritonBackend"] == [r["value"] for r in rates]
    for c in (1, 4, 16):
        assert f"concurrency {c:2d}: perf_analyzer" in run.stdout
