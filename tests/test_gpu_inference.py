"""The GPU inference paths, on a machine with a GPU: kernels' output bound into ONNX Runtime's CUDA
execution provider without a host round trip, and sent to Triton through CUDA shared memory.

Skipped (with the reason) where there is no GPU, CuPy or onnxruntime-gpu: this project's CI
machine has none. ``scripts/gpu_check.sh`` installs what these tests need and runs them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import pytest

from nidaan.core.config import InferenceConfig
from nidaan.kernels.preprocess import cuda_available
from nidaan.server.inference import OnnxRuntimeBackend, TritonBackend, is_device_array
from nidaan.server.pipeline import Pipeline

from conftest import MODELS
from factory import synthetic_ct_series, synthetic_cxr
from peers import Triton, start_triton, stop


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = [
    pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU (numba-cuda and CuPy)"),
]


def _images() -> list:
    cr = [synthetic_cxr(40 + i, nodule=i == 0, rows=900, columns=800)[0] for i in range(3)]
    ct, _ = synthetic_ct_series(40, (1,), slices=3, size=512)
    return cr + ct


def _same(a: list, b: list) -> None:  # type: ignore[type-arg]
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(
            [f.probability for f in x.findings], [f.probability for f in y.findings], atol=2e-3
        )
        assert [f.present for f in x.findings] == [f.present for f in y.findings]


@pytest.mark.skipif(not _cuda_provider(), reason="onnxruntime-gpu is not installed")
def test_gpu_tensors_are_bound_into_the_cuda_provider(repository) -> None:  # type: ignore[no-untyped-def]
    gpu = OnnxRuntimeBackend(InferenceConfig(device="cuda"))
    assert gpu.accepts_device_arrays
    pipeline = Pipeline(repository, gpu, kernel_backend="cuda")
    cr = synthetic_cxr(40, rows=900, columns=800)[0]
    prepared = pipeline.prepare(cr)
    assert all(is_device_array(p.tensor) for p in prepared.values())  # never copied to the host
    on_gpu = pipeline.analyse(_images())
    on_cpu = Pipeline(
        repository, OnnxRuntimeBackend(InferenceConfig(device="cpu")), kernel_backend="cpu"
    ).analyse(_images())
    _same(on_gpu, on_cpu)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    server = start_triton(tmp_path_factory.mktemp("triton-gpu"), MODELS)
    yield server
    stop(server.process, signal.SIGINT)


def test_gpu_tensors_reach_a_local_triton_through_cuda_shared_memory(
    triton: Triton, repository
) -> None:  # type: ignore[no-untyped-def]
    remote = TritonBackend(
        InferenceConfig(backend="triton", triton_url=triton.url, triton_shared_memory="cuda"),
        repository,
    )
    try:
        assert remote.shared_memory == ["cuda"] and remote.accepts_device_arrays
        served = Pipeline(repository, remote, kernel_backend="cuda").analyse(_images())
    finally:
        remote.close()
    embedded = Pipeline(repository, OnnxRuntimeBackend(InferenceConfig(device="cpu"))).analyse(
        _images()
    )
    _same(served, embedded)


def test_sixteen_threads_each_get_their_own_tensors_from_the_gpu_executor() -> None:
    """As association threads, analysis workers and gRPC workers call it: every image's tensor
    from the shared executor equals the CPU kernels' for that image."""
    from concurrent.futures import ThreadPoolExecutor

    from nidaan.kernels import InputLayout, PixelTransform, preprocess, to_host

    rng = np.random.default_rng(9)
    layouts = [
        InputLayout(256, 256, "letterbox", 0.0, 0.5, 0.25),
        InputLayout(
            256, 256, "letterbox", 0.0, 0.5, 0.25, windows=((-600.0, 1500.0), (40.0, 400.0))
        ),
    ]
    jobs = []
    for k in range(64):
        h, w = int(rng.integers(200, 1200)), int(rng.integers(200, 1200))
        if k % 2:
            src = rng.integers(-1024, 2000, (h, w)).astype(np.int16)
            t = PixelTransform(slope=1.0, intercept=0.0, padding=(-1024, -1024))
        else:
            src = rng.integers(0, 4096, (h, w)).astype(np.uint16)
            t = PixelTransform(window_centre=float(rng.integers(500, 3500)), window_width=2000.0)
        jobs.append((src, t, layouts[k % 2]))

    def gpu(job):  # type: ignore[no-untyped-def]
        src, t, layout = job
        return to_host(preprocess([src], [t], layout, backend="cuda")[0])

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(gpu, jobs))
    for (src, t, layout), g in zip(jobs, got, strict=True):
        want, _ = preprocess([src], [t], layout, backend="cpu")
        np.testing.assert_allclose(g, want, atol=1e-4)
