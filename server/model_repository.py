"""The model repository: a Triton model repository plus Nidaan's sidecar per model.

Layout of one model (adding a model is adding a folder; nothing about a model lives in Python)::

    models/<name>/config.pbtxt      Triton model configuration (protobuf text format)
    models/<name>/<version>/model.onnx
    models/<name>/labels.txt        one output label per line
    models/<name>/nidaan.toml       what Nidaan needs and Triton ignores (see models/README.md)
    models/<name>/MODEL_CARD.md

:func:`load_repository` reads and cross-checks all of it and raises :class:`ModelRepositoryError`
with a message that names the model, the file and the problem.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nidaan.core.errors import ModelRepositoryError
from nidaan.core.findings import AlgorithmInfo, CodedValue

_CODING_SCHEMES = {"SCT", "DCM", "RADLEX", "LN", "UMLS", "99NIDAAN"}


@dataclass(frozen=True)
class OutlineRule:
    """How a finding's heatmap blob is sharpened to the input's pixels (sidecar ``outline``).

    The lesion is the connected set of pixels of input channel ``channel``, in display values
    ([0, 1] after the VOI window, before ``mean``/``std``), above ``above`` that holds the blob's
    strongest point, within the blob's cells grown by one cell.
    """

    channel: int
    above: float


@dataclass(frozen=True)
class FindingSpec:
    """How one model output becomes a finding."""

    label: str
    index: int
    threshold: float
    code: CodedValue
    #: Every blob of heatmap cells >= this fraction of the peak is a region of the finding.
    region_fraction: float = 0.5
    #: Sharpen each region to the input's pixels (None: the heatmap cells' outline).
    outline: OutlineRule | None = None
    #: The sidecar's threshold when this site's config (``models.thresholds``) replaced it
    #: with ``threshold``; None when ``threshold`` is the sidecar's.
    sidecar_threshold: float | None = None
    #: The share of images with the finding in the model card's held-out set (sidecar
    #: ``expected_prevalence``); None when the sidecar does not say.
    expected_prevalence: float | None = None
    #: The share of those images the model called present at the sidecar's threshold (sidecar
    #: ``expected_present_rate``): what the status page compares the observed present-rate with.
    expected_present_rate: float | None = None


@dataclass(frozen=True)
class InputSpec:
    """The model input and how to preprocess an image into it."""

    name: str
    height: int
    width: int
    resize: str  # "letterbox" | "stretch"
    pad_value: float
    mean: float
    std: float
    #: One channel per (centre, width) VOI window; empty = one channel, the image's own VOI.
    windows: tuple[tuple[float, float], ...] = ()
    dtype: str = "float32"

    @property
    def channels(self) -> int:
        return max(1, len(self.windows))


@dataclass(frozen=True)
class Accepts:
    """Which images a model applies to; "" in a list means "attribute absent or empty"."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    views: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """Everything Nidaan knows about one model version."""

    name: str
    version: str
    display_name: str
    directory: Path
    onnx_path: Path
    algorithm: AlgorithmInfo
    accepts: Accepts
    input: InputSpec
    probabilities_output: str
    heatmap_output: str | None
    findings: tuple[FindingSpec, ...]
    labels: tuple[str, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    card: Path
    #: config.pbtxt has a dynamic_batching block (without one, Triton runs requests one by one).
    dynamic_batching: bool = True
    #: dynamic_batching.default_queue_policy.max_queue_size; 0 = not set.
    max_queue_size: int = 0
    #: instance_group counts summed: batches of this model that may run at once.
    instance_count: int = 1
    #: default_queue_policy.default_timeout_microseconds with timeout_action REJECT: a request
    #: queued longer is refused; 0 = no limit.
    queue_timeout_us: int = 0

    def accepts_image(self, modality: str, body_part: str, view: str) -> bool:
        """Whether this model applies to an image with these header values."""
        return (
            modality.upper() in self.accepts.modalities
            and body_part.upper() in self.accepts.body_parts
            and view.upper() in self.accepts.views
        )


def _fail(model: str, what: str) -> ModelRepositoryError:
    return ModelRepositoryError(f"model {model!r}: {what}")


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], model: str, where: str):
    if key not in table:
        raise _fail(model, f"nidaan.toml [{where}] lacks {key!r}")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(model, f"nidaan.toml [{where}].{key} has the wrong type: {value!r}")
    return value


def _rate(table: dict[str, Any], key: str, model: str, where: str) -> float | None:
    """An optional share in [0, 1] (the drift reference rates)."""
    if key not in table:
        return None
    value = _get(table, key, (int, float), model, where)
    if not 0 <= value <= 1:
        raise _fail(model, f"{where}.{key} {value} is outside [0, 1]")
    return float(value)


def _outline_rule(value: Any, channels: int, model: str, where: str) -> OutlineRule | None:
    """The ``outline = { channel, above }`` table of a ``[[findings]]`` entry, checked."""
    if value is None:
        return None
    where = f"{where}.outline"
    if not isinstance(value, dict):
        raise _fail(model, f"nidaan.toml {where} must be a table {{ channel, above }}")
    unknown = sorted(set(value) - {"channel", "above"})
    if unknown:
        raise _fail(model, f"nidaan.toml {where} has unknown keys {unknown}")
    channel = _get(value, "channel", int, model, where)
    above = float(_get(value, "above", (int, float), model, where))
    if not 0 <= channel < channels:
        raise _fail(model, f"{where}.channel {channel} is outside the input's {channels} channels")
    if not 0.0 <= above < 1.0:
        raise _fail(model, f"{where}.above {above} is outside the display range [0, 1)")
    return OutlineRule(channel, above)


def _load_config_pbtxt(path: Path, model: str) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise _fail(model, f"cannot read {path.name}: {exc.strerror}") from exc
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise _fail(model, f"config.pbtxt is not a valid Triton model config: {exc}") from exc


def _latest_version(directory: Path, model: str) -> tuple[str, Path]:
    versions = sorted(
        (int(p.name), p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()
    )
    if not versions:
        raise _fail(model, "no numbered version folder (expected <model>/1/model.onnx)")
    number, folder = versions[-1]
    onnx_path = folder / "model.onnx"
    if not onnx_path.is_file():
        raise _fail(model, f"version {number} has no model.onnx")
    return str(number), onnx_path


def _onnx_io(onnx_path: Path, model: str) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Input and output shapes as ONNX Runtime sees them (symbolic dims as strings)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise _fail(model, f"model.onnx does not load: {exc}") from exc
    return (
        {i.name: list(i.shape) for i in sess.get_inputs()},
        {o.name: list(o.shape) for o in sess.get_outputs()},
    )


def load_model(directory: Path, *, check_onnx: bool = True) -> ModelSpec:
    """Read one model folder and cross-check config.pbtxt, the sidecar, labels and the ONNX file."""
    model = directory.name
    config = _load_config_pbtxt(directory / "config.pbtxt", model)
    if config.name and config.name != model:
        raise _fail(model, f"config.pbtxt names the model {config.name!r}, not its folder name")
    if config.platform not in ("onnxruntime_onnx", "") and config.backend not in ("onnxruntime",):
        raise _fail(model, f"platform {config.platform!r} is not onnxruntime_onnx")
    sidecar_path = directory / "nidaan.toml"
    try:
        sidecar = tomllib.loads(sidecar_path.read_text())
    except OSError as exc:
        raise _fail(model, f"cannot read nidaan.toml: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _fail(model, f"nidaan.toml is not valid TOML: {exc}") from exc

    meta = sidecar.get("model", {})
    version_dir, onnx_path = _latest_version(directory, model)
    card = directory / str(meta.get("card", "MODEL_CARD.md"))
    if not card.is_file():
        raise _fail(model, f"model card {card.name} is missing (every model carries one)")
    labels_path = directory / "labels.txt"
    if not labels_path.is_file():
        raise _fail(model, "labels.txt is missing")
    labels = tuple(line.strip() for line in labels_path.read_text().splitlines() if line.strip())

    inp = sidecar.get("input", {})
    input_spec = InputSpec(
        name=_get(inp, "name", str, model, "input"),
        height=_get(inp, "height", int, model, "input"),
        width=_get(inp, "width", int, model, "input"),
        resize=inp.get("resize", "letterbox"),
        pad_value=float(inp.get("pad_value", 0.0)),
        mean=float(inp.get("mean", 0.0)),
        std=float(inp.get("std", 1.0)),
        windows=tuple((float(c), float(w)) for c, w in inp.get("windows", [])),
        dtype=str(inp.get("dtype", "float32")),
    )
    if input_spec.dtype not in ("float32", "float16"):
        raise _fail(model, f"input.dtype is {input_spec.dtype!r}; use float32 or float16")
    if any(w <= 0 for _, w in input_spec.windows):
        raise _fail(model, "input.windows has a window without width")
    if input_spec.resize not in ("letterbox", "stretch"):
        raise _fail(model, f"input.resize is {input_spec.resize!r}; use letterbox or stretch")
    if input_spec.std <= 0:
        raise _fail(model, "input.std must be positive")

    # The sidecar and config.pbtxt must agree on the input tensor (Triton serves config.pbtxt).
    cfg_inputs = {i.name: list(i.dims) for i in config.input}
    if input_spec.name not in cfg_inputs:
        raise _fail(model, f"config.pbtxt has no input named {input_spec.name!r}")
    expected_dims = [input_spec.channels, input_spec.height, input_spec.width]
    if cfg_inputs[input_spec.name] != expected_dims:
        raise _fail(
            model,
            f"input shape mismatch: config.pbtxt says {cfg_inputs[input_spec.name]}, "
            f"nidaan.toml says {expected_dims}",
        )
    outs = sidecar.get("outputs", {})
    prob_out = _get(outs, "probabilities", str, model, "outputs")
    heat_out = outs.get("heatmap")
    cfg_outputs = {o.name: list(o.dims) for o in config.output}
    for out in (prob_out, heat_out):
        if out is not None and out not in cfg_outputs:
            raise _fail(model, f"config.pbtxt has no output named {out!r}")

    findings = []
    n_classes = cfg_outputs[prob_out][-1] if cfg_outputs[prob_out] else 0
    for i, f in enumerate(sidecar.get("findings", [])):
        where = f"findings[{i}]"
        code = f.get("code", {})
        if code.get("scheme") not in _CODING_SCHEMES:
            raise _fail(
                model,
                f"{where}.code has unknown coding scheme {code.get('scheme')!r} "
                f"(known: {', '.join(sorted(_CODING_SCHEMES))})",
            )
        try:
            coded = CodedValue(str(code["value"]), code["scheme"], str(code["meaning"]))
        except (KeyError, ValueError) as exc:
            raise _fail(model, f"{where}.code is incomplete: {code!r}") from exc
        spec = FindingSpec(
            label=_get(f, "label", str, model, where),
            index=_get(f, "index", int, model, where),
            threshold=float(_get(f, "threshold", (int, float), model, where)),
            code=coded,
            region_fraction=float(f.get("region_fraction", 0.5)),
            outline=_outline_rule(f.get("outline"), input_spec.channels, model, where),
            expected_prevalence=_rate(f, "expected_prevalence", model, where),
            expected_present_rate=_rate(f, "expected_present_rate", model, where),
        )
        if not 0 < spec.region_fraction <= 1:
            raise _fail(model, f"{where}.region_fraction {spec.region_fraction} is outside (0, 1]")
        if not 0 <= spec.index < n_classes:
            raise _fail(model, f"{where}.index {spec.index} is outside the {n_classes} outputs")
        if not 0 < spec.threshold < 1:
            raise _fail(model, f"{where}.threshold {spec.threshold} is outside (0, 1)")
        if spec.index < len(labels) and labels[spec.index] != spec.label:
            raise _fail(
                model,
                f"{where}.label {spec.label!r} differs from labels.txt line "
                f"{spec.index + 1} ({labels[spec.index]!r})",
            )
        findings.append(spec)
    if not findings:
        raise _fail(model, "nidaan.toml declares no [[findings]]")

    if check_onnx:
        onnx_inputs, onnx_outputs = _onnx_io(onnx_path, model)
        if input_spec.name not in onnx_inputs:
            raise _fail(model, f"model.onnx has no input {input_spec.name!r}")
        shape = onnx_inputs[input_spec.name][1:]
        if shape != expected_dims:
            raise _fail(
                model,
                f"input shape mismatch: model.onnx takes {shape}, config says {expected_dims}",
            )
        for out in (prob_out, heat_out):
            if out is not None and out not in onnx_outputs:
                raise _fail(model, f"model.onnx has no output {out!r}")

    acc = sidecar.get("accepts", {})
    accepts = Accepts(
        modalities=tuple(m.upper() for m in acc.get("modalities", [])),
        body_parts=tuple(b.upper() for b in acc.get("body_parts", [""])),
        views=tuple(v.upper() for v in acc.get("views", [""])),
    )
    if not accepts.modalities:
        raise _fail(model, "nidaan.toml [accepts].modalities is empty")
    dyn = config.dynamic_batching
    version = str(meta.get("version", version_dir))
    return ModelSpec(
        name=model,
        version=version,
        display_name=str(meta.get("display_name", model)),
        directory=directory,
        onnx_path=onnx_path,
        algorithm=AlgorithmInfo(
            name=str(meta.get("display_name", model)),
            version=version,
            manufacturer=str(meta.get("manufacturer", "Nidaan")),
            trained_on_synthetic_data=bool(meta.get("trained_on_synthetic_data", False)),
            model=model,
            digest=_sha256(onnx_path),
            intended_use=_intended_use(model, meta.get("intended_use", {})),
        ),
        accepts=accepts,
        input=input_spec,
        probabilities_output=prob_out,
        heatmap_output=heat_out,
        findings=tuple(findings),
        labels=labels,
        max_batch_size=max(1, config.max_batch_size),
        preferred_batch_sizes=tuple(dyn.preferred_batch_size),
        max_queue_delay_us=int(dyn.max_queue_delay_microseconds),
        card=card,
        dynamic_batching=config.HasField("dynamic_batching"),
        max_queue_size=int(dyn.default_queue_policy.max_queue_size),
        instance_count=sum(max(1, g.count) for g in config.instance_group) or 1,
        # With timeout_action DELAY (1) a timed-out request only loses its priority: no limit here.
        queue_timeout_us=int(dyn.default_queue_policy.default_timeout_microseconds)
        if dyn.default_queue_policy.timeout_action == 0
        else 0,
    )


def load_repository(
    root: Path,
    *,
    check_onnx: bool = True,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
) -> list[ModelSpec]:
    """Load every model folder under ``root`` (folders starting with '.' or '_' are skipped),
    with this site's ``thresholds`` (config ``models.thresholds``) in place of the sidecars'."""
    root = Path(root)
    if not root.is_dir():
        raise ModelRepositoryError(
            f"models.repository: {root} does not exist (set [models] repository or "
            "NIDAAN_MODELS_REPOSITORY to a Triton-style model repository)"
        )
    models = [
        load_model(d, check_onnx=check_onnx)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_")) and (d / "config.pbtxt").exists()
    ]
    if not models:
        raise ModelRepositoryError(f"model repository {root} holds no model (no */config.pbtxt)")
    return apply_thresholds(models, thresholds or {})


def apply_thresholds(
    models: list[ModelSpec], thresholds: Mapping[str, Mapping[str, float]]
) -> list[ModelSpec]:
    """The models with a site's operating thresholds (``{model: {finding: value}}``) in place of
    their sidecars'; a model or finding the repository lacks is an error naming the setting (a
    mistyped override must not leave the sidecar's threshold silently in force)."""
    by_name = {m.name: m for m in models}
    for model, table in thresholds.items():
        if model not in by_name:
            raise ModelRepositoryError(
                f"models.thresholds.{model}: no model {model!r} in the repository "
                f"(models: {', '.join(sorted(by_name))})"
            )
        spec = by_name[model]
        labels = {f.label for f in spec.findings}
        for label in table:
            if label not in labels:
                raise ModelRepositoryError(
                    f"models.thresholds.{model}.{label}: model {model!r} has no finding {label!r} "
                    f"(findings: {', '.join(sorted(labels))})"
                )
        findings = tuple(
            f
            if f.label not in table or table[f.label] == f.threshold
            else replace(f, threshold=float(table[f.label]), sidecar_threshold=f.threshold)
            for f in spec.findings
        )
        by_name[model] = replace(spec, findings=findings)
    return [by_name[m.name] for m in models]


def threshold_overrides(models: list[ModelSpec]) -> list[dict[str, Any]]:
    """Each site threshold in force that differs from its sidecar's (what the audit log records
    at start and ``nidaan models`` shows)."""
    return [
        {
            "model": m.name,
            "version": m.version,
            "finding": f.label,
            "threshold": f.threshold,
            "sidecar_threshold": f.sidecar_threshold,
        }
        for m in models
        for f in m.findings
        if f.sidecar_threshold is not None
    ]


def _sha256(path: Path) -> str:
    """SHA-256 (hex) of a model file; '' when it cannot be read (load_model names that)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def _intended_use(model: str, value: Any) -> tuple[tuple[str, str], ...]:
    """``[model.intended_use]``: one statement per language tag (a plain string is English)."""
    if isinstance(value, str):
        value = {"en": value} if value else {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _fail(model, "model.intended_use must be a string or a table of language = text")
    if value and "en" not in value:
        raise _fail(model, "model.intended_use needs an English statement (en)")
    return tuple(
        sorted(((str(k), v.strip()) for k, v in value.items()), key=lambda kv: kv[0] != "en")
    )
