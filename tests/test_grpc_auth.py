"""Bearer tokens (grpc.tokens_file) on a real server, and ``nidaan analyze --remote``, which calls
it with the bundled client and must print what the offline command prints."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from test_grpc_api import _bytes

from nidaan.client import Client
from nidaan.core.config import ConfigError, load_config
from nidaan.core.errors import NidaanError

from conftest import MODELS, make_config
from factory import sample_file, save, synthetic_ct_series, synthetic_cxr

NIDAAN = str(Path(sys.executable).parent / "nidaan")
TOKENS = ("k7Qm2vX9pL4sT8wZ1bN6cR3y", "second-token-for-the-gateway-0042")


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# integrators\n{TOKENS[0]}\n\n  {TOKENS[1]}  \n")
    return path


@pytest.fixture
def guarded(tmp_path: Path, tokens_file: Path, start_server):  # type: ignore[no-untyped-def]
    cfg = make_config(tmp_path)
    cfg.grpc.tokens_file = str(tokens_file)
    cfg.validate()
    return start_server(cfg)


def test_calls_need_one_of_the_tokens_and_probes_do_not(guarded, caplog) -> None:  # type: ignore[no-untyped-def]
    server = guarded
    caplog.set_level(logging.DEBUG)
    target = f"127.0.0.1:{server.api.port}"
    image = _bytes(synthetic_cxr(80, rows=300, columns=300)[0])
    wrong = TOKENS[0][:-1] + "X"  # one character off: no prefix of a token may pass
    for client in (Client(target), Client(target, token=wrong), Client(target, token="short")):
        with client:
            for call in (
                lambda c: c.analyze([image]),
                lambda c: c.analyze_study([image]),
                lambda c: c.list_models(),
                lambda c: c.get_study("1.2.3"),
            ):
                with pytest.raises(NidaanError, match="UNAUTHENTICATED"):
                    call(client)
            # Health checks stay open for load balancers' and orchestrators' probes.
            answer = health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest(service="nidaan.v1.Inference"), timeout=10
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with Client(target, token=TOKENS[1]) as client:  # any listed token
        assert len(client.analyze([image]).results) == 1
        assert len(client.analyze_study([image]).results) == 1
    channel = grpc.insecure_channel(target)  # "Basic" is not a bearer token, whatever follows
    call = channel.unary_unary("/nidaan.v1.Inference/ListModels")
    with pytest.raises(grpc.RpcError) as refused:
        call(b"", metadata=(("authorization", f"Basic {TOKENS[0]}"),), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'nidaan_grpc_requests_total{code="UNAUTHENTICATED",method="Analyze"} 3.0' in metrics
    assert 'nidaan_grpc_requests_total{code="OK",method="AnalyzeStudy"} 1.0' in metrics
    audit = (server.config.storage.data_dir / "audit.jsonl").read_text()
    codes = [json.loads(line)["code"] for line in audit.splitlines() if '"grpc"' in line]
    assert codes.count("UNAUTHENTICATED") == 13 and codes.count("OK") == 2
    for token in (*TOKENS, wrong):
        assert token not in audit and token not in caplog.text


def test_a_bad_tokens_file_stops_the_config_without_showing_a_token(tmp_path: Path) -> None:
    def load(text: str | None) -> None:
        path = tmp_path / "tokens"
        if text is not None:
            path.write_text(text)
        elif path.exists():
            path.unlink()
        (tmp_path / "c.toml").write_text(f'[grpc]\ntokens_file = "{path}"\n')
        load_config(tmp_path / "c.toml", environ={})

    with pytest.raises(ConfigError, match="grpc.tokens_file: cannot read"):
        load(None)
    with pytest.raises(ConfigError, match="holds no token"):
        load("# nothing but a comment\n\n")
    with pytest.raises(ConfigError, match="token 2 in .* shorter than 16") as short:
        load(f"{TOKENS[0]}\nhunter2\n")
    assert "hunter2" not in str(short.value)


def _analyze(*args: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NIDAAN, "--config", str(config), "analyze", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_analyze_remote_prints_what_analyze_prints(
    tmp_path: Path, guarded, tokens_file: Path
) -> None:  # type: ignore[no-untyped-def]
    server = guarded
    folder = tmp_path / "in"
    save(synthetic_cxr(81, nodule=True)[0], folder / "a-nodule.dcm")
    for i, ds in enumerate(synthetic_ct_series(82, (1,), slices=2, size=256)[0]):
        save(ds, folder / f"ct-{i}.dcm")
    (folder / "notes.txt").write_text("not dicom")
    files = [str(folder), str(sample_file("RG1_J2KR.dcm")), str(sample_file("MR_small.dcm"))]
    config = tmp_path / "c.toml"
    config.write_text(
        f'[models]\nrepository = "{MODELS}"\n[storage]\ndata_dir = "{tmp_path / "cli"}"\n'
    )
    local = _analyze("--json", *files, config=config)
    remote_args = ("--remote", f"127.0.0.1:{server.api.port}", "--token-file", str(tokens_file))
    remote = _analyze("--json", *remote_args, *files, config=config)
    assert local.returncode == remote.returncode == 1, remote.stderr  # notes.txt is not DICOM
    rows = [json.loads(line) for line in remote.stdout.splitlines()]
    assert len(rows) == 4  # the radiograph, two CT slices, the JPEG 2000 radiograph
    assert rows == [json.loads(line) for line in local.stdout.splitlines()]
    for out in (local.stderr, remote.stderr):
        assert "notes.txt: not a readable DICOM file" in out
        assert "MR_small.dcm: no model applies to this instance" in out
    text = _analyze(*remote_args, str(folder / "a-nodule.dcm"), config=config)
    assert text.returncode == 0
    assert text.stdout == _analyze(str(folder / "a-nodule.dcm"), config=config).stdout
    assert "PRESENT nodule" in text.stdout
    denied = _analyze("--remote", f"127.0.0.1:{server.api.port}", *files, config=config)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    assert TOKENS[0] not in denied.stderr + remote.stderr
