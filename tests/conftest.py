"""Shared fixtures: configs on free ports, an in-process Nidaan server, the model repository, and a
test PKI (openssl) for DICOM and gRPC TLS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nidaan.core.config import Config, Peer, load_config  # noqa: E402

from peers import need  # noqa: E402

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


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run([need("openssl"), *args], cwd=cwd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _self_signed(name: str, subject: str, cwd: Path) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", subject),
        cwd=cwd,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a certificate for Nidaan and one for the peer (127.0.0.1), and a stranger's."""
    d = tmp_path_factory.mktemp("pki")
    _self_signed("ca", "/CN=Nidaan test CA", d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("nidaan", "peer"):
        _openssl(
            *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key"),
            *("-out", f"{name}.csr", "-subj", f"/CN={name}"),
            cwd=d,
        )
        _openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext"),
            cwd=d,
        )
    _self_signed("stranger", "/CN=stranger", d)
    return d
