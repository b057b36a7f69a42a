"""The preprocessing benchmark runs (``--quick``: a few images, a few pairs) and prints its roofline
checks and a fraction of the roofline for every path, so the benchmark itself does not rot.
Timings are printed, never asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PATHS = ("common", "padding", "SIGMOID", "CT", "non-integer factor")


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
