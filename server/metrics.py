"""Prometheus metrics. Labels carry statuses and model names, never patient data.

Drift and feedback (docs/governance.md): each analysed image's probability per model and
finding (a histogram) and whether the finding was present (counters), labelled by model,
finding and modality only; radiologists' verdicts by model, finding and verdict. Never a patient,
a study or a UID: those would make a series per study, and name them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector

#: Buckets of ``nidaan_finding_probability``: twentieths of [0, 1].
PROBABILITY_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))
#: A finding's verdicts (``nidaan_feedback_total``).
VERDICTS = ("agree", "disagree")

#: The stages ``nidaan_stage_seconds`` times.
STAGES = ("receive", "decode", "preprocess", "queue", "inference", "report", "delivery")


class Metrics:
    """The server's metrics, in their own registry (so tests can run several servers)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # python_gc_*: collections per generation and what they found (core.heap settles the
        # serving process so that, under load, these stay still).
        GCCollector(registry=self.registry)
        self.instances = Counter(
            "nidaan_instances_received",
            "C-STORE requests answered, by status",
            ["status"],
            registry=self.registry,
        )
        self.images_failed = Counter(
            "nidaan_images_failed",
            "Acknowledged images that could not be decoded or preprocessed at analysis",
            registry=self.registry,
        )
        self.result_objects_failed = Counter(
            "nidaan_result_objects_failed",
            "Region objects (SEG, GSPS, SC) a study's images could not make; its SR still goes",
            ["kind"],
            registry=self.registry,
        )
        self.associations_rejected = Counter(
            "nidaan_associations_rejected",
            "Associations refused (A-ASSOCIATE-RJ), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.studies = Counter(
            "nidaan_studies",
            "Studies that reached a final state, by state",
            ["state"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "nidaan_report_deliveries",
            "Report delivery attempts, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.storage_bytes = Gauge(
            "nidaan_storage_bytes",
            "Bytes each area of the data dir holds (spool, reports, quarantine, audit), as of "
            "the last retention sweep",
            ["area"],
            registry=self.registry,
        )
        self.storage_free_bytes = Gauge(
            "nidaan_storage_free_bytes",
            "Free bytes on the data dir's file system, as of the last retention sweep",
            registry=self.registry,
        )
        self.pruned_bytes = Counter(
            "nidaan_pruned_bytes",
            "Bytes the retention sweeper removed, by area",
            ["area"],
            registry=self.registry,
        )
        self.pruned_studies = Counter(
            "nidaan_pruned_studies",
            "Finished studies whose instances the retention sweeper removed from the spool",
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "nidaan_stage_seconds",
            "Time spent in each stage: receive (one C-STORE, to its answer), decode and "
            "preprocess (one image), queue and inference (one batch), report (a study's "
            "results written), delivery (one object sent to one destination)",
            ["stage"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        self.outbox_items = Gauge(
            "nidaan_outbox_items",
            "Result deliveries in the outbox, by state (queued, delivered, dead)",
            ["state"],
            registry=self.registry,
        )
        self.quarantined = Gauge(
            "nidaan_quarantine_entries",
            "Refused or unusable objects kept in the quarantine (with their reasons)",
            registry=self.registry,
        )
        self.analysis_seconds = Histogram(
            "nidaan_study_analysis_seconds",
            "Time to analyse a complete study and write its report",
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "nidaan_grpc_requests",
            "gRPC calls answered, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_admission_waits = Counter(
            "nidaan_grpc_admission_waits",
            "gRPC calls that waited for room in grpc.max_inflight_mb, by outcome "
            "(admitted, refused: RESOURCE_EXHAUSTED, cancelled)",
            ["outcome"],
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "nidaan_inference_batch_images",
            "Images per batch the embedded batcher ran, by model",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "nidaan_inference_queue_seconds",
            "Time the oldest request of a batch waited in its model's queue, by model",
            ["model"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=self.registry,
        )

        self.finding_probability = Histogram(
            "nidaan_finding_probability",
            "Each analysed image's probability of a finding, by model, finding and modality "
            "(drift: compare the distribution with the model card's)",
            ["model", "finding", "modality"],
            buckets=PROBABILITY_BUCKETS,
            registry=self.registry,
        )
        self.findings_analysed = Counter(
            "nidaan_findings_analysed",
            "Images a model analysed for a finding, by model, finding and modality",
            ["model", "finding", "modality"],
            registry=self.registry,
        )
        self.findings_present = Counter(
            "nidaan_findings_present",
            "Images where a finding was present (probability at or above the threshold in "
            "force), by model, finding and modality: present-rate = present / analysed",
            ["model", "finding", "modality"],
            registry=self.registry,
        )
        self.feedback = Counter(
            "nidaan_feedback",
            "Radiologists' verdicts on findings (gRPC RecordFeedback or a verified SR), by "
            "model, finding and verdict (agree, disagree)",
            ["model", "finding", "verdict"],
            registry=self.registry,
        )

    def observe_finding(
        self, model: str, finding: str, modality: str, probability: float, present: bool
    ) -> None:
        """One image's result for one finding of one model."""
        labels = (model, finding, modality)
        self.finding_probability.labels(*labels).observe(probability)
        self.findings_analysed.labels(*labels).inc()
        present_total = self.findings_present.labels(*labels)
        if present:
            present_total.inc()

    def observe_batch(self, model: str, images: int, queued_s: float, ran_s: float) -> None:
        """The embedded batcher's observer: one batch of ``images`` ran for ``model`` in
        ``ran_s`` after its oldest request waited ``queued_s``."""
        self.batch_images.labels(model).observe(images)
        self.queue_seconds.labels(model).observe(queued_s)
        self.stage("queue", queued_s)
        self.stage("inference", ran_s)

    def stage(self, stage: str, seconds: float) -> None:
        """One pass through a stage of the pipeline (``STAGES``)."""
        self.stage_seconds.labels(stage).observe(seconds)

    def storage(
        self, sizes: Mapping[str, int], free: int, removed: Mapping[str, int], studies_pruned: int
    ) -> None:
        """Record a retention sweep: each area's size, the free space, what was removed."""
        for area, size in sizes.items():
            self.storage_bytes.labels(area).set(size)
        self.storage_free_bytes.set(free)
        for area, n in removed.items():
            if n:
                self.pruned_bytes.labels(area).inc(n)
        if studies_pruned:
            self.pruned_studies.inc(studies_pruned)

    def watch_outbox(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Export the outbox's deliveries by state, read at each scrape."""
        for state in ("queued", "delivered", "dead"):
            self.outbox_items.labels(state).set_function(
                lambda state=state: float(counts().get(state, 0))  # type: ignore[misc]
            )

    def watch_quarantine(self, entries: Callable[[], int]) -> None:
        """Export how many entries the quarantine holds, counted at each scrape."""
        self.quarantined.set_function(lambda: float(entries()))

    def watch_grpc_inflight(self, in_flight: Callable[[], float], limit: float) -> None:
        """Export the bytes gRPC calls hold now (and the limit, grpc.max_inflight_mb)."""
        gauge = Gauge(
            "nidaan_grpc_inflight_bytes",
            "Bytes gRPC calls hold while their instances are read, decoded and preprocessed",
            registry=self.registry,
        )
        gauge.set_function(in_flight)
        Gauge(
            "nidaan_grpc_inflight_limit_bytes",
            "grpc.max_inflight_mb, in bytes",
            registry=self.registry,
        ).set(limit)

    def watch_batcher(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """Export the embedded batcher's counters (``DynamicBatcher.stats``) at each scrape."""
        self.registry.register(_BatcherCollector(stats))


class _BatcherCollector(Collector):
    """The batcher's per-model counters, named after Triton's (inference vs execution count)."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        families = [
            (
                CounterMetricFamily,
                "nidaan_inference_images",
                "Images run by the embedded backend, by model",
                "inference_count",
            ),
            (
                CounterMetricFamily,
                "nidaan_inference_batches",
                "Batches run by the embedded backend, by model",
                "execution_count",
            ),
            (
                CounterMetricFamily,
                "nidaan_inference_rejected",
                "Requests refused because the model's queue stayed full, by model",
                "rejected",
            ),
            (
                GaugeMetricFamily,
                "nidaan_inference_queued_images",
                "Images waiting in the model's queue",
                "queued_images",
            ),
        ]
        for kind, name, doc, attr in families:
            family = kind(name, doc, labels=["model"])
            for model, s in stats.items():
                family.add_metric([model], getattr(s, attr))
            yield family
