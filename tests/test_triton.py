"""The Triton backend against a real tritonserver (nvidia-pytriton's build, Python backend running
the same ONNX files): the same findings as the embedded backend, and batches formed by Triton."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nidaan.core.config import InferenceConfig
from nidaan.core.errors import InferenceError
from nidaan.server.inference import OnnxRuntimeBackend, TritonBackend
from nidaan.server.pipeline import Pipeline

from conftest import MODELS
from factory import synthetic_ct_series, synthetic_cxr
from peers import Triton, free_port, start_triton, stop


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    server = start_triton(tmp_path_factory.mktemp("triton"), MODELS)
    yield server
    stop(server.process, signal.SIGINT)


@pytest.mark.parametrize("shared_memory", ["auto", "none"])
def test_same_findings_through_triton_and_the_embedded_backend(
    triton: Triton, repository, shared_memory: str
) -> None:  # type: ignore[no-untyped-def]
    cfg = InferenceConfig(
        backend="triton", triton_url=triton.url, triton_shared_memory=shared_memory
    )
    remote = TritonBackend(cfg, repository)
    # Triton on loopback: inputs go through registered system shared memory unless told not to.
    assert remote.shared_memory == ([] if shared_memory == "none" else ["system"])
    cr = [synthetic_cxr(900 + i, nodule=i % 2 == 0)[0] for i in range(5)]
    ct, _ = synthetic_ct_series(900, (1,), slices=3, size=256)
    images = cr + ct
    try:
        embedded = Pipeline(repository, OnnxRuntimeBackend()).analyse(images)
        served = Pipeline(repository, remote).analyse(images)
    finally:
        remote.close()
    assert len(embedded) == len(served) == 8
    assert {a.algorithm.name for a in served} == {m.algorithm.name for m in repository}
    for a, b in zip(embedded, served, strict=True):
        assert a.source.SOPInstanceUID == b.source.SOPInstanceUID
        assert [f.label for f in a.findings] == [f.label for f in b.findings]
        np.testing.assert_allclose(
            [f.probability for f in a.findings], [f.probability for f in b.findings], atol=1e-5
        )
        assert [f.present for f in a.findings] == [f.present for f in b.findings]
        assert [f.region for f in a.findings] == [f.region for f in b.findings]


def test_shared_memory_regions_are_registered_while_in_use_and_released(
    triton: Triton, repository
) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.url)

    def ours() -> set[str]:
        status = client.get_system_shared_memory_status(as_json=True)
        return {r["name"] for r in status.get("regions", {}).values() if "nidaan_" in r["name"]}

    remote = TritonBackend(InferenceConfig(backend="triton", triton_url=triton.url), repository)
    try:
        registered = ours()
        assert len(registered) == TritonBackend.REGIONS * len(repository)
        model = next(m for m in repository if m.name == "cxr_screen")
        out = remote.infer(model, np.zeros((3, 1, 256, 256), np.float32))
        assert out["probabilities"].shape == (3, 2)
    finally:
        remote.close()
    assert ours() == set()


def test_triton_batches_concurrent_requests(triton: Triton, repository) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    model = next(m for m in repository if m.name == "cxr_screen")
    client = grpcclient.InferenceServerClient(triton.url)

    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics(model.name, as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    before = counts()
    backend = TritonBackend(InferenceConfig(backend="triton", triton_url=triton.url), repository)
    one = np.zeros((1, 1, 256, 256), np.float32)
    threads = [threading.Thread(target=backend.infer, args=(model, one)) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inferences, executions = (a - b for a, b in zip(counts(), before, strict=True))
    assert inferences == 32
    assert executions < inferences, "Triton ran every request alone: no dynamic batching"


def test_triton_down_is_a_clear_error(repository) -> None:  # type: ignore[no-untyped-def]
    cfg = InferenceConfig(
        backend="triton", triton_url=f"127.0.0.1:{free_port()}", triton_timeout_s=2.0
    )
    with pytest.raises(InferenceError, match="not reachable"):
        TritonBackend(cfg, repository)


def test_triton_without_the_model_is_refused_at_start(
    tmp_path: Path, triton: Triton, repository
) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    renamed = [dataclasses.replace(m, name="not_served") for m in repository]
    with pytest.raises(InferenceError, match="does not serve model 'not_served'"):
        TritonBackend(InferenceConfig(backend="triton", triton_url=triton.url), renamed)


def test_doctor_checks_the_configured_triton(tmp_path: Path, triton: Triton) -> None:
    import subprocess

    from peers import NIDAAN

    def doctor(url: str) -> subprocess.CompletedProcess:
        config = tmp_path / f"{url.replace(':', '_')}.toml"
        config.write_text(
            f'[models]\nrepository = "{MODELS}"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'
            f'[inference]\nbackend = "triton"\ntriton_url = "{url}"\ntriton_timeout_s = 5.0\n'
        )
        return subprocess.run(
            [str(NIDAAN), "--config", str(config), "doctor"],
            capture_output=True,
            text=True,
            timeout=120,
        )

    up = doctor(triton.url)
    assert f"[ok] Triton at {triton.url} serves all 2 model(s); shared memory: system" in up.stdout
    down = doctor(f"127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "[FAIL] Triton at 127.0.0.1:" in down.stdout and "not reachable" in down.stdout
