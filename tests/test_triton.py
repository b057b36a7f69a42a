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
from nidaan.server.model_repository import ModelSpec
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


def _ours(url: str) -> set[str]:
    """The names of Nidaan's system shared-memory regions that Triton has registered."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        status = client.get_system_shared_memory_status(as_json=True)
    finally:
        client.close()
    return {r["name"] for r in status.get("regions", {}).values() if "nidaan_" in r["name"]}


def _shm_files(names: set[str]) -> set[str]:
    """Which of these regions still have their POSIX shared memory in /dev/shm."""
    return {n for n in names if Path("/dev/shm", n).exists()}


def _distinct_images(model: ModelSpec, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (1, model.input.channels, model.input.height, model.input.width)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(n)]


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(want), what
    for name in want:
        assert got[name].shape == want[name].shape, f"{what}: {name}"
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=f"{what}: {name}")


def test_shared_memory_regions_grow_with_concurrency_and_are_released(
    triton: Triton, repository
) -> None:  # type: ignore[no-untyped-def]
    remote = TritonBackend(InferenceConfig(backend="triton", triton_url=triton.url), repository)
    model = next(m for m in repository if m.name == "cxr_screen")
    try:
        # One region per model at start (shared memory that cannot work fails at start)...
        at_start = _ours(triton.url)
        assert len(at_start) == len(repository)
        assert remote.regions(model) == 1
        # ...and one per request in flight once several are: 8 callers at once.
        barrier = threading.Barrier(8)

        def call() -> None:
            barrier.wait()
            out = remote.infer(model, np.zeros((3, 1, 256, 256), np.float32))
            assert out["probabilities"].shape == (3, 2)
            assert out["heatmap"].shape == (3, 2, 32, 32)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        registered = _ours(triton.url)
        assert 1 < remote.regions(model) <= 8
        assert len(registered) == remote.regions(model) + 1  # plus ct_nodule's one
        assert _shm_files(registered) == registered
    finally:
        remote.close()
    assert _ours(triton.url) == set()
    assert _shm_files(registered) == set(), "shared memory left behind in /dev/shm"


@pytest.mark.parametrize("max_regions", [None, 2])
def test_concurrent_requests_each_get_their_own_results(
    triton: Triton, repository, max_regions: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """16 callers at once, each with its own image, 4 rounds: every caller gets the outputs of
    its own image. Two requests sharing a region would read (or send) each other's tensors.
    With at most 2 regions, the requests beyond them go in the gRPC message."""
    if max_regions is not None:
        monkeypatch.setattr(TritonBackend, "MAX_REGIONS", max_regions)
    model = next(m for m in repository if m.name == "cxr_screen")
    callers = 16
    embedded = OnnxRuntimeBackend()
    rounds = [_distinct_images(model, callers, seed) for seed in range(4)]
    expected = [[embedded.infer(model, x) for x in images] for images in rounds]
    probabilities = [e["probabilities"].tobytes() for e in expected[0]]
    assert len(set(probabilities)) == callers, "the images must give distinct outputs"
    remote = TritonBackend(
        InferenceConfig(backend="triton", triton_url=triton.url, triton_shared_memory="system"),
        [model],
    )
    got: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(callers)

    def caller(k: int) -> None:
        try:
            for r, images in enumerate(rounds):
                barrier.wait()  # all 16 in flight together, every round
                got[(r, k)] = remote.infer(model, images[k])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    try:
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        regions = remote.regions(model)
    finally:
        remote.close()
    assert not errors, errors
    assert regions > 1 if max_regions is None else regions <= max_regions
    for r, want in enumerate(expected):
        for k in range(callers):
            _assert_same(got[(r, k)], want[k], f"round {r}, caller {k}")


@pytest.mark.parametrize("shared_memory", ["system", "none"])
def test_a_batch_larger_than_max_batch_size_comes_back_whole_and_in_order(
    triton: Triton, repository, shared_memory: str
) -> None:  # type: ignore[no-untyped-def]
    model = next(m for m in repository if m.name == "cxr_screen")
    batch = np.concatenate(_distinct_images(model, 2 * model.max_batch_size + 5, seed=7))
    want = OnnxRuntimeBackend().infer(model, batch)
    remote = TritonBackend(
        InferenceConfig(
            backend="triton", triton_url=triton.url, triton_shared_memory=shared_memory
        ),
        [model],
    )
    try:
        got = remote.infer(model, batch)  # three chunks, all in flight at once
        regions = remote.regions(model)
    finally:
        remote.close()
    assert regions == (3 if shared_memory == "system" else 0)
    _assert_same(got, want, f"{batch.shape[0]} images, shared memory {shared_memory}")


def test_regions_that_triton_forgot_are_registered_again(triton: Triton, repository) -> None:  # type: ignore[no-untyped-def]
    """A Triton restart, or a client unregistering every region (perf_analyzer does, at its
    start and end), leaves Triton without our regions: requests still succeed."""
    import tritonclient.grpc as grpcclient

    model = next(m for m in repository if m.name == "cxr_screen")
    image = _distinct_images(model, 1, seed=11)[0]
    want = OnnxRuntimeBackend().infer(model, image)
    remote = TritonBackend(
        InferenceConfig(backend="triton", triton_url=triton.url, triton_shared_memory="system"),
        [model],
    )
    other = grpcclient.InferenceServerClient(triton.url)
    try:
        _assert_same(remote.infer(model, image), want, "before")
        registered = _ours(triton.url)
        other.unregister_system_shared_memory()  # no name: every region on the server
        assert _ours(triton.url) == set()
        _assert_same(remote.infer(model, image), want, "after Triton forgot the region")
        assert _ours(triton.url) == registered
    finally:
        other.close()
        remote.close()


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
