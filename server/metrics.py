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
