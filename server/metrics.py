"""Prometheus metrics. Labels carry statuses and model names, never patient data."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    """The server's metrics, in their own registry (so tests can run several servers)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter(
            "nidaan_instances_received",
            "C-STORE requests answered, by status",
            ["status"],
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
        self.analysis_seconds = Histogram(
            "nidaan_study_analysis_seconds",
            "Time to analyse a complete study and write its report",
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

    def observe_batch(self, model: str, images: int, queued_s: float) -> None:
        """The embedded batcher's observer: one batch of ``images`` ran for ``model``."""
        self.batch_images.labels(model).observe(images)
        self.queue_seconds.labels(model).observe(queued_s)
