"""The inference backend a configuration asks for (the one place that knows them all).

``inference`` holds the engines (ONNX Runtime in process, Triton) and ``batching`` the embedded
dynamic batcher in front of an engine; this module, above both, picks and assembles them, so
neither of those two imports the other upward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nidaan.core.config import InferenceConfig
from nidaan.core.errors import InferenceError

from .batching import DynamicBatcher
from .inference import InferenceBackend, OnnxRuntimeBackend, TritonBackend
from .model_repository import ModelSpec


def create_backend(
    config: InferenceConfig,
    models: Sequence[ModelSpec] = (),
    observe: Callable[[str, int, float, float], None] | None = None,
) -> InferenceBackend:
    """The backend the config asks for. The embedded one batches concurrent requests per model
    as its config.pbtxt says (Triton batches on its side)."""
    if config.backend == "onnxruntime":
        return DynamicBatcher(
            OnnxRuntimeBackend(config),
            models,
            default_queue_images=config.max_queue_images,
            queue_timeout_s=config.queue_timeout_s,
            observe=observe,
        )
    if config.backend == "triton":
        return TritonBackend(config, models)
    raise InferenceError(f"inference backend {config.backend!r} is not available in this build")
