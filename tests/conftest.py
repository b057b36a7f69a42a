"""Shared fixtures: configs on free ports, an in-process Nidaan server, the model repository."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nidaan.server.config import Config, Peer, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def make_config(
    tmp_path: Path,
    *,
    peers: list[Peer] | None = None,
    destinations: list[str] | None = None,
    idle_timeout_s: float = 2.0,
    retry_initial_s: float = 0.2,
    retry_max_s: float = 1.0,
) -> Config:
    """A config on an ephemeral DICOM port, with its own data dir."""
    cfg = load_config(None, environ={})
    cfg.dicom.port = 0
    cfg.dicom.bind = "127.0.0.1"
    cfg.dicom.study_idle_timeout_s = idle_timeout_s
    cfg.dicom.network_timeout_s = 5.0
    cfg.grpc.port = 0
    cfg.grpc.bind = "127.0.0.1"
    cfg.storage.data_dir = tmp_path / "data"
    cfg.models.repository = MODELS
    cfg.peers = list(peers or [])
    if destinations is not None:
        cfg.reports.destinations = destinations
    cfg.reports.retry_initial_s = retry_initial_s
    cfg.reports.retry_max_s = retry_max_s
    cfg.validate()
    return cfg


@pytest.fixture
def start_server():  # type: ignore[no-untyped-def]
    """Start in-process servers with ``start_server(config)``; all are stopped at the end."""
    from nidaan.server.app import NidaanServer

    servers: list[NidaanServer] = []

    def _start(config: Config) -> NidaanServer:
        server = NidaanServer(config)
        server.start(http=False)
        servers.append(server)
        return server

    yield _start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def repository() -> Iterator[list]:
    from nidaan.server.model_repository import load_repository

    yield load_repository(MODELS)
