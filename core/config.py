"""Nidaan's configuration: embedded defaults, one TOML file, then ``NIDAAN_*`` variables.

Precedence (later wins): the defaults in this module, the TOML file given with ``--config``, and
environment variables named ``NIDAAN_<SECTION>_<KEY>`` (for example ``NIDAAN_DICOM_PORT=11113``,
``NIDAAN_STORAGE_DATA_DIR=/var/lib/nidaan``). See docs/configuration.md for every key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .machine import usable_cores

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash, <= 16 chars


def _check_ae_title(value: str, where: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"{where}: {value!r} is not a valid AE title (1-16 characters, no '\\')")
    return value.strip()


def _check_port(value: int, where: str) -> int:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{where}: port {value} is outside 0-65535")
    return value


@dataclass
class DicomConfig:
    """The DICOM SCP that receives studies."""

    def receiver_count(self) -> int:
        """How many receiving processes ``receivers`` asks for (0: the main process)."""
        if self.receivers == "auto":
            return min(8, usable_cores())
        return int(self.receivers)

    ae_title: str = "NIDAAN"
    bind: str = "0.0.0.0"
    port: int = 11112
    #: A study whose instances came over several associations is complete this long after its
    #: last instance; a study sent on one association is complete when that association releases.
    study_idle_timeout_s: float = 5.0
    #: Maximum PDU we announce: large, so senders send few PDUs (0 would mean unlimited).
    max_pdu: int = 4_194_304
    #: Time-outs for our own associations (the SCU that delivers reports).
    network_timeout_s: float = 30.0
    #: Accept associations only from configured peers (calling AE title and host must match).
    require_known_callers: bool = False
    #: At most this many associations at once; more are rejected (transient, local limit).
    max_associations: int = 16
    #: Processes receiving C-STORE: the main process accepts each connection and hands it to
    #: the receiver with the fewest associations. ``"auto"``: one per core this process may use
    #: (its CPU affinity, capped by a cgroup CPU quota; at most 8); ``0``: receive in the main
    #: process itself.
    receivers: int | str = "auto"
    #: Limits on what one instance or study may be; beyond them the C-STORE is refused.
    max_instance_bytes: int = 2_147_483_648
    max_pixels: int = 250_000_000  # Rows x Columns x Number of Frames
    max_instances_per_study: int = 10_000
    #: Refuse instances (0xA700) when the spool's disk would have less than this free.
    min_free_bytes: int = 1_073_741_824
    #: DICOM TLS (PS3.15 B.9, BCP 195: TLS 1.2 or newer): our certificate and key (PEM) turn TLS
    #: on for receiving; ``tls_ca`` (PEM bundle) verifies peers' certificates, ours to them and
    #: theirs to us (a caller must then present one).
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca: str = ""

    def validate(self) -> None:
        self.ae_title = _check_ae_title(self.ae_title, "dicom.ae_title")
        if bool(self.tls_certificate) != bool(self.tls_private_key):
            raise ConfigError("dicom.tls_certificate and dicom.tls_private_key go together")
        for key in ("tls_certificate", "tls_private_key", "tls_ca"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ConfigError(f"dicom.{key}: {path} is not a file")
        _check_port(self.port, "dicom.port")
        if self.receivers != "auto":
            try:
                self.receivers = int(self.receivers)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"dicom.receivers is {self.receivers!r}; use 'auto' or a number (0 = in the "
                    "main process)"
                ) from None
            if not 0 <= self.receivers <= 64:
                raise ConfigError("dicom.receivers must be between 0 and 64")
        if self.study_idle_timeout_s <= 0:
            raise ConfigError("dicom.study_idle_timeout_s must be positive")
        for key in (
            "max_associations",
            "max_instance_bytes",
            "max_pixels",
            "max_instances_per_study",
            "min_free_bytes",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"dicom.{key} must be at least 1")


@dataclass
class GrpcConfig:
    """The gRPC API for integrators (``nidaan.v1.Inference``, health, reflection)."""

    bind: str = "0.0.0.0"
    port: int = 50051
    #: Threads serving calls; calls past ``max_concurrent_rpcs`` get RESOURCE_EXHAUSTED at once.
    workers: int = 8
    #: Calls in flight at once (each waits for a worker and for room in ``max_inflight_mb``).
    max_concurrent_rpcs: int = 256
    #: Largest message: an Analyze request (one study), or one instance of AnalyzeStudy.
    max_message_mb: int = 512
    #: Bytes the calls in flight may hold while they are read, decoded and preprocessed; a call
    #: that would exceed it waits up to ``admission_timeout_s``, then gets RESOURCE_EXHAUSTED.
    max_inflight_mb: int = 48
    admission_timeout_s: float = 30.0
    #: Bearer tokens, one per line ('#' starts a comment): when set, every call of
    #: nidaan.v1.Inference must carry ``authorization: Bearer <token>`` (health stays open).
    #: An alternative to mutual TLS for callers behind a gateway; the file is read at start.
    tokens_file: str = ""
    #: Instances one Analyze call may hold.
    max_instances: int = 1000
    #: A refused instance bigger than this is not kept in quarantine (its reason is): whoever
    #: can reach the port could otherwise fill the disk. 0 keeps only reasons.
    max_quarantine_mb: int = 64
    #: Serve over TLS with the node's certificate and key (dicom.tls_certificate/_private_key),
    #: and accept only clients whose certificate dicom.tls_ca signed (mutual TLS).
    tls: bool = False

    def validate(self) -> None:
        _check_port(self.port, "grpc.port")
        for key in (
            "workers",
            "max_concurrent_rpcs",
            "max_message_mb",
            "max_instances",
            "max_inflight_mb",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"grpc.{key} must be at least 1")
        if self.max_quarantine_mb < 0:
            raise ConfigError("grpc.max_quarantine_mb must not be negative")
        if self.admission_timeout_s < 0:
            raise ConfigError("grpc.admission_timeout_s must not be negative")
        if self.tokens_file:
            read_tokens(self.tokens_file)  # a missing, unreadable or empty file stops here


def read_tokens(path: str, key: str = "grpc.tokens_file") -> list[str]:
    """The bearer tokens in ``path`` (``key``: ``grpc.tokens_file``, ``http.tokens_file``): one
    per line, blank lines and '#' comments ignored. ConfigError naming the file (never a token)
    if it has none."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc}") from exc
    tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    if not tokens:
        raise ConfigError(f"{key}: {path} holds no token")
    for n, token in enumerate(tokens, 1):
        if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
            # The token itself is never quoted: it is a secret.
            raise ConfigError(
                f"{key}: token {n} in {path} is shorter than 16 characters or holds "
                "spaces or control characters"
            )
    return tokens


@dataclass
class HttpConfig:
    """Metrics, health and status page."""

    bind: str = "0.0.0.0"
    port: int = 8080
    #: Tokens, one per line, that open the status page and its actions (resend) and /metrics:
    #: a browser signs in once with ``/?token=<token>``, Prometheus sends ``Authorization:
    #: Bearer <token>``. /healthz and /readyz stay open for probes. Empty: no token needed.
    tokens_file: str = ""
    #: Serve HTTPS with the node's certificate (dicom.tls_certificate/_private_key) and accept
    #: only clients whose certificate dicom.tls_ca signed, as the DICOM and gRPC ports do.
    tls: bool = False
    #: Seconds between C-ECHOes of each configured peer (shown on the status page).
    echo_interval_s: float = 60.0

    def validate(self) -> None:
        _check_port(self.port, "http.port")
        if self.tokens_file:
            read_tokens(self.tokens_file, "http.tokens_file")
        if self.echo_interval_s <= 0:
            raise ConfigError("http.echo_interval_s must be positive")


@dataclass
class StorageConfig:
    """Where the spool, the SQLite state and the quarantine live."""

    data_dir: Path = Path("./nidaan-data")

    def validate(self) -> None:
        self.data_dir = Path(self.data_dir)


@dataclass
class RetentionConfig:
    """What the data dir keeps, for how long and within what size (``pacs_bridge.retention``).

    Ages in days (0 = no limit by age), sizes in GB (0 = no limit by size). A study's instances
    and results are removed only once the study needs nothing more (delivered, skipped, failed,
    or reported with nothing left to deliver); Nidaan is not the archive, the PACS is.
    """

    #: Received instances of finished studies.
    spool_days: float = 14.0
    spool_max_gb: float = 0.0
    #: Reports and region objects of finished studies.
    reports_days: float = 90.0
    reports_max_gb: float = 0.0
    #: Refused objects and their reasons.
    quarantine_days: float = 30.0
    quarantine_max_gb: float = 1.0
    #: The audit log is rotated at this size or at the first record of a new day, and rotated
    #: files are kept this many days (an audit trail outlives the studies).
    audit_rotate_mb: float = 64.0
    audit_days: float = 400.0
    #: Total size of the audit log, rotated files and the current one (0 = no limit): past it
    #: the oldest rotated files go, whatever their age.
    audit_max_gb: float = 10.0
    #: Seconds between sweeps.
    interval_s: float = 300.0

    def validate(self) -> None:
        for key in (
            "spool_days",
            "spool_max_gb",
            "reports_days",
            "reports_max_gb",
            "quarantine_days",
            "quarantine_max_gb",
            "audit_days",
            "audit_max_gb",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"retention.{key} must not be negative (0: no limit)")
        if self.audit_rotate_mb <= 0:
            raise ConfigError("retention.audit_rotate_mb must be positive")
        if self.interval_s <= 0:
            raise ConfigError("retention.interval_s must be positive")


@dataclass
class ModelsConfig:
    """The Triton-style model repository."""

    repository: Path = Path("./models")
    #: This site's operating thresholds, replacing the sidecar's: ``{model: {finding: value}}``,
    #: in TOML ``[models.thresholds.cxr_screen]`` then ``nodule = 0.31``. Adopting one is an
    #: explicit change (after ``nidaan validate`` on local data, docs/governance.md): ``nidaan
    #: models`` shows it beside the sidecar's and the audit log records it at every start.
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)

    def validate(self) -> None:
        self.repository = Path(self.repository)
        if not isinstance(self.thresholds, dict):
            raise ConfigError("models.thresholds must be a table of [models.thresholds.<model>]")
        checked: dict[str, dict[str, float]] = {}
        for model, table in self.thresholds.items():
            where = f"models.thresholds.{model}"
            if not isinstance(table, dict):
                raise ConfigError(f"{where} must be a table of finding = threshold")
            checked[model] = {}
            for label, value in table.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{where}.{label}: {value!r} is not a number")
                if not 0.0 < float(value) < 1.0:
                    raise ConfigError(f"{where}.{label}: {value} is outside (0, 1)")
                checked[model][label] = float(value)
        self.thresholds = checked


@dataclass
class ExportConfig:
    """``nidaan export --deidentify``: which PS3.15 Annex E options the anonymised dataset keeps
    (docs/governance.md). The key that makes the pseudonyms stays in the data dir
    (``export.key``), never in an export."""

    #: Retain Longitudinal Temporal Information, Full Dates Option (DCM 113106): keep dates and
    #: times as they are. Off: the Basic Profile's dummy dates.
    retain_dates: bool = False
    #: Retain Patient Characteristics Option (DCM 113108): keep sex, age, size and weight (for
    #: subgroup analyses). Off: removed or emptied as the Basic Profile says.
    retain_patient_characteristics: bool = False

    def validate(self) -> None:
        pass


@dataclass
class InferenceConfig:
    """Which inference backend runs the models."""

    backend: str = "onnxruntime"
    #: ``auto`` uses the CUDA execution provider when a GPU is present, else the CPU one.
    device: str = "auto"
    #: Threads ONNX Runtime may use for one model run; 0 = the cores this process may use,
    #: shared among a model's instances (config.pbtxt instance_group count).
    intra_op_threads: int = 0
    #: Studies analysed at the same time; their images meet in the models' batchers.
    workers: int = 2
    #: Processes decoding compressed pixel data (the codecs hold the GIL, so they run apart
    #: from the server's threads); 0 = one per core this process may use.
    decode_workers: int = 0
    #: A decode running longer than this fails its image (the worker is replaced).
    decode_timeout_s: float = 60.0
    #: Images a model's queue holds when its config.pbtxt sets no default_queue_policy.
    max_queue_images: int = 256
    #: How long a caller waits for room in a full queue before QueueFullError.
    queue_timeout_s: float = 30.0
    triton_url: str = "127.0.0.1:8001"
    #: Deadline of one Triton request; a study whose inference fails is retried, not lost.
    triton_timeout_s: float = 30.0
    #: How inputs reach Triton: ``auto`` (system shared memory when Triton's URL is loopback,
    #: CUDA shared memory for GPU tensors), ``system``, ``cuda`` or ``none`` (in the gRPC message).
    triton_shared_memory: str = "auto"
    #: ``nidaan serve``: container objects made, net of those freed, between collections of
    #: the cyclic garbage collector's youngest generation, once the server has started (its
    #: start-up objects then frozen out of every collection: ``core.heap``); 0 leaves CPython's
    #: collector as it is (700, nothing frozen).
    gc_young_threshold: int = 50_000

    def validate(self) -> None:
        if self.backend not in ("onnxruntime", "triton"):
            raise ConfigError(
                f"inference.backend is {self.backend!r}; use 'onnxruntime' or 'triton'"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"inference.device is {self.device!r}; use 'auto', 'cpu' or 'cuda'")
        if self.triton_shared_memory not in ("auto", "system", "cuda", "none"):
            raise ConfigError(
                f"inference.triton_shared_memory is {self.triton_shared_memory!r}; "
                "use 'auto', 'system', 'cuda' or 'none'"
            )
        if self.decode_workers < 0:
            raise ConfigError("inference.decode_workers must be 0 (one per core) or more")
        if self.decode_timeout_s <= 0:
            raise ConfigError("inference.decode_timeout_s must be positive")
        if self.gc_young_threshold < 0:
            raise ConfigError(
                "inference.gc_young_threshold must be 0 (CPython's collector as it is) or more"
            )
        for name in ("workers", "max_queue_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inference.{name} must be at least 1")
        if self.queue_timeout_s < 0:
            raise ConfigError("inference.queue_timeout_s must not be negative")


@dataclass
class KernelsConfig:
    """Preprocessing kernels."""

    backend: str = "auto"
    #: Numba's on-disk cache of compiled kernels; empty = Numba's default.
    cache_dir: str = ""
    #: GPU executor: most images in one launch, and how long it waits for more after the first.
    gpu_max_batch: int = 32
    gpu_max_delay_ms: float = 1.0

    def validate(self) -> None:
        if self.backend not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"kernels.backend is {self.backend!r}; use 'auto', 'cpu' or 'cuda'")
        if self.gpu_max_batch < 1:
            raise ConfigError("kernels.gpu_max_batch must be at least 1")
        if not 0 <= self.gpu_max_delay_ms <= 1000:
            raise ConfigError("kernels.gpu_max_delay_ms must be between 0 and 1000")


#: The result objects a study can give, in the order they are sent (``[[peers]] objects``).
RESULT_OBJECTS = ("sr", "seg", "gsps", "sc")
#: What a peer gets unless its config says otherwise: the report, and its regions both as a
#: Segmentation and outlined on the images (a Secondary Capture is for viewers without either).
DEFAULT_OBJECTS = ("sr", "seg", "gsps")


@dataclass
class Peer:
    """A known DICOM node (a PACS) that may send to us and receive our reports."""

    ae_title: str
    host: str
    port: int
    #: Send to this peer over DICOM TLS (verified against ``dicom.tls_ca``).
    tls: bool = False
    #: What this peer gets of a study's results (some PACS store only some): ``sr`` the
    #: report (TID 1500), ``seg`` a Segmentation of each region (what AI-ready viewers draw),
    #: ``gsps`` a Grayscale Softcopy Presentation State outlining them on the images, ``sc`` a
    #: Secondary Capture image with the outlines burned in (for viewers that show only pixels).
    objects: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTS))
    #: A second language for the texts of its reports, beside English (a file in
    #: pacs_bridge/languages/, e.g. "hi"); empty: English only.
    language: str = ""

    def validate(self, where: str) -> None:
        self.ae_title = _check_ae_title(self.ae_title, f"{where}.ae_title")
        _check_port(self.port, f"{where}.port")
        if not self.host:
            raise ConfigError(f"{where}.host is empty")
        if not isinstance(self.objects, list) or not all(isinstance(o, str) for o in self.objects):
            raise ConfigError(
                f'{where}.objects must be a list of names such as ["sr", "seg"] (some of '
                f"{', '.join(RESULT_OBJECTS)}), not {self.objects!r}"
            )
        unknown = sorted(set(self.objects) - set(RESULT_OBJECTS))
        if unknown or not self.objects:
            raise ConfigError(
                f"{where}.objects must name some of {', '.join(RESULT_OBJECTS)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        self.objects = [o for o in RESULT_OBJECTS if o in self.objects]
        if self.language == "en":
            self.language = ""  # every report carries English already
        if self.language and not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", self.language):
            raise ConfigError(
                f"{where}.language must be a language tag such as 'hi' (RFC 5646), "
                f"not {self.language!r}"
            )


#: In ``reports.destinations``: send the report to the AE that sent the study, when it is a peer.
SOURCE = "@source"


@dataclass
class Route:
    """A routing rule: which instances it matches, which models read them, where reports go.

    Every criterion is optional (absent or empty = any); lists match any of their values, case
    insensitively; ``series_description`` is a regular expression searched in the Series
    Description. See ``nidaan.pacs_bridge.routing``.
    """

    name: str = ""
    calling_ae: list[str] = field(default_factory=list)
    modality: list[str] = field(default_factory=list)
    sop_class: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    series_description: str = ""
    #: Model names; empty = every model whose sidecar accepts the image.
    models: list[str] = field(default_factory=list)
    #: Peer AE titles or ``@source``; empty = ``reports.destinations``.
    destinations: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        for key in ("calling_ae", "modality", "sop_class", "body_part", "models", "destinations"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key} must be a list of strings")
        if self.series_description:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise ConfigError(
                    f"{where}.series_description is not a valid regex: {exc}"
                ) from exc


@dataclass
class ReportsConfig:
    """Where reports go and how delivery is retried."""

    #: AE titles of peers, or ``@source`` for the peer that sent the study.
    destinations: list[str] = field(default_factory=lambda: [SOURCE])
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    #: After this many failed attempts a report becomes a dead letter: kept, visible in
    #: ``nidaan outbox``, re-sent by ``nidaan outbox --resend``; 0 = retry for ever.
    max_attempts: int = 100
    #: Associations the outbox holds open to one peer at once (each carries several reports):
    #: a PACS limits its associations per calling AE, so this stays small.
    max_associations_per_peer: int = 2
    #: Associations the outbox holds open in all, to every peer together; a peer that hangs
    #: occupies at most ``max_associations_per_peer`` of them, so the others go on delivering.
    max_associations: int = 8
    series_number: int = 9901
    institution_name: str = ""
    #: Processes that build and write the result objects (SR, SEG, GSPS, SC), off the server's
    #: GIL: 0 = one per core (at most 4), -1 = none (built in the analysing thread).
    workers: int = 0
    #: A study whose objects take longer than this fails (its builder process is replaced).
    build_timeout_s: float = 300.0

    def validate(self) -> None:
        if self.workers < -1:
            raise ConfigError("reports.workers must be -1 (in process), 0 (one per core) or more")
        if self.build_timeout_s <= 0:
            raise ConfigError("reports.build_timeout_s must be more than 0")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ConfigError("reports: need 0 < retry_initial_s <= retry_max_s")
        if self.max_attempts < 0:
            raise ConfigError("reports.max_attempts must be 0 (for ever) or more")
        if self.max_associations_per_peer < 1:
            raise ConfigError("reports.max_associations_per_peer must be 1 or more")
        if self.max_associations < 1:
            raise ConfigError("reports.max_associations must be 1 or more")


@dataclass
class Config:
    """The whole configuration. Build it with :func:`load_config`."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    peers: list[Peer] = field(default_factory=list)
    #: Routing rules, first match wins; none configured = every image to every accepting model.
    routes: list[Route] = field(default_factory=list)

    def validate(self) -> None:
        """Check every section; raise :class:`ConfigError` naming the first bad key."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        seen: set[str] = set()
        for i, peer in enumerate(self.peers):
            peer.validate(f"peers[{i}]")
            if peer.ae_title in seen:
                raise ConfigError(f"peers: AE title {peer.ae_title!r} is listed twice")
            seen.add(peer.ae_title)
        if self.grpc.tls and not (self.dicom.tls_certificate and self.dicom.tls_ca):
            raise ConfigError(
                "grpc.tls = true needs dicom.tls_certificate, dicom.tls_private_key and "
                "dicom.tls_ca (the node's certificate, and the CA that signs its clients')"
            )
        if self.http.tls and not (self.dicom.tls_certificate and self.dicom.tls_ca):
            raise ConfigError(
                "http.tls = true needs dicom.tls_certificate, dicom.tls_private_key and "
                "dicom.tls_ca (the node's certificate, and the CA that signs its clients')"
            )
        if any(p.tls for p in self.peers) and not self.dicom.tls_ca:
            raise ConfigError("a peer has tls = true but dicom.tls_ca is not set to verify it")
        for dest in self.reports.destinations:
            if dest != SOURCE and dest not in seen:
                raise ConfigError(
                    f"reports.destinations names {dest!r}, which is not a configured peer"
                )
        for i, route in enumerate(self.routes):
            route.validate(f"routes[{i}]")
            for dest in route.destinations:
                if dest != SOURCE and dest not in seen:
                    raise ConfigError(
                        f"routes[{i}].destinations names {dest!r}, which is not a configured peer"
                    )

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this AE title, if any."""
        for p in self.peers:
            if p.ae_title == ae_title.strip():
                return p
        return None


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a TOML or env value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return annotation(value)
        if annotation is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if annotation is Path:
            return Path(os.path.expanduser(str(value)))
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            (item_type,) = typing.get_args(annotation)
            return [_coerce(v, item_type, where) for v in value]
        if origin in (typing.Union, types.UnionType):
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation}") from exc
    return value


def _apply(section: Any, values: Mapping[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        setattr(section, key, _coerce(value, hints[key], f"{where}.{key}"))


def _sections(cfg: Config) -> dict[str, Any]:
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in ("peers", "routes")
    }


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the configuration from defaults, an optional TOML file and ``NIDAAN_*`` variables."""
    cfg = Config()
    sections = _sections(cfg)
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        for name, values in data.items():
            if name == "peers":
                if not isinstance(values, list):
                    raise ConfigError("peers must be an array of tables ([[peers]])")
                cfg.peers = []
                for i, item in enumerate(values):
                    try:
                        peer = Peer(**item)
                    except TypeError as exc:
                        raise ConfigError(f"peers[{i}]: {exc}") from exc
                    peer.port = _coerce(peer.port, int, f"peers[{i}].port")
                    cfg.peers.append(peer)
            elif name == "routes":
                if not isinstance(values, list):
                    raise ConfigError("routes must be an array of tables ([[routes]])")
                cfg.routes = []
                for i, item in enumerate(values):
                    try:
                        cfg.routes.append(Route(**item))
                    except TypeError as exc:
                        raise ConfigError(f"routes[{i}]: {exc}") from exc
            elif name in sections:
                if not isinstance(values, dict):
                    raise ConfigError(f"[{name}] must be a table")
                _apply(sections[name], values, name)
            else:
                raise ConfigError(f"unknown section [{name}] in {path}")
    env = os.environ if environ is None else environ
    for var, value in env.items():
        if not var.startswith("NIDAAN_"):
            continue
        rest = var[len("NIDAAN_") :].lower()
        name, _, key = rest.partition("_")
        if name in sections and key:
            _apply(sections[name], {key: value}, var)
    cfg.validate()
    return cfg
