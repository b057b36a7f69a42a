"""Inference backends. The embedded default runs ONNX Runtime in this process.

A backend takes a model from the repository and a float32 NCHW batch and returns the model's
named outputs. Batches larger than the model's ``max_batch_size`` (config.pbtxt) are split.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .config import InferenceConfig
from .errors import InferenceError
from .model_repository import ModelSpec


class InferenceBackend(Protocol):
    """What the pipeline needs from a backend."""

    def infer(self, model: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``model`` on ``batch`` and return its outputs by name."""
        ...

    def close(self) -> None:
        """Release sessions and connections."""
        ...


def onnxruntime_providers(device: str) -> list[str]:
    """Execution providers for ``device`` (auto: CUDA when ONNX Runtime can use a GPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise InferenceError(
            "inference.device is 'cuda' but ONNX Runtime has no CUDA provider "
            "(install onnxruntime-gpu)"
        )
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """ONNX Runtime in process, one session per model, created on first use."""

    def __init__(self, config: InferenceConfig | None = None) -> None:
        self.config = config or InferenceConfig()
        self.providers = onnxruntime_providers(self.config.device)
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _session(self, model: ModelSpec) -> Any:
        import onnxruntime as ort

        with self._lock:
            sess = self._sessions.get(model.name)
            if sess is None:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.config.intra_op_threads or (os.cpu_count() or 1)
                opts.inter_op_num_threads = 1
                try:
                    sess = ort.InferenceSession(
                        str(model.onnx_path), sess_options=opts, providers=self.providers
                    )
                except Exception as exc:
                    raise InferenceError(f"model {model.name!r} does not load: {exc}") from exc
                self._sessions[model.name] = sess
            return sess

    def infer(self, model: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        sess = self._session(model)
        names = [model.probabilities_output] + (
            [model.heatmap_output] if model.heatmap_output else []
        )
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        step = model.max_batch_size
        for start in range(0, batch.shape[0], step):
            try:
                outs = sess.run(names, {model.input.name: batch[start : start + step]})
            except Exception as exc:
                raise InferenceError(f"model {model.name!r} failed: {exc}") from exc
            for n, o in zip(names, outs, strict=True):
                parts[n].append(np.asarray(o))
        return {n: np.concatenate(p) for n, p in parts.items()}

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()


class TritonBackend:
    """NVIDIA Triton over gRPC (``inference.backend = "triton"``), serving the same repository.

    At start it checks that Triton is ready and serves every model with the input and outputs the
    repository declares, so a mismatch is an error at start rather than at the first study.
    """

    def __init__(self, config: InferenceConfig, models: Sequence[ModelSpec]) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self._grpc = grpcclient
        self._error = InferenceServerException
        self.url = config.triton_url
        self.timeout_s = config.triton_timeout_s
        self._local = threading.local()
        self.client = self._client()
        try:
            ready = self.client.is_server_ready(client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise InferenceError(f"Triton at {self.url} is not reachable: {exc}") from exc
        if not ready:
            raise InferenceError(f"Triton at {self.url} is not ready")
        for m in models:
            self._check(m)

    def _client(self) -> Any:
        """This thread's client: tritonclient's clients are not to be shared between threads."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._grpc.InferenceServerClient(self.url)
            self._local.client = client
        return client

    def _check(self, model: ModelSpec) -> None:
        try:
            if not self.client.is_model_ready(model.name, client_timeout=self.timeout_s):
                raise InferenceError(f"Triton at {self.url} does not serve model {model.name!r}")
            meta = self.client.get_model_metadata(
                model.name, as_json=True, client_timeout=self.timeout_s
            )
        except self._error as exc:
            raise InferenceError(f"Triton metadata for {model.name!r}: {exc}") from exc
        inputs = {i["name"]: [int(d) for d in i["shape"]] for i in meta["inputs"]}
        expected = [model.input.channels, model.input.height, model.input.width]
        if inputs.get(model.input.name, [None])[1:] != expected:
            raise InferenceError(
                f"Triton's {model.name!r} takes {inputs}, the repository says "
                f"{model.input.name} {expected}"
            )
        outputs = {o["name"] for o in meta["outputs"]}
        for name in (model.probabilities_output, model.heatmap_output):
            if name is not None and name not in outputs:
                raise InferenceError(f"Triton's {model.name!r} has no output {name!r}")

    def infer(self, model: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [model.probabilities_output] + (
            [model.heatmap_output] if model.heatmap_output else []
        )
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, batch.shape[0], model.max_batch_size):
            chunk = np.ascontiguousarray(batch[start : start + model.max_batch_size], np.float32)
            tensor = self._grpc.InferInput(model.input.name, list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            wanted = [self._grpc.InferRequestedOutput(n) for n in names]
            try:
                result = self._client().infer(
                    model.name, [tensor], outputs=wanted, client_timeout=self.timeout_s
                )
            except self._error as exc:
                raise InferenceError(f"Triton at {self.url} failed {model.name!r}: {exc}") from exc
            for n in names:
                parts[n].append(result.as_numpy(n))
        return {n: np.concatenate(p) for n, p in parts.items()}

    def close(self) -> None:
        self.client.close()


def create_backend(config: InferenceConfig, models: Sequence[ModelSpec] = ()) -> InferenceBackend:
    """The backend the config asks for."""
    if config.backend == "onnxruntime":
        return OnnxRuntimeBackend(config)
    if config.backend == "triton":
        return TritonBackend(config, models)
    raise InferenceError(f"inference backend {config.backend!r} is not available in this build")
