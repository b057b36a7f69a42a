"""The embedded backend's dynamic batcher: requests from many studies and callers become batches.

It follows Triton's dynamic batcher, reading the same ``config.pbtxt`` settings, so a model
behaves alike in process and on Triton:

- requests (one study's images for one model, or one API call's) queue per model; a request is
  never split across batches unless it is larger than ``max_batch_size``;
- a batch goes at once when the queued requests fill ``max_batch_size`` or add up to one of the
  ``preferred_batch_size`` values; otherwise the oldest request waits at most
  ``max_queue_delay_microseconds`` for company, then whatever fits goes;
- ``instance_group`` ``count`` batches of one model run at the same time;
- ``default_queue_policy`` ``default_timeout_microseconds`` with ``timeout_action: REJECT``
  refuses a request that waited longer in the queue (QueueFullError), as Triton does;
- the queue is bounded (``default_queue_policy.max_queue_size`` images, else
  ``inference.max_queue_images``): a caller that finds it full waits up to
  ``inference.queue_timeout_s`` for room, then gets :class:`QueueFullError`. A DICOM study retries
  later (it is on disk); an API caller gets a "resource exhausted" answer. Memory stays bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nidaan.core.errors import InferenceError, QueueFullError

from .inference import InferenceBackend, concatenate, split_batch
from .model_repository import ModelSpec

log = logging.getLogger("nidaan.batching")

#: Called after each batch: model name, images in the batch, seconds its oldest request queued.
BatchObserver = Callable[[str, int, float, float], None]


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's requests are batched (from its config.pbtxt)."""

    max_batch_size: int
    preferred: tuple[int, ...]
    max_queue_delay_s: float
    max_queue_images: int
    instances: int
    dynamic: bool
    queue_timeout_s: float = 0.0

    @classmethod
    def of(cls, model: ModelSpec, default_queue_images: int) -> BatchPolicy:
        """The policy ``model``'s config.pbtxt asks for."""
        return cls(
            max_batch_size=model.max_batch_size,
            preferred=tuple(sorted(p for p in model.preferred_batch_sizes if p > 0)),
            max_queue_delay_s=model.max_queue_delay_us / 1e6,
            max_queue_images=model.max_queue_size or default_queue_images,
            instances=max(1, model.instance_count),
            dynamic=model.dynamic_batching,
            queue_timeout_s=model.queue_timeout_us / 1e6,
        )


@dataclass
class _Request:
    tensor: Any
    future: Future[dict[str, Any]] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return int(self.tensor.shape[0])


@dataclass
class ModelStats:
    """Counters in the shape of Triton's statistics API."""

    inference_count: int = 0  # images run
    execution_count: int = 0  # batches run
    rejected: int = 0  # requests refused because the queue stayed full
    queued_images: int = 0


class _ModelQueue:
    """One model's queue and the threads that turn it into batches."""

    def __init__(
        self,
        model: ModelSpec,
        policy: BatchPolicy,
        run: Callable[[ModelSpec, Any], dict[str, Any]],
        observe: BatchObserver | None,
    ) -> None:
        self.model = model
        self.policy = policy
        self._run = run
        self._observe = observe
        self._requests: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = ModelStats()
        self._threads = [
            threading.Thread(target=self._loop, name=f"nidaan-batch-{model.name}-{i}", daemon=True)
            for i in range(policy.instances)
        ]
        for t in self._threads:
            t.start()

    def submit(self, tensor: Any, timeout_s: float) -> Future[dict[str, Any]]:
        """Queue one request (at most ``max_batch_size`` images); waits for room up to
        ``timeout_s``, then raises QueueFullError."""
        expected = (self.model.input.channels, self.model.input.height, self.model.input.width)
        if tuple(tensor.shape[1:]) != expected:
            # Refused here, so that one wrong request cannot spoil a batch of others.
            raise InferenceError(
                f"model {self.model.name!r} takes (N, {', '.join(map(str, expected))}) tensors, "
                f"not {tuple(tensor.shape)}"
            )
        request = _Request(tensor)
        limit = self.policy.max_queue_images
        with self._cond:
            # An empty queue always takes a request, so an oversized one cannot wait forever.
            room = self._cond.wait_for(
                lambda: (
                    self._closed
                    or not self._requests
                    or self.stats.queued_images + request.size <= limit
                ),
                timeout_s,
            )
            if self._closed:
                raise InferenceError(f"model {self.model.name!r}: the batcher is closed")
            if not room:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"model {self.model.name!r}: the inference queue is full "
                    f"({self.stats.queued_images} images queued, limit {limit}); try again later"
                )
            self._requests.append(request)
            self.stats.queued_images += request.size
            self._cond.notify_all()
        return request.future

    def _ready(self, now: float) -> int:
        """How many queued requests to run now as one batch (0 = wait for more)."""
        p = self.policy
        if not p.dynamic:
            return 1  # no dynamic_batching block: each request runs alone, as on Triton
        total, fits, best_preferred = 0, 0, 0
        for r in self._requests:
            if total + r.size > p.max_batch_size:
                return max(fits, 1)  # the batch is full
            total += r.size
            fits += 1
            if total in p.preferred:
                best_preferred = fits
        if total == p.max_batch_size:
            return fits
        if best_preferred:
            return best_preferred
        if now - self._requests[0].enqueued >= p.max_queue_delay_s:
            return fits
        return 0

    def _expire(self, now: float) -> None:
        """Refuse requests queued longer than the queue policy's timeout (oldest first)."""
        limit = self.policy.queue_timeout_s
        while self._requests and limit and now - self._requests[0].enqueued > limit:
            r = self._requests.popleft()
            self.stats.queued_images -= r.size
            self.stats.rejected += 1
            r.future.set_exception(
                QueueFullError(
                    f"model {self.model.name!r}: the request waited more than "
                    f"{limit * 1000:.0f} ms in the queue; try again later"
                )
            )
            self._cond.notify_all()

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._expire(time.monotonic())
                if self._requests:
                    take = self._ready(time.monotonic())
                    if take:
                        batch = [self._requests.popleft() for _ in range(take)]
                        self.stats.queued_images -= sum(r.size for r in batch)
                        self._cond.notify_all()  # room for callers waiting to submit
                        return batch
                    deadline = self._requests[0].enqueued + self.policy.max_queue_delay_s
                    if self.policy.queue_timeout_s:
                        deadline = min(
                            deadline, self._requests[0].enqueued + self.policy.queue_timeout_s
                        )
                    self._cond.wait(max(deadline - time.monotonic(), 0.0))
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            waited = time.monotonic() - batch[0].enqueued
            try:
                tensor = (
                    batch[0].tensor if len(batch) == 1 else concatenate([r.tensor for r in batch])
                )
                began = time.monotonic()
                outputs = self._run(self.model, tensor)
                ran = time.monotonic() - began
            except Exception as exc:  # every caller in the batch learns why
                for r in batch:
                    r.future.set_exception(exc)
                continue
            start = 0
            for r in batch:
                r.future.set_result({k: v[start : start + r.size] for k, v in outputs.items()})
                start += r.size
            with self._cond:
                self.stats.inference_count += int(tensor.shape[0])
                self.stats.execution_count += 1
            if self._observe is not None:
                try:
                    self._observe(self.model.name, int(tensor.shape[0]), waited, ran)
                except Exception:  # a metrics hiccup must not stop the model's queue
                    log.exception("batch observer failed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._requests)
            self._requests.clear()
            self.stats.queued_images = 0
            self._cond.notify_all()
        for r in pending:
            r.future.set_exception(InferenceError(f"model {self.model.name!r}: shutting down"))
        for t in self._threads:
            t.join(timeout=5)


class DynamicBatcher:
    """An :class:`InferenceBackend` that batches concurrent calls before running ``backend``."""

    def __init__(
        self,
        backend: InferenceBackend,
        models: Sequence[ModelSpec],
        *,
        default_queue_images: int = 256,
        queue_timeout_s: float = 30.0,
        observe: BatchObserver | None = None,
    ) -> None:
        self.backend = backend
        self.queue_timeout_s = queue_timeout_s
        self._queues = {
            m.name: _ModelQueue(m, BatchPolicy.of(m, default_queue_images), backend.infer, observe)
            for m in models
        }

    @property
    def accepts_device_arrays(self) -> bool:
        """Whether the wrapped backend binds GPU arrays as they are."""
        return bool(getattr(self.backend, "accepts_device_arrays", False))

    def infer(self, model: ModelSpec, batch: Any) -> dict[str, Any]:
        """Queue ``batch`` for ``model`` (split at ``max_batch_size``) and wait for its outputs."""
        queue = self._queues.get(model.name)
        if queue is None:
            raise InferenceError(f"model {model.name!r} is not in the batcher's repository")
        futures = [queue.submit(chunk, self.queue_timeout_s) for chunk in split_batch(model, batch)]
        parts = [f.result() for f in futures]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def stats(self) -> dict[str, ModelStats]:
        """Per-model counters (a snapshot)."""
        return {name: ModelStats(**vars(q.stats)) for name, q in self._queues.items()}

    def stop(self) -> None:
        """Stop batching (queued requests fail with InferenceError); the backend stays open."""
        for q in self._queues.values():
            q.close()

    def close(self) -> None:
        self.stop()
        self.backend.close()
