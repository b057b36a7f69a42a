"""Local validation: how a model performs on a site's own labelled images (``nidaan validate``).

WHO's guidance for computer-aided detection asks each site to check a model on its own
population and choose its own operating threshold. This runs one model over a labelled local
set (DICOM files or folders; a CSV of labels per SOP Instance UID or Study Instance UID, one
column per finding, any further columns as subgroups such as age band, sex, device or view) and
writes ``validation.json`` and ``validation.html`` (with PNG plots) to an output folder:

- the ROC curve and its AUC, with a 95 % stratified bootstrap interval;
- sensitivity and specificity at the threshold in force (the site's, ``models.thresholds``, or
  the sidecar's), with 95 % Wilson intervals, and the confusion matrix;
- the highest threshold that reaches a target sensitivity (default 0.90) on this set, and the
  specificity it gives;
- a calibration plot and the Brier score;
- the same per subgroup; and the cases that failed (unreadable, no label, model not applicable).

Statistics come from scikit-learn (``roc_curve``, ``roc_auc_score``, ``brier_score_loss``,
``calibration_curve``, ``confusion_matrix``) and SciPy (``binomtest(...).proportion_ci``); plots
from matplotlib. A set with too few positives or negatives for its intervals to mean anything
is said to be so, in both files and on the command line. Nothing here changes a threshold:
adopting one is an explicit config change (docs/governance.md).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from nidaan.core.config import Config
from nidaan.core.errors import InputError, NidaanError

from .backends import create_backend
from .model_repository import ModelSpec, load_repository
from .pipeline import Pipeline

#: Fewer positives or negatives than this and the intervals are too wide to act on.
MIN_PER_CLASS = 30
#: Bootstrap resamples for the AUC's interval.
BOOTSTRAP_RESAMPLES = 2000
_TRUE = {"1", "true", "yes", "y", "present", "positive", "pos"}
_FALSE = {"0", "false", "no", "n", "absent", "negative", "neg"}
_ID_COLUMNS = {
    "sop_instance_uid": "SOPInstanceUID",
    "sopinstanceuid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "studyinstanceuid": "StudyInstanceUID",
}


class LabelsError(InputError):
    """The labels file cannot be used (no UID column, no finding of the model, bad value)."""


@dataclass
class Labels:
    """A labels CSV: the UID it is keyed by, and per UID each finding's truth and subgroups."""

    level: str  # "SOPInstanceUID" or "StudyInstanceUID"
    findings: list[str]
    subgroups: list[str]
    truth: dict[str, dict[str, int | None]] = field(default_factory=dict)
    groups: dict[str, dict[str, str]] = field(default_factory=dict)


def read_labels(path: Path, model: ModelSpec) -> Labels:
    """Read a labels CSV for ``model``: one UID column (``sop_instance_uid`` or
    ``study_instance_uid``), a column per finding of the model (1/0, yes/no, present/absent;
    empty: not labelled), and any other columns as subgroups."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError(f"labels file {path}: {exc.strerror}") from exc
    rows = list(csv.DictReader(io.StringIO(text)))
    columns = [c.strip() for c in (csv.DictReader(io.StringIO(text)).fieldnames or [])]
    ids = [c for c in columns if c.lower() in _ID_COLUMNS]
    if len(ids) != 1:
        raise LabelsError(
            f"labels file {path}: needs exactly one UID column, sop_instance_uid or "
            f"study_instance_uid (has {', '.join(columns) or 'no columns'})"
        )
    id_column = ids[0]
    labels = {f.label for f in model.findings}
    findings = [c for c in columns if c in labels]
    if not findings:
        raise LabelsError(
            f"labels file {path}: no column names a finding of {model.name} "
            f"({', '.join(sorted(labels))})"
        )
    subgroups = [c for c in columns if c != id_column and c not in labels]
    out = Labels(_ID_COLUMNS[id_column.lower()], findings, subgroups)
    for n, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        uid = row.get(id_column, "")
        if not uid:
            continue
        if uid in out.truth:
            raise LabelsError(f"labels file {path} line {n}: {uid} is labelled twice")
        truth: dict[str, int | None] = {}
        for f in findings:
            value = row.get(f, "").lower()
            if value in _TRUE:
                truth[f] = 1
            elif value in _FALSE:
                truth[f] = 0
            elif value == "":
                truth[f] = None
            else:
                raise LabelsError(
                    f"labels file {path} line {n}: {f} = {row.get(f)!r} is not 1/0, yes/no or "
                    "present/absent"
                )
        out.truth[uid] = truth
        out.groups[uid] = {g: row.get(g, "") for g in subgroups}
    if not out.truth:
        raise LabelsError(f"labels file {path}: no labelled rows")
    return out


def files_under(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and every file under folders named, in order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            out.append(p)
    return out


# --- statistics ------------------------------------------------------------------------------


def wilson(successes: int, trials: int) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a proportion (SciPy); None without trials."""
    from scipy.stats import binomtest

    if trials == 0:
        return None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def bootstrap_auc(
    y: np.ndarray, p: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of the AUC over stratified bootstrap resamples (positives and
    negatives resampled separately, so every resample has both)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = np.empty(resamples)
    for i in range(resamples):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        aucs[i] = roc_auc_score(y[idx], p[idx])
    low, high = np.percentile(aucs, [2.5, 97.5])
    return (float(low), float(high))


def _rate(k: int, n: int) -> dict[str, Any]:
    ci = wilson(k, n)
    return {
        "value": None if n == 0 else k / n,
        "successes": k,
        "trials": n,
        "ci95": None if ci is None else list(ci),
    }


def evaluate(
    y: Sequence[int],
    p: Sequence[float],
    threshold: float,
    target_sensitivity: float = 0.90,
    *,
    min_per_class: int = MIN_PER_CLASS,
    resamples: int = BOOTSTRAP_RESAMPLES,
    curves: bool = True,
) -> dict[str, Any]:
    """Every figure for one finding: labels ``y`` (0/1), probabilities ``p``, the threshold in
    force. ``curves`` keeps the ROC and calibration points (for the plots)."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

    ya, pa = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    n_pos, n_neg = int((ya == 1).sum()), int((ya == 0).sum())
    out: dict[str, Any] = {"cases": int(ya.size), "positives": n_pos, "negatives": n_neg}
    warnings = []
    if n_pos < min_per_class or n_neg < min_per_class:
        warnings.append(
            f"too small to rely on: {n_pos} positive and {n_neg} negative cases (at least "
            f"{min_per_class} of each are needed before the intervals below mean anything; "
            "the sensitivity interval with 30 positives is still about +/- 0.1)"
        )
    out["warnings"] = warnings
    out["too_small"] = bool(warnings)
    predicted = (pa >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(ya, predicted, labels=[0, 1]).ravel())
    out["threshold"] = threshold
    out["confusion_matrix"] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    out["sensitivity"] = _rate(tp, tp + fn)
    out["specificity"] = _rate(tn, tn + fp)
    out["brier_score"] = float(brier_score_loss(ya, pa)) if ya.size else None
    if n_pos == 0 or n_neg == 0:
        out["auc"] = None
        out["auc_ci95"] = None
        out["target"] = None
        warnings.append("no AUC: the set needs both positive and negative cases")
        return out
    out["auc"] = float(roc_auc_score(ya, pa))
    out["auc_ci95"] = list(bootstrap_auc(ya, pa, resamples))
    fpr, tpr, thresholds = roc_curve(ya, pa, drop_intermediate=False)
    # roc_curve's thresholds fall; the first point reaching the target is the highest threshold
    # that meets it (thresholds[0] is +inf: nothing called positive).
    meets = np.flatnonzero(tpr >= target_sensitivity)
    i = int(meets[0])
    chosen = float(min(thresholds[i], 1.0))
    called = pa >= chosen
    out["target"] = {
        "sensitivity_target": target_sensitivity,
        "threshold": chosen,
        "sensitivity": _rate(int((called & (ya == 1)).sum()), n_pos),
        "specificity": _rate(int((~called & (ya == 0)).sum()), n_neg),
    }
    if curves:
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
        bins = max(2, min(10, int(ya.size) // 10))
        prob_true, prob_pred = calibration_curve(ya, pa, n_bins=bins, strategy="quantile")
        out["calibration"] = {"predicted": prob_pred.tolist(), "observed": prob_true.tolist()}
    return out


# --- running the model -----------------------------------------------------------------------


@dataclass
class Case:
    """One labelled unit (an image or a study): its probabilities per finding."""

    uid: str
    files: list[str] = field(default_factory=list)
    probabilities: dict[str, float] = field(default_factory=dict)


def _analyse_files(
    pipeline: Pipeline,
    model: ModelSpec,
    files: list[Path],
    labels: Labels,
    workers: int,
    progress: bool,
) -> tuple[dict[str, Case], list[dict[str, str]]]:
    """Run the model over ``files``; a study's probability is its images' highest (as its
    report states it). Returns the cases by UID and the failures."""
    from tqdm import tqdm

    def one(path: Path) -> tuple[str, str, dict[str, float]] | dict[str, str]:
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            return {"file": str(path), "reason": f"not a readable DICOM file: {exc}"}
        uid = str(ds.get(labels.level, ""))
        if uid not in labels.truth:
            return {"file": str(path), "uid": uid, "reason": f"no label for its {labels.level}"}
        if not pipeline.models_for(ds):
            return {"file": str(path), "uid": uid, "reason": f"{model.name} does not apply"}
        try:
            analyses = pipeline.analyse([ds])
        except NidaanError as exc:
            return {"file": str(path), "uid": uid, "reason": str(exc)}
        probs = {f.label: f.probability for a in analyses for f in a.findings}
        return (uid, str(path), probs)

    cases: dict[str, Case] = {}
    failures: list[dict[str, str]] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        outcomes = pool.map(one, files)
        for _ in tqdm(files, desc=f"validating {model.name}", unit="file", disable=not progress):
            got = next(outcomes)
            if isinstance(got, dict):
                failures.append(got)
                continue
            uid, path, probs = got
            case = cases.setdefault(uid, Case(uid))
            case.files.append(path)
            for label, prob in probs.items():
                case.probabilities[label] = max(prob, case.probabilities.get(label, 0.0))
    for uid in sorted(set(labels.truth) - set(cases)):
        failures.append({"uid": uid, "reason": "labelled, but no file of it was analysed"})
    return cases, failures


def validate(
    cfg: Config,
    model_name: str,
    labels_path: Path,
    paths: Sequence[str | Path],
    out_dir: Path,
    *,
    target_sensitivity: float = 0.90,
    min_per_class: int = MIN_PER_CLASS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``model_name`` over ``paths``, compare with ``labels_path``, write the report to
    ``out_dir`` (validation.json, validation.html, plots) and return what the JSON holds."""
    if not 0.0 < target_sensitivity < 1.0:
        raise InputError(f"target sensitivity {target_sensitivity} is outside (0, 1)")
    models = load_repository(cfg.models.repository, thresholds=cfg.models.thresholds)
    model = next((m for m in models if m.name == model_name), None)
    if model is None:
        raise InputError(
            f"no model {model_name!r} in {cfg.models.repository} "
            f"(models: {', '.join(m.name for m in models)})"
        )
    labels = read_labels(Path(labels_path), model)
    files = files_under(paths)
    pipeline = Pipeline(
        [model], create_backend(cfg.inference, [model]), kernel_backend=cfg.kernels.backend
    )
    try:
        cases, failures = _analyse_files(
            pipeline, model, files, labels, cfg.inference.workers, progress
        )
    finally:
        pipeline.close()
        pipeline.backend.close()

    specs = {f.label: f for f in model.findings}
    result: dict[str, Any] = {
        "model": model.name,
        "version": model.version,
        "sha256": model.algorithm.digest,
        "not_for_diagnosis": model.algorithm.not_for_diagnosis,
        "labels": str(labels_path),
        "labelled_by": labels.level,
        "files": len(files),
        "cases": len(cases),
        "target_sensitivity": target_sensitivity,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "findings": {},
        "failures": failures,
    }
    for label in labels.findings:
        spec = specs[label]
        pairs = [
            (t, c.probabilities[label])
            for uid, c in cases.items()
            if (t := labels.truth[uid][label]) is not None and label in c.probabilities
        ]
        y = [t for t, _ in pairs]
        p = [q for _, q in pairs]
        stats = evaluate(y, p, spec.threshold, target_sensitivity, min_per_class=min_per_class)
        stats["sidecar_threshold"] = spec.sidecar_threshold or spec.threshold
        stats["subgroups"] = {}
        for column in labels.subgroups:
            values: dict[str, tuple[list[int], list[float]]] = {}
            for uid, c in cases.items():
                t = labels.truth[uid][label]
                if t is None or label not in c.probabilities:
                    continue
                ys, ps = values.setdefault(labels.groups[uid][column] or "(blank)", ([], []))
                ys.append(t)
                ps.append(c.probabilities[label])
            stats["subgroups"][column] = {
                value: evaluate(
                    ys,
                    ps,
                    spec.threshold,
                    target_sensitivity,
                    min_per_class=min_per_class,
                    resamples=500,
                    curves=False,
                )
                for value, (ys, ps) in sorted(values.items())
            }
        result["findings"][label] = stats
        for w in stats["warnings"]:
            log(f"{model.name} {label}: {w}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "validation.html").write_text(_html(result, model))
    return result


# --- the HTML report -------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(label: str, stats: dict[str, Any]) -> str:
    if "roc" not in stats:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 4))
    roc, cal = fig.subplots(1, 2)
    lo, hi = stats["auc_ci95"]
    roc.plot(stats["roc"]["fpr"], stats["roc"]["tpr"], lw=2)
    roc.plot([0, 1], [0, 1], ls=":", c="grey")
    spec = stats["specificity"]["value"]
    sens = stats["sensitivity"]["value"]
    if spec is not None and sens is not None:
        roc.plot([1 - spec], [sens], "o", c="C3", label=f"threshold {stats['threshold']:g}")
    target = stats["target"]
    if target:
        roc.plot(
            [1 - target["specificity"]["value"]],
            [target["sensitivity"]["value"]],
            "s",
            c="C2",
            label=f"sensitivity target: {target['threshold']:.4g}",
        )
    roc.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=f"{label}: ROC, AUC {stats['auc']:.3f} ({lo:.3f}-{hi:.3f})",
    )
    roc.legend(loc="lower right", fontsize=8)
    cal.plot(stats["calibration"]["predicted"], stats["calibration"]["observed"], "o-")
    cal.plot([0, 1], [0, 1], ls=":", c="grey")
    cal.set(
        xlabel="predicted probability",
        ylabel="observed fraction positive",
        title=f"calibration, Brier {stats['brier_score']:.3f}",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    alt = f"ROC and calibration of {html.escape(label)}"
    return f'<img alt="{alt}" src="data:image/png;base64,{_png(fig)}">'


def _fmt_rate(r: dict[str, Any] | None) -> str:
    if not r or r["value"] is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{r['value']:.3f} ({lo:.3f}-{hi:.3f}; {r['successes']}/{r['trials']})"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _html(result: dict[str, Any], model: ModelSpec) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Local validation of {e(model.name)} {e(model.version)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #aaa;padding:2px 6px}"
        ".warn{background:#fde2e2;padding:6px;border:1px solid #c33}</style></head><body>",
        f"<h1>Local validation: {e(model.display_name)} ({e(model.name)} {e(model.version)})</h1>",
        f"<p>Model file SHA-256 <code>{e(result['sha256'])}</code>. Labels {e(result['labels'])} "
        f"(by {e(result['labelled_by'])}); {result['files']} files, {result['cases']} cases "
        f"analysed, {len(result['failures'])} failed. Created {e(result['created'])}.</p>",
    ]
    if result["not_for_diagnosis"]:
        parts.append(
            "<p class='warn'>This model was trained on synthetic data: NOT FOR DIAGNOSIS.</p>"
        )
    for label, s in result["findings"].items():
        parts.append(f"<h2>{e(label)}</h2>")
        parts.extend(f"<p class='warn'>{e(w)}</p>" for w in s["warnings"])
        cm = s["confusion_matrix"]
        target = s["target"]
        rows = [
            ("cases (positive / negative)", f"{s['cases']} ({s['positives']} / {s['negatives']})"),
            (
                "AUC (95% bootstrap interval)",
                "-"
                if s["auc"] is None
                else f"{s['auc']:.3f} ({s['auc_ci95'][0]:.3f}-{s['auc_ci95'][1]:.3f})",
            ),
            (
                "threshold in force (sidecar's)",
                f"{s['threshold']:g} ({s['sidecar_threshold']:g})",
            ),
            ("sensitivity at it (95% Wilson)", _fmt_rate(s["sensitivity"])),
            ("specificity at it (95% Wilson)", _fmt_rate(s["specificity"])),
            ("Brier score", _fmt(s["brier_score"])),
        ]
        if target:
            rows += [
                (
                    f"threshold for sensitivity {target['sensitivity_target']:g}",
                    f"{target['threshold']:.4g}",
                ),
                ("its sensitivity", _fmt_rate(target["sensitivity"])),
                ("its specificity", _fmt_rate(target["specificity"])),
            ]
        parts.append("<table>")
        parts.extend(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
        parts.append("</table>")
        parts.append(
            "<h3>Confusion matrix at the threshold in force</h3><table>"
            "<tr><th></th><th>labelled positive</th><th>labelled negative</th></tr>"
            f"<tr><th>called present</th><td>{cm['tp']}</td><td>{cm['fp']}</td></tr>"
            f"<tr><th>called absent</th><td>{cm['fn']}</td><td>{cm['tn']}</td></tr></table>"
        )
        parts.append(_plots(label, s))
        for column, groups in s["subgroups"].items():
            parts.append(
                f"<h3>By {e(column)}</h3><table><tr><th>{e(column)}</th><th>cases (+/-)</th>"
                "<th>AUC (95%)</th><th>sensitivity</th><th>specificity</th><th></th></tr>"
            )
            for value, g in groups.items():
                auc = (
                    "-"
                    if g["auc"] is None
                    else f"{g['auc']:.3f} ({g['auc_ci95'][0]:.3f}-{g['auc_ci95'][1]:.3f})"
                )
                parts.append(
                    f"<tr><td>{e(value)}</td><td>{g['cases']} ({g['positives']}/"
                    f"{g['negatives']})</td><td>{e(auc)}</td>"
                    f"<td>{e(_fmt_rate(g['sensitivity']))}</td>"
                    f"<td>{e(_fmt_rate(g['specificity']))}</td>"
                    f"<td>{'too small' if g['too_small'] else ''}</td></tr>"
                )
            parts.append("</table>")
    parts.append(f"<h2>Failed cases ({len(result['failures'])})</h2><ul>")
    parts.extend(
        f"<li>{e(f.get('file') or f.get('uid', ''))}: {e(f['reason'])}</li>"
        for f in result["failures"]
    )
    parts.append("</ul></body></html>\n")
    return "\n".join(parts)
