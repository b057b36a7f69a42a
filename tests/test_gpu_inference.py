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

from nidaan.kernels.preprocess import cuda_available
from nidaan.server.config import InferenceConfig
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
