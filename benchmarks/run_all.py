"""Every benchmark in one command: JSON and a PNG per benchmark, and the README's table.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/run_all.py                       # everything, full sizes
    .venv/bin/python benchmarks/run_all.py --smoke               # everything in seconds
    .venv/bin/python benchmarks/run_all.py --only turnaround,end_to_end
    .venv/bin/python benchmarks/run_all.py --smoke --results /tmp/r --no-readme

Each benchmark in ``BENCHMARKS`` is a module of benchmarks/ with ``run(smoke=False) -> dict``
(the convention in benchmarks/README.md). Each runs in a child process of its own, so that one
that fails, crashes or hangs (``--timeout``) is recorded as failed and the others still run, and
so that none inherits another's threads, memory or Numba state. A module without ``run()`` is
recorded as "not adapted", a module that does not exist as "missing".

Writes ``<results>/<name>.json`` (the result, plus ``status``, ``machine``, ``smoke``,
``seconds``), ``<results>/<name>.png`` (its plot) and ``<results>/<name>.log`` (what it printed),
then regenerates the table between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``
in README.md and benchmarks/README.md from every JSON in the results folder (so ``--only``
updates its rows and keeps the others). A smoke run never rewrites the READMEs: its figures
mean nothing. Exit status 1 when a benchmark failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import report  # noqa: E402

#: Every benchmark, in the order they run (the cheap and self-contained first).
BENCHMARKS = (
    "preprocess",
    "inference",
    "batching",
    "end_to_end",
    "ingest",
    "turnaround",
    "result_objects",
    "locust_dicom",
    "load",
    "grpc_memory",
    "triton",
    "soak",
)

RESULTS = BENCH / "results"

# Runs in the child: import the module, call run(), write its dict (or why there is none).
_CHILD = """
import importlib, json, sys
sys.path.insert(0, {bench!r})
name, smoke, out = {name!r}, {smoke!r}, {out!r}
try:
    module = importlib.import_module(name)
except ModuleNotFoundError as exc:
    if exc.name != name:
        raise
    data = {{"status": "missing", "error": "benchmarks/" + name + ".py does not exist"}}
else:
    run = getattr(module, "run", None)
    if run is None:
        data = {{"status": "not adapted",
                "error": "benchmarks/" + name + ".py has no run(smoke) -> dict yet"}}
    else:
        data = dict(run(smoke=smoke))
        data.setdefault("status", "ok")
with open(out, "w") as f:
    json.dump(data, f, default=str)
"""


def run_one(name: str, smoke: bool, results: Path, timeout: float) -> dict[str, Any]:
    """Run benchmark ``name`` in a child process; its result dict, or a record of its failure."""
    out = results / f"{name}.json.partial"
    out.unlink(missing_ok=True)
    log_path = results / f"{name}.log"
    code = _CHILD.format(bench=str(BENCH), name=name, smoke=smoke, out=str(out))
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    print(f"--- {name}{' (smoke)' if smoke else ''}", flush=True)
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-u", "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout stops its servers too
        )

        def relay() -> None:  # the child's lines as they come, to the log and the console
            assert child.stdout is not None
            for line in child.stdout:
                log.write(line)
                tail.append(line.rstrip())
                print(f"  {line.rstrip()}", flush=True)

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        timed_out = False
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(child.pid, signal.SIGKILL)  # the benchmark and the servers it started
            child.wait()
        reader.join(timeout=10)
    seconds = time.monotonic() - started
    data: dict[str, Any]
    if child.returncode == 0 and out.is_file():
        data = json.loads(out.read_text())
        out.unlink()
    else:
        why = f"timed out after {timeout:.0f} s" if timed_out else f"exit {child.returncode}"
        last = next((t for t in reversed(tail) if t.strip()), "")
        data = {"status": "failed", "error": f"{why}: {last}"[:500], "log_tail": list(tail)}
    data.setdefault("name", name)
    data.setdefault("title", name)
    data.setdefault("rows", [])
    data.update(smoke=smoke, seconds=round(seconds, 1), machine=report.machine())
    return data


def load_results(results: Path) -> list[dict[str, Any]]:
    """Every result in ``results``, in ``BENCHMARKS`` order (others after, by name)."""
    found = {}
    for path in sorted(results.glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    order = [n for n in BENCHMARKS if n in found] + sorted(set(found) - set(BENCHMARKS))
    return [found[n] for n in order]


def regenerate_readmes(results: Path) -> None:
    """The table from every result in ``results``, into README.md and benchmarks/README.md."""
    text = report.table(load_results(results))
    # benchmarks/README.md links the plots beside it, README.md from the repository root.
    for path, prefix in ((ROOT / "README.md", ""), (BENCH / "README.md", "./")):
        if not report.replace_between_markers(path, text, link_prefix=prefix):
            print(f"(no benchmark markers in {path}: not rewritten)")


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every benchmark at tiny sizes")
    parser.add_argument("--only", help="comma-separated names, e.g. turnaround,end_to_end")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where JSON/PNG go")
    parser.add_argument("--no-readme", action="store_true", help="leave the READMEs alone")
    parser.add_argument(
        "--timeout", type=float, help="seconds per benchmark (default 3600; smoke 600)"
    )
    args = parser.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.error(
                f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}"
            )
    timeout = args.timeout or (600.0 if args.smoke else 3600.0)
    args.results.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        data = run_one(name, args.smoke, args.results, timeout)
        report.write_json(data, args.results / f"{name}.json")
        if data["status"] == "ok":
            report.plot_png(data, args.results / f"{name}.png")
            report.print_rows(data)
        else:
            (args.results / f"{name}.png").unlink(missing_ok=True)  # no stale plot beside it
            print(f"== {name}: {data['status']}: {data.get('error', '')}")
            if data["status"] == "failed":
                failed.append(name)
    if args.smoke and not args.no_readme:
        print("(smoke run: the READMEs are not rewritten with smoke figures)")
    elif not args.no_readme:
        regenerate_readmes(args.results)
    print(f"results in {args.results}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
