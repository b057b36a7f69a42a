"""Locust users for Nidaan's gRPC API: integrators sending radiographs and small CT studies.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/locust -f benchmarks/locustfile.py --host 127.0.0.1:50051

or headless, with a server started for you and a baseline measured in the same run:
``benchmarks/load.py``. Each request is one study (a 1024 x 1024 radiograph, or four 512 x 512
CT slices), drawn from a pool generated once per user process by the demo models' generator.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpcio cooperates with locust's gevent workers

from locust import User, constant, task  # noqa: E402

from nidaan.client import Client  # noqa: E402
from nidaan.core.errors import NidaanError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import MIX, ct_studies, radiograph_studies  # noqa: E402

# Made when locust loads this file, before its run-time clock starts.
STUDIES: dict[str, list[list[bytes]]] = {"radiograph": radiograph_studies(), "ct": ct_studies()}


class IntegratorUser(User):
    """Calls Analyze back to back (no think time): a saturation load."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.client = Client(self.host or "127.0.0.1:50051")
        self.turn = 0

    def on_stop(self) -> None:
        self.client.close()

    def _analyze(self, kind: str) -> None:
        studies = STUDIES[kind]
        study = studies[self.turn % len(studies)]
        self.turn += 1
        started = time.perf_counter()
        error: Exception | None = None
        length = 0
        try:
            length = self.client.analyze(study).ByteSize()
        except NidaanError as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"Analyze {kind}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    @task(MIX["radiograph"])
    def radiograph(self) -> None:
        self._analyze("radiograph")

    @task(MIX["ct"])
    def ct(self) -> None:
        self._analyze("ct")
