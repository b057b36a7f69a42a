"""The ``nidaan serve`` process: SCP, study assembly, analysis worker, report outbox, metrics.

One node with no external service (the embedded default). Processes: ``dicom.receivers``
receiver processes serve the associations the main process accepts (``pacs_bridge.receivers``;
with ``receivers = 0`` pynetdicom's association threads do it here), and
``inference.decode_workers`` processes decode compressed pixel data (``server.decode_pool``).
Threads of the main process: ``inference.workers`` workers analyse complete studies (a study is
never analysed by two at once) and their images meet in each model's batcher; the outbox
delivers reports; a timer completes idle studies; the accept and receiver-event threads.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nidaan.core.config import Config, read_tokens
from nidaan.core.errors import ConfigError, InferenceError, NidaanError
from nidaan.kernels import configure_cache, resolve_backend
from nidaan.pacs_bridge import languages
from nidaan.pacs_bridge.assembly import StudyAssembler
from nidaan.pacs_bridge.audit import AuditLog
from nidaan.pacs_bridge.languages import load_language
from nidaan.pacs_bridge.outbox import Outbox, describe
from nidaan.pacs_bridge.receivers import Receivers
from nidaan.pacs_bridge.retention import AREAS, Sweeper
from nidaan.pacs_bridge.routing import Router
from nidaan.pacs_bridge.scp import Limits, StorageSCP, StoreOutcome
from nidaan.pacs_bridge.scu import echo
from nidaan.pacs_bridge.spool import Spool
from nidaan.pacs_bridge.state import STUDY_STATES, OutboxItem, StateStore
from nidaan.pacs_bridge.tls import client_context, server_context
from nidaan.pacs_bridge.uids import node_uid, ref

from .api import ApiLimits, ApiServer, InferenceService, server_credentials
from .backends import create_backend
from .batching import DynamicBatcher
from .console import modality_of, quarantine_entries, short_uid
from .decode_pool import DecodePool
from .feedback import Feedback
from .metrics import Metrics
from .model_repository import load_repository, threshold_overrides
from .pipeline import Pipeline
from .result_objects import ResultBuilder
from .status import StatusServer
from .studies import Studies

log = logging.getLogger("nidaan.server")

#: Seconds before a study whose inference failed (backend down) is tried again.
INFERENCE_RETRY_S = 5.0
#: The status page's drift window: present-rates over the last day.
DRIFT_WINDOW_S = 86400.0

#: What each background thread the node needs does, by name prefix (for /healthz).
THREAD_ROLES = {
    "nidaan-worker": "analysis worker",
    "nidaan-timer": "study completion timer",
    "nidaan-outbox": "report delivery (outbox)",
    "nidaan-accept": "DICOM connection acceptor",
    "nidaan-receiver-events": "DICOM receivers' events",
    "nidaan-retention": "storage retention sweeper",
    "nidaan-peers": "peer C-ECHO monitor",
}


def scp_limits(config: Config) -> Limits:
    """The SCP's admission rules and size limits from the config.

    Known callers' hosts are resolved to addresses once, at start.
    """
    d = config.dicom
    known = None
    if d.require_known_callers:
        known = {}
        for peer in config.peers:
            try:
                addresses = {info[4][0] for info in socket.getaddrinfo(peer.host, None)}
            except OSError as exc:
                raise ConfigError(
                    f"peer {peer.ae_title}: cannot resolve {peer.host}: {exc}"
                ) from exc
            known[peer.ae_title] = addresses
    return Limits(
        known,
        d.max_associations,
        d.max_instance_bytes,
        d.max_pixels,
        d.max_instances_per_study,
        d.min_free_bytes,
    )


class NidaanServer:
    """One Nidaan instance. ``start()`` returns once it listens; ``stop()`` shuts it down."""

    def __init__(self, config: Config) -> None:
        self.config = config
        configure_cache(config.kernels.cache_dir)
        if resolve_backend(config.kernels.backend) == "cuda":
            from nidaan.kernels.executor import configure_executors

            configure_executors(config.kernels.gpu_max_batch, config.kernels.gpu_max_delay_ms / 1e3)
        self.models = load_repository(config.models.repository, thresholds=config.models.thresholds)
        self.metrics = Metrics()
        self.backend = create_backend(config.inference, self.models, self.metrics.observe_batch)
        if isinstance(self.backend, DynamicBatcher):
            self.metrics.watch_batcher(self.backend.stats)
        self.decoder = DecodePool(
            config.inference.decode_workers, config.inference.decode_timeout_s
        )
        self.results = ResultBuilder(config.reports.workers, config.reports.build_timeout_s)
        self.pipeline = Pipeline(
            self.models,
            self.backend,
            kernel_backend=config.kernels.backend,
            decoder=self.decoder,
            prepare_threads=self.decoder.workers,
            observe=self.metrics.stage,
            # Drift statistics of every result, whichever entrance asked (Studies.observe).
            on_analysed=lambda analyses: self.studies.observe(analyses),
        )
        self.router = Router(config, {m.name for m in self.models})
        self._check_languages()
        data = Path(config.storage.data_dir)
        try:
            self.spool = Spool(data)
            probe = self.spool.staging_dir / f".writable-{os.getpid()}"
            probe.write_bytes(b"")  # a read-only file system fails here, not at the first study
            probe.unlink()
            self.state = StateStore(data / "state.sqlite3")
            self.audit = AuditLog(data / "audit.jsonl")
            for override in threshold_overrides(self.models):  # a site's own operating point
                self.audit.record("threshold_override", **override)
            # One UID per installation, made once and kept in the data dir (TID 1004 Device
            # Observer UID): an AE title is the same in every default installation.
            self.device_uid = node_uid(data)
        except (OSError, sqlite3.Error, ValueError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                f"storage.data_dir: cannot use {data} ({why}); give a writable folder "
                "(NIDAAN_STORAGE_DATA_DIR or [storage] data_dir)"
            ) from exc
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._busy_lock = threading.Lock()
        self._busy: set[str] = set()
        self._again: set[str] = set()
        self.studies = Studies(
            config,
            self.pipeline,
            self.router,
            self.state,
            self.spool,
            self.metrics,
            self.audit,
            device_uid=self.device_uid,
            wake_outbox=lambda: self.outbox.wake(),
            feedback=Feedback(self.state, self.metrics, self.models, data, self.audit),
            results=self.results,
        )
        self.assembler = StudyAssembler(config.dicom.study_idle_timeout_s, self._study_complete)
        limits = scp_limits(config)
        receivers = config.dicom.receiver_count()
        self.scp: StorageSCP | Receivers
        if receivers:
            self.scp = Receivers(
                config,
                receivers,
                limits,
                on_instance=self.assembler.instance_received,
                on_association_end=self.assembler.association_ended,
                on_outcome=self._count_store,
                on_rejected=self._count_rejected,
            )
        else:
            self.scp = StorageSCP(
                config.dicom.ae_title,
                self.spool,
                self.state,
                on_instance=self.assembler.instance_received,
                on_association_end=self.assembler.association_ended,
                on_outcome=self._count_store,
                on_rejected=self._count_rejected,
                audit=self.audit,
                max_pdu=config.dicom.max_pdu,
                limits=limits,
            )
        self.outbox = Outbox(
            config,
            self.state,
            on_delivered=self._study_delivered,
            on_attempt=self._delivery_attempt,
            on_sent=lambda seconds: self.metrics.stage("delivery", seconds),
        )
        self.metrics.watch_outbox(self.state.outbox_counts)
        quarantine = self.spool.quarantine_dir
        self.metrics.watch_quarantine(lambda: sum(1 for _ in quarantine.glob("*.json")))
        # Several workers, so that the images of concurrent studies meet in the models' batchers.
        self._threads = [
            threading.Thread(target=self._work, name=f"nidaan-worker-{i}", daemon=True)
            for i in range(config.inference.workers)
        ] + [
            threading.Thread(target=self._tick, name="nidaan-timer", daemon=True),
            threading.Thread(target=self._retain, name="nidaan-retention", daemon=True),
        ]
        if config.peers:
            self._threads.append(
                threading.Thread(target=self._echo_peers, name="nidaan-peers", daemon=True)
            )
        #: Each peer's last C-ECHO and last delivery: (time, '' or what went wrong).
        self._peer_lock = threading.Lock()
        self._echoes: dict[str, tuple[float, str]] = {}
        self._deliveries: dict[str, tuple[float, str]] = {}
        self.sweeper = Sweeper(
            config.retention,
            self.spool,
            self.state,
            self.audit,
            on_sweep=lambda r: self.metrics.storage(
                r.sizes, r.free_bytes, r.removed_bytes, r.studies_pruned
            ),
        )
        self.http: StatusServer | None = None
        self._started_at = time.monotonic()
        self.api: ApiServer | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, *, http: bool = True, grpc: bool = True) -> None:
        """Warm the kernels, recover unfinished work, and start listening."""
        self.spool.sweep()  # what a crash left (staged data sets, partial writes): first
        self._warm_up()
        self._recover()
        for t in self._threads:
            t.start()
        self.outbox.start()
        d = self.config.dicom
        try:
            if isinstance(self.scp, Receivers):
                self.scp.start(d.bind, d.port)  # each receiver makes its own TLS context
            else:
                self.scp.start(d.bind, d.port, server_context(d))
        except OSError as exc:  # a taken port: one line naming it, not a traceback
            raise ConfigError(
                f"dicom.port: cannot listen on {d.bind}:{d.port}: {_why(exc)}"
            ) from exc
        if grpc:
            self.api = self._api_server()
            d = self.config.dicom
            credentials = (
                server_credentials(d.tls_certificate, d.tls_private_key, d.tls_ca)
                if self.config.grpc.tls
                else None
            )
            self.api.start(self.config.grpc.bind, self.config.grpc.port, credentials)
        if http:
            h = self.config.http
            self.http = StatusServer(
                self.metrics.registry,
                self.snapshot,
                self.health,
                self.readiness,
                console=self.console,
                resend=self.resend,
                tokens=read_tokens(h.tokens_file, "http.tokens_file") if h.tokens_file else (),
            )
            try:
                # http.tls: the node's certificate, and only clients the CA signed, as on the
                # DICOM port (PS3.15 B.9, BCP 195).
                self.http.start(
                    h.bind, h.port, server_context(self.config.dicom) if h.tls else None
                )
            except OSError as exc:
                self.http = None
                raise ConfigError(
                    f"http.port: cannot listen on {h.bind}:{h.port}: {_why(exc)}"
                ) from exc
        self._started_at = time.monotonic()
        log.info(
            "listening as %s on port %d (gRPC %s); %d model(s): %s",
            self.config.dicom.ae_title,
            self.scp.port,
            self.api.port if self.api else "off",
            len(self.models),
            ", ".join(m.name for m in self.models),
        )

    def stop(self) -> None:
        """Stop accepting, finish the study in progress, stop delivering (idempotent)."""
        if self._stop.is_set():
            return
        if self.api is not None:
            self.api.stop()
        self.scp.stop()
        self._stop.set()
        for _ in range(self.config.inference.workers):
            self._queue.put(None)
        for t in self._threads:
            if t.ident is not None:  # started (start() may have failed before)
                t.join(timeout=30)
        self.outbox.stop()
        if self.http is not None:
            self.http.stop()
        self.studies.close()
        self.pipeline.close()
        self.decoder.close()
        self.results.close()
        self.backend.close()
        if "nidaan.kernels.executor" in sys.modules:  # a GPU executor may have started
            sys.modules["nidaan.kernels.executor"].close_executors()
        self.state.close()
        self.audit.close()
        self.spool.close()  # its lock on the staging folder: the next server may sweep

    def health(self) -> list[str]:
        """What keeps the node from doing its work (for /healthz); empty when it serves.

        A node whose analysis workers, timer or outbox thread has ended still answers C-STORE,
        but its studies would never be analysed or its reports never delivered: a probe must see
        that, and the answer names the thread.
        """
        if self._stop.is_set():
            return ["the node is stopping"]
        problems = []
        receiving = self.scp.threads if isinstance(self.scp, Receivers) else []
        for t in [*self._threads, self.outbox.thread, *receiving]:
            if not t.is_alive():
                role = next(
                    (r for p, r in THREAD_ROLES.items() if t.name.startswith(p)),
                    "background thread",
                )
                state = "has not started" if t.ident is None else "has stopped"
                problems.append(f"thread {t.name} ({role}) {state}")
        if isinstance(self.scp, Receivers):
            problems += self.scp.health()
        return problems

    def readiness(self) -> dict[str, str]:
        """Each readiness check and what is wrong with it ('' = ready), for /readyz: the models
        loaded (and Triton reachable with them, when used), the spool writable with room, the
        state database open, and every thread the node needs alive (/healthz)."""
        checks: dict[str, str] = {}
        checks["models"] = "" if self.models else "no model loaded"
        inner = self.backend.backend if isinstance(self.backend, DynamicBatcher) else self.backend
        problem = getattr(inner, "problem", None)
        if callable(problem) and not checks["models"]:
            checks["models"] = str(problem())
        checks["spool"] = self._spool_problem()
        try:
            self.state.counts()
            checks["state"] = ""
        except Exception as exc:  # sqlite3 raises several types; the type says enough
            checks["state"] = f"state database not usable: {type(exc).__name__}"
        checks["threads"] = "; ".join(self.health())
        return checks

    def _spool_problem(self) -> str:
        d = self.config.dicom
        probe = self.spool.staging_dir / f".ready-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            free = shutil.disk_usage(self.spool.root).free
        except OSError as exc:
            return f"data dir {self.config.storage.data_dir} not writable: {exc.strerror or exc}"
        if free < d.min_free_bytes:
            return (
                f"{free} bytes free on the data dir's disk, less than dicom.min_free_bytes "
                f"({d.min_free_bytes}): new instances are refused"
            )
        return ""

    def serving(self) -> bool:
        """Whether the node accepts work and every thread it needs runs."""
        return not self.health()

    def snapshot(self) -> dict[str, Any]:
        """What the node is doing, in counts (the status page and /status.json): no patient data
        and no UIDs."""
        batches = self.backend.stats() if isinstance(self.backend, DynamicBatcher) else {}
        problems = self.health()
        return {
            "status": "serving"
            if not problems
            else ("stopping" if self._stop.is_set() else "not serving"),
            "problems": problems,
            "node": {
                "ae_title": self.config.dicom.ae_title,
                "dicom_port": self.scp.port,
                "grpc_port": self.api.port if self.api else None,
                "uptime_s": round(time.monotonic() - self._started_at, 1),
            },
            "models": [
                {
                    "name": m.name,
                    "version": m.version,
                    "display_name": m.display_name,
                    "modalities": list(m.accepts.modalities),
                    "not_for_diagnosis": m.algorithm.not_for_diagnosis,
                }
                for m in self.models
            ],
            "studies": self.state.counts(),
            "drift": self.drift(),
            "reports": self.state.outbox_counts(),
            "quarantine": {
                "entries": sum(1 for _ in self.spool.quarantine_dir.glob("*.json")),
            },
            "storage": self._storage(),
            "inference": {
                "backend": self.config.inference.backend,
                "models": {
                    name: {
                        "images": st.inference_count,
                        "batches": st.execution_count,
                        "mean_batch": round(st.inference_count / st.execution_count, 2)
                        if st.execution_count
                        else 0.0,
                        "queued_images": st.queued_images,
                        "rejected": st.rejected,
                    }
                    for name, st in batches.items()
                },
            },
            "decoder": {"workers": self.decoder.workers, "restarts": self.decoder.restarts},
            "report_builders": {
                "workers": self.results.workers,
                "restarts": self.results.restarts,
            },
            "receivers": {
                "processes": self.scp.count if isinstance(self.scp, Receivers) else 0,
                "restarts": self.scp.restarts if isinstance(self.scp, Receivers) else 0,
            },
        }

    def drift(self) -> dict[str, Any]:
        """Each model's findings over the last day (from the state database, so a restart keeps
        them): images analysed, present, the present-rate, and beside it the rates the model
        card states for its held-out set; radiologists' verdicts so far. Counts only."""
        since = time.time() - DRIFT_WINDOW_S
        seen = {(m, f): (n, p) for m, f, n, p in self.state.finding_rates(since)}
        verdicts: dict[tuple[str, str], dict[str, int]] = {}
        for m, f, verdict, n in self.state.feedback_counts():
            verdicts.setdefault((m, f), {"agree": 0, "disagree": 0})[verdict] = n
        rows = []
        for model in self.models:
            for f in model.findings:
                n, present = seen.get((model.name, f.label), (0, 0))
                rows.append(
                    {
                        "model": model.name,
                        "finding": f.label,
                        "analysed": n,
                        "present": present,
                        "present_rate": round(present / n, 4) if n else None,
                        "expected_present_rate": f.expected_present_rate,
                        "expected_prevalence": f.expected_prevalence,
                        # The card's rate holds at the sidecar's threshold only.
                        "site_threshold": f.sidecar_threshold is not None,
                        "feedback": verdicts.get(
                            (model.name, f.label), {"agree": 0, "disagree": 0}
                        ),
                    }
                )
        return {"window_s": DRIFT_WINDOW_S, "findings": rows}

    def _api_server(self) -> ApiServer:
        g = self.config.grpc
        service = InferenceService(
            self.studies,
            self.spool,
            limits=ApiLimits(
                g.max_instances,
                self.config.dicom.max_pixels,
                max_quarantine_bytes=g.max_quarantine_mb << 20,
                min_free_bytes=self.config.dicom.min_free_bytes,
            ),
            on_request=self._api_request,
        )
        return ApiServer(
            service,
            workers=g.workers,
            max_concurrent_rpcs=g.max_concurrent_rpcs,
            max_message_bytes=g.max_message_mb << 20,
        )

    def _api_request(self, method: str, code: Any, study_uid: str) -> None:
        """Count and audit each gRPC call (the audit trail names the study by UID)."""
        self.metrics.grpc_requests.labels(method, code.name).inc()
        self.audit.record("grpc", method=method, code=code.name, study=study_uid or None)

    def _warm_up(self) -> None:
        """Compile the kernels and load each model once, so the first study is not slow."""
        import numpy as np

        from nidaan.kernels import PixelTransform, preprocess

        from .pipeline import layout_of

        # Straight to the engine: warm-up runs are not requests and stay out of the batch counts.
        engine = self.backend.backend if isinstance(self.backend, DynamicBatcher) else self.backend
        for m in self.models:
            batch, _ = preprocess(
                [np.zeros((8, 8), np.uint16)],
                [PixelTransform()],
                layout_of(m),
                backend=self.config.kernels.backend,
            )
            engine.infer(m, batch)

    def _recover(self) -> None:
        """Queue studies a previous run acknowledged but did not finish."""
        for study in self.state.studies_in("receiving", "complete", "analysed"):
            log.info("recovering study %s", ref(study))
            self._queue.put(study)

    # --- events ----------------------------------------------------------------------------------

    def _count_store(self, outcome: StoreOutcome) -> None:
        # The SCP wrote the audit line (in whichever process received it) before answering.
        self.metrics.instances.labels(f"0x{outcome.status:04X}").inc()
        if outcome.seconds:
            self.metrics.stage("receive", outcome.seconds)

    def _count_rejected(self, reason: str) -> None:
        self.metrics.associations_rejected.labels(reason).inc()

    def _delivery_attempt(self, item: OutboxItem, ok: bool, error: str) -> None:
        self.metrics.deliveries.labels("delivered" if ok else "failed").inc()
        with self._peer_lock:
            self._deliveries[item.destination] = (time.time(), "" if ok else error)
        self.audit.record(
            "report_delivery",
            ok=ok,
            error=error,
            destination=item.destination,
            study=item.study_uid,
            report=item.sop_instance_uid,
            attempt=item.attempts + 1,
        )

    def _study_complete(self, study_uid: str) -> None:
        self.state.set_study_state(study_uid, "complete")
        self._queue.put(study_uid)

    def _study_delivered(self, study_uid: str) -> None:
        info = self.state.study(study_uid)  # keep what analysis noted (images not analysed)
        self.state.set_study_state(study_uid, "delivered", info[1] if info else "")
        self.metrics.studies.labels("delivered").inc()
        log.info("study %s delivered", ref(study_uid))

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self.assembler.tick()

    def _storage(self) -> dict[str, Any]:
        """The data dir's areas and free space as of the last retention sweep, and the limits."""
        last = self.sweeper.last
        r = self.config.retention
        return {
            "swept": last is not None,
            "free_bytes": last.free_bytes if last else None,
            "areas": {
                area: {
                    "bytes": last.sizes[area] if last else None,
                    "keep_days": getattr(r, f"{area}_days"),
                    "max_gb": getattr(r, f"{area}_max_gb", 0.0),
                }
                for area in AREAS
            },
        }

    def _echo_peers(self) -> None:
        """C-ECHO every configured peer now and then, for the status page."""
        delay = 1.0
        while not self._stop.wait(delay):
            for peer in self.config.peers:
                try:
                    why = echo(
                        calling_ae=self.config.dicom.ae_title,
                        peer_ae=peer.ae_title,
                        host=peer.host,
                        port=peer.port,
                        timeout_s=min(10.0, self.config.dicom.network_timeout_s),
                        ssl_context=client_context(self.config.dicom) if peer.tls else None,
                    )
                except Exception as exc:  # a peer's trouble must not end the monitor
                    why = f"C-ECHO failed: {describe(exc)}"
                with self._peer_lock:
                    self._echoes[peer.ae_title] = (time.time(), why)
                if self._stop.is_set():
                    return
            delay = self.config.http.echo_interval_s

    def peers(self) -> list[dict[str, Any]]:
        """Each configured peer with its last C-ECHO and last delivery (the status page)."""
        out = []
        with self._peer_lock:
            for p in self.config.peers:
                echo_at, echo_why = self._echoes.get(p.ae_title, (0.0, ""))
                sent_at, sent_why = self._deliveries.get(p.ae_title, (0.0, ""))
                out.append(
                    {
                        "ae_title": p.ae_title,
                        "address": f"{p.host}:{p.port}",
                        "tls": p.tls,
                        "objects": list(p.objects),
                        "language": p.language or "en",
                        "echo_at": echo_at or None,
                        "echo": "not tried yet" if not echo_at else (echo_why or "ok"),
                        "delivery_at": sent_at or None,
                        "delivery": "none yet" if not sent_at else (sent_why or "ok"),
                    }
                )
        return out

    def console(self, state: str = "", calling_ae: str = "", limit: int = 50) -> dict[str, Any]:
        """What the status page lists beside the counts: recent studies (filtered by state and
        calling AE), failures, quarantined objects, dead letters and peers. Study UIDs are
        shortened and no patient data is read."""
        studies = [
            {
                "study": short_uid(r.study_uid),
                "calling_ae": r.calling_ae,
                "modality": ", ".join(modality_of(c) for c in r.sop_classes),
                "instances": r.instances,
                "received_at": r.received_at,
                "updated_at": r.updated_at,
                "state": r.state,
                "reason": r.reason,
                "findings": r.summary,
                "deliveries": {"queued": r.queued, "delivered": r.delivered, "dead": r.dead},
            }
            for r in self.state.recent_studies(limit, state=state, calling_ae=calling_ae)
        ]
        dead = [
            {
                "id": i.id,
                "study": short_uid(i.study_uid),
                "object": short_uid(i.sop_instance_uid),
                "destination": i.destination,
                "attempts": i.attempts,
                "error": i.last_error,
            }
            for i in self.state.outbox("dead")
        ][:limit]
        return {
            "filters": {
                "state": state,
                "calling_ae": calling_ae,
                "states": list(STUDY_STATES),
                "calling_aes": self.state.calling_aes(),
            },
            "studies": studies,
            "failures": [
                {"study": short_uid(r.study_uid), "calling_ae": r.calling_ae, "reason": r.reason}
                for r in self.state.recent_studies(limit, state="failed")
            ],
            "quarantine": quarantine_entries(self.spool.quarantine_dir, limit),
            "dead_letters": dead,
            "peers": self.peers(),
        }

    def resend(self, item_ids: list[int]) -> int:
        """Queue dead letters again (the status page's button); how many were."""
        n = self.state.resend(item_ids)
        if n:
            self.audit.record("resend", items=item_ids, by="status page")
            self.outbox.wake()
        return n

    def _retain(self) -> None:
        """The retention sweeper: a first sweep soon after start, then every interval_s. A
        sweep that fails is logged (its type and where) and the next one runs on time."""
        delay = min(5.0, self.config.retention.interval_s)
        while not self._stop.wait(delay):
            try:
                self.sweeper.sweep()
            except Exception as exc:  # keep sweeping; the disk's problems are the operator's
                log.error("retention sweep failed: %s", describe(exc))
            delay = self.config.retention.interval_s

    def _work(self) -> None:
        while True:
            study = self._queue.get()
            if study is None or self._stop.is_set():
                return
            with self._busy_lock:
                if study in self._busy:  # completed again while a worker analyses it
                    self._again.add(study)
                    continue
                self._busy.add(study)
            try:
                self._analyse(study)
            finally:
                with self._busy_lock:
                    self._busy.discard(study)
                    if study in self._again:
                        self._again.discard(study)
                        self._queue.put(study)

    def _check_languages(self) -> None:
        """Each peer's report language, loaded now (a missing file is a ConfigError at start,
        not a failure per study), with a warning at start where its texts reach a reader
        unchecked: a language file nobody has reviewed for medical terms (empty
        ``reviewed_by``), a peer sent Secondary Captures whose language no installed font draws
        (they carry English alone), or a model whose sidecar has no intended use in that
        language (its reports to the peer state it in English only)."""
        warned: set[str] = set()
        for peer in self.config.peers:
            if not peer.language:
                continue
            language = load_language(peer.language)
            if "sc" in peer.objects and language.tag != "en" and language.burn_font() is None:
                log.warning(
                    "no font for %r is installed (burn_fonts in pacs_bridge/languages/%s.toml, "
                    "looked for under %s): the Secondary Captures for peer %s carry English "
                    "alone; install one of %s",
                    language.tag,
                    language.tag,
                    ", ".join(str(d) for d in languages.FONT_DIRS),
                    peer.ae_title,
                    ", ".join(language.burn_fonts) or "(none named)",
                )
            if language.tag in warned:
                continue
            warned.add(language.tag)
            if not language.reviewed_by.strip():
                log.warning(
                    "report language %r (pacs_bridge/languages/%s.toml, used for peer %s) has "
                    "not been reviewed for medical terms (reviewed_by is empty): have a "
                    "radiologist who reads %s review it and sign reviewed_by before clinical use",
                    language.tag,
                    language.tag,
                    peer.ae_title,
                    language.name,
                )
            for model in self.models:
                if not model.algorithm.intended_use_in(language.tag):
                    log.warning(
                        "model %s has no intended use in %r ([model.intended_use] %s in its "
                        "nidaan.toml): its reports to peer %s state it in English only",
                        model.name,
                        language.tag,
                        language.tag,
                        peer.ae_title,
                    )

    def _analyse(self, study: str) -> None:
        """Analyse one study; failures leave it waiting (backend down) or visibly failed."""
        started = time.monotonic()
        try:
            self.studies.report_study(study)
        except InferenceError as exc:
            # The backend (e.g. a Triton cluster) is down: the study waits, it is not lost.
            self.state.set_study_state(study, "complete", f"waiting for inference: {exc}")
            log.warning(
                "study %s waits for the inference backend (retry in %.0f s): %s",
                ref(study),
                INFERENCE_RETRY_S,
                exc,
            )
            timer = threading.Timer(INFERENCE_RETRY_S, self._queue.put, args=(study,))
            timer.daemon = True
            timer.start()
        except NidaanError as exc:
            self._fail(study, str(exc))
        except Exception as exc:  # keep serving; the study is visibly failed
            log.exception("analysing study %s failed", ref(study))
            self._fail(study, f"internal error: {type(exc).__name__}: {exc}")
        self.metrics.analysis_seconds.observe(time.monotonic() - started)

    def _fail(self, study_uid: str, reason: str) -> None:
        self.state.set_study_state(study_uid, "failed", reason)
        self.metrics.studies.labels("failed").inc()
        log.error("study %s failed: %s", ref(study_uid), reason)


def _why(exc: OSError) -> str:
    """An OSError's reason alone ("Address already in use"), without what Python adds to it
    ("(while attempting to bind on address ...)")."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
