"""Helpers every benchmark shares: the result dict, its rows, ``--json``/``--smoke`` handling, the
machine a run happened on, a PNG per result and the README tables (used by ``run_all.py``).

A result is the dict of the benchmark convention (benchmarks/README.md)::

    {"name", "title", "command", "rows": [{"figure", "value", "unit", "baseline",
     "baseline_value", "ratio", "target", "met", "why"}], "plot": {"kind", "title", "xlabel",
     "ylabel", "x", "series"}}

``run_all.py`` adds ``status`` ("ok", "failed", "not adapted", "missing"), ``error``, ``smoke``,
``machine`` and ``seconds``. Nothing here measures anything.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import operator
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


def met_target(value: float | None, target: str | None) -> bool | None:
    """Whether ``value`` meets ``target`` (">= 0.9x", "<= 1 s", "<= 2"): the target's first
    number, compared with the operator it starts with; None when either is missing."""
    if value is None or target is None or (isinstance(value, float) and math.isnan(value)):
        return None
    match = re.match(r"\s*(>=|<=|>|<)\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", target)
    if match is None:
        return None
    return _COMPARE[match.group(1)](value, float(match.group(2)))


def row(
    figure: str,
    value: float | None,
    unit: str,
    *,
    baseline: str | None = None,
    baseline_value: float | None = None,
    ratio: float | None = None,
    target: str | None = None,
    on: str = "value",
    why: str | None = None,
) -> dict[str, Any]:
    """One row of a result. ``ratio`` defaults to value / baseline_value; ``target`` is checked
    against the ``value`` or the ``ratio`` (``on``); ``why`` is kept only when the target is
    missed (it says why, as the README table will)."""
    if ratio is None and baseline_value and value is not None:
        ratio = value / baseline_value
    met = met_target(ratio if on == "ratio" else value, target)
    return {
        "figure": figure,
        "value": _number(value),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": _number(baseline_value),
        "ratio": _number(ratio),
        "target": target,
        "met": met,
        "why": why if met is False else None,
    }


def _number(x: float | None) -> float | None:
    """A JSON-safe float (NaN and infinities become None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def result(
    name: str,
    title: str,
    command: str,
    rows: list[dict[str, Any]],
    plot: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The convention's dict; ``extra`` keys (raw samples, notes) are kept beside it."""
    return {"name": name, "title": title, "command": command, "rows": rows, "plot": plot, **extra}


def plot_spec(
    kind: str,
    title: str,
    xlabel: str,
    ylabel: str,
    x: Sequence[Any],
    series: dict[str, Sequence[float | None]],
) -> dict[str, Any]:
    """The ``plot`` entry of a result: a bar chart or a line chart of ``series`` over ``x``."""
    return {
        "kind": kind,
        "title": title,
        "xlabel": xlabel,
        "ylabel": ylabel,
        "x": list(x),
        "series": {k: [_number(v) for v in vals] for k, vals in series.items()},
    }


def command_line(script: str, smoke: bool, *args: str) -> str:
    """The command that reproduces a run, as the README shows it."""
    parts = [".venv/bin/python", f"benchmarks/{script}", *args]
    if smoke:
        parts.append("--smoke")
    return " ".join(parts)


def add_convention_arguments(parser: argparse.ArgumentParser) -> None:
    """``--smoke`` and ``--json PATH``, which every benchmark's ``__main__`` takes."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: runs in seconds")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the result dict here")


def write_json(data: dict[str, Any], path: Path | None) -> None:
    """Write ``data`` to ``path`` (when given) as indented JSON."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def print_rows(data: dict[str, Any]) -> None:
    """The rows as one human-readable line each (what ``__main__`` prints after its own lines)."""
    print(f"== {data['title']}")
    for r in data["rows"]:
        print(f"  {format_row(r)}")


def format_value(value: float | None, unit: str = "") -> str:
    """A figure with sensible precision and its unit."""
    if value is None:
        return "n/a"
    if float(value).is_integer() and unit in ("studies", "calls", "images", "instances", ""):
        return f"{int(value):,} {unit}".strip()  # a count
    digits = 3 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def format_row(r: dict[str, Any]) -> str:
    """``figure: value unit (ratio x baseline ...) target: met/MISSED (why)``."""
    text = f"{r['figure']}: {format_value(r['value'], r['unit'])}"
    if r.get("baseline"):
        base = format_value(r.get("baseline_value"), r["unit"])
        ratio = f"{r['ratio']:.2f}x " if r.get("ratio") is not None else ""
        text += f" ({ratio}vs {r['baseline']} {base})"
    if r.get("target"):
        verdict = {True: "met", False: "MISSED", None: "not judged"}[r.get("met")]
        text += f"; target {r['target']}: {verdict}"
        if r.get("why"):
            text += f" ({r['why']})"
    return text


# --- the machine ---------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What a run ran on: CPU model, cores, memory, GPU (or "none"), OS, Python, date."""
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    gpu = "none"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip():
                gpu = "; ".join(line.strip() for line in out.stdout.strip().splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict[str, Any], date: bool = True) -> str:
    """The machine as one sentence (with the run's date unless ``date`` is False)."""
    mem = f", {m['memory_gib']} GiB memory" if m.get("memory_gib") else ""
    text = (
        f"{m['cpu']}, {m['usable_cores']} usable cores of {m['cores']}{mem}, GPU: {m['gpu']}; "
        f"{m['os']}, Python {m['python']}"
    )
    return f"{text}; {m['date']}" if date else text


# --- plots ---------------------------------------------------------------------------------------


def plot_png(data: dict[str, Any], path: Path) -> None:
    """A PNG of the result's ``plot`` (matplotlib, headless Agg). A result without a usable plot
    gets a figure saying why, so every benchmark that ran has its PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = data.get("plot") or {}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    x = [str(v) for v in spec.get("x", [])]
    series = {
        k: [math.nan if v is None else v for v in vals]
        for k, vals in spec.get("series", {}).items()
    }
    if not x or not series:
        ax.text(0.5, 0.5, data.get("error") or "no plot data", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    elif spec.get("kind") == "line":
        for label, values in series.items():
            ax.plot(range(len(values)), values, marker=".", label=label)
        step = max(1, len(x) // 12)
        ax.set_xticks(range(0, len(x), step), x[::step])
    else:
        width = 0.8 / len(series)
        for k, (label, values) in enumerate(series.items()):
            offsets = [i - 0.4 + width * (k + 0.5) for i in range(len(values))]
            ax.bar(offsets, values, width, label=label)
        rotate = max(map(len, x)) > 12
        ax.set_xticks(
            range(len(x)), x, rotation=20 if rotate else 0, ha="right" if rotate else "center"
        )
    ax.set_title(spec.get("title") or data.get("title", data.get("name", "")), fontsize=10)
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""))
    if series and x:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- the README tables ---------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(results: list[dict[str, Any]]) -> str:
    """The Markdown table of every result's rows, the machine each ran on, and, for a missed
    target, why; benchmarks that failed or are not adapted are listed as such."""
    lines = []
    machines: dict[str, list[str]] = {}
    for r in results:
        if r.get("machine"):
            machines.setdefault(machine_line(r["machine"], date=False), []).append(
                r["machine"]["date"]
            )
    smoke = any(r.get("smoke") for r in results)
    lines.append("Generated by `.venv/bin/python benchmarks/run_all.py`; do not edit by hand.")
    if smoke:
        lines.append("")
        lines.append("**Smoke run: tiny sizes, the figures mean nothing.**")
    lines.append("")
    for m, dates in machines.items():
        when = min(dates) if min(dates) == max(dates) else f"{min(dates)} to {max(dates)}"
        lines.append(f"Machine: {m}; run {when}.")
    lines.append("")
    lines.append("| benchmark | figure | value | baseline | ratio | target | met |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        name = f"[`{r['name']}`](benchmarks/results/{r['name']}.png)"
        status = r.get("status", "ok")
        if status != "ok":
            lines.append(
                f"| `{r['name']}` | {_cell(status)}: {_cell(r.get('error', ''))[:300]} | | | | | |"
            )
            continue
        for k, x in enumerate(r["rows"]):
            verdict = {True: "yes", False: "**no**", None: ""}[x.get("met")]
            if x.get("why"):
                verdict += f": {_cell(x['why'])}"
            base = ""
            if x.get("baseline"):
                base = f"{_cell(x['baseline'])} {format_value(x.get('baseline_value'), x['unit'])}"
            ratio = f"{x['ratio']:.2f}x" if x.get("ratio") is not None else ""
            lines.append(
                f"| {name if k == 0 else ''} | {_cell(x['figure'])} | "
                f"{format_value(x['value'], x['unit'])} | {base} | {ratio} | "
                f"{_cell(x.get('target') or '')} | {verdict} |"
            )
    lines.append("")
    lines.append("What each measures, and the command that reproduces it:")
    lines.append("")
    for r in results:
        if r.get("command"):
            lines.append(f"- `{r['name']}`: {_cell(r.get('title', ''))}. `{r['command']}`")
    return "\n".join(lines)


def replace_between_markers(path: Path, text: str, link_prefix: str = "") -> bool:
    """Put ``text`` between the benchmark markers of ``path``; False when it has no markers.
    ``link_prefix`` rewrites the PNG links for a file outside the repository root."""
    content = path.read_text()
    if BEGIN not in content or END not in content:
        return False
    if link_prefix:
        text = text.replace("](benchmarks/results/", f"]({link_prefix}results/")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    return True


def main_of(run: Callable[..., dict[str, Any]], parser: argparse.ArgumentParser) -> None:
    """A benchmark's ``__main__`` for modules that print nothing of their own: run, print the
    rows, write ``--json``."""
    args = parser.parse_args()
    data = run(smoke=args.smoke)
    print_rows(data)
    write_json(data, args.json)
    sys.stdout.flush()
