"""Inference backends. The embedded default runs ONNX Runtime in this process.

A backend takes a model from the repository and a float32 NCHW batch and returns the model's
named outputs. Batches larger than the model's ``max_batch_size`` (config.pbtxt) are split.
"""

from __future__ import annotations

import os
import threading
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


def create_backend(config: InferenceConfig) -> InferenceBackend:
    """The backend the config asks for."""
    if config.backend == "onnxruntime":
        return OnnxRuntimeBackend(config)
    raise InferenceError(f"inference backend {config.backend!r} is not available in this build")
