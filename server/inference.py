"""Inference backends. The embedded default runs ONNX Runtime in this process.

A backend takes a model from the repository and a float32 NCHW batch and returns the model's
named outputs. Batches larger than the model's ``max_batch_size`` (config.pbtxt) are split.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from nidaan.core.config import InferenceConfig
from nidaan.core.errors import InferenceError
from nidaan.core.machine import usable_cores

from .model_repository import ModelSpec

log = logging.getLogger("nidaan.inference")


class InferenceBackend(Protocol):
    """What the pipeline needs from a backend."""

    def infer(self, model: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``model`` on ``batch`` and return its outputs by name."""
        ...

    def close(self) -> None:
        """Release sessions and connections."""
        ...


def is_device_array(a: Any) -> bool:
    """Whether ``a`` lives on a GPU (a CuPy array or anything with the CUDA array interface)."""
    return hasattr(a, "__cuda_array_interface__")


def split_batch(model: ModelSpec, batch: Any) -> list[Any]:
    """``batch`` in chunks of at most the model's ``max_batch_size`` (views, no copies)."""
    step = model.max_batch_size
    return [batch[i : i + step] for i in range(0, int(batch.shape[0]), step)]


def concatenate(parts: Sequence[Any]) -> Any:
    """Concatenate on the device the parts live on (CuPy for GPU arrays, else NumPy)."""
    if is_device_array(parts[0]):
        import cupy

        out = cupy.concatenate(parts)
        # Made on this thread's current stream; the consumer (ONNX Runtime, Triton) reads it
        # on a stream of its own, which nothing orders after this one.
        cupy.cuda.get_current_stream().synchronize()
        return out
    return np.concatenate(parts)


def stack(tensors: Sequence[Any]) -> Any:
    """Stack (C, H, W) tensors into a batch on the device they live on."""
    if is_device_array(tensors[0]):
        import cupy

        out = cupy.stack(tensors)
        cupy.cuda.get_current_stream().synchronize()  # see concatenate()
        return out
    return np.stack(tensors)


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
    """ONNX Runtime in process, one session per model, created on first use.

    Inputs are bound with IO binding: a NumPy batch is read where it lies (no copy into ONNX
    Runtime), and a GPU batch from the CUDA kernels is bound by its device pointer, so with the
    CUDA execution provider the tensors never make a round trip through host memory. Only the
    outputs (probabilities and small heatmaps) come back to the host.
    """

    def __init__(self, config: InferenceConfig | None = None) -> None:
        self.config = config or InferenceConfig()
        self.providers = onnxruntime_providers(self.config.device)
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def accepts_device_arrays(self) -> bool:
        """Whether GPU batches may be passed as they are (bound by device pointer)."""
        return self.on_gpu

    def session_options(self, model: ModelSpec) -> Any:
        """Threads that fit the machine: the usable cores shared among the model's instances,
        no inter-op pool (the models are sequential chains), and no spinning between runs, so
        idle ONNX Runtime threads do not take the cores the preprocessing kernels need."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        per_instance = max(1, usable_cores() // max(1, model.instance_count))
        opts.intra_op_num_threads = self.config.intra_op_threads or per_instance
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No CPU memory arena: the arena keeps the peak of a burst (200 concurrent CT calls)
        # for the process's life; without it a burst's memory goes back (measured: idle + 320
        # MiB kept with the arena, idle + 160 MiB without, docs/configuration.md).
        opts.enable_cpu_mem_arena = False
        return opts

    def _session(self, model: ModelSpec) -> Any:
        import onnxruntime as ort

        with self._lock:
            sess = self._sessions.get(model.name)
            if sess is None:
                try:
                    sess = ort.InferenceSession(
                        str(model.onnx_path),
                        sess_options=self.session_options(model),
                        providers=self.providers,
                    )
                except Exception as exc:
                    raise InferenceError(f"model {model.name!r} does not load: {exc}") from exc
                self._sessions[model.name] = sess
            return sess

    def _bind(self, sess: Any, model: ModelSpec, chunk: Any, names: list[str]) -> Any:
        binding = sess.io_binding()
        if is_device_array(chunk):
            if not self.on_gpu:
                raise InferenceError(
                    f"model {model.name!r}: a GPU batch reached the CPU execution provider"
                )
            chunk = chunk if chunk.flags.c_contiguous else chunk.copy()
            binding.bind_input(
                model.input.name,
                "cuda",
                int(chunk.device.id),
                np.dtype(chunk.dtype),
                list(chunk.shape),
                int(chunk.data.ptr),
            )
        else:
            binding.bind_cpu_input(model.input.name, np.ascontiguousarray(chunk))
        for n in names:
            binding.bind_output(n, "cpu")
        return binding, chunk

    def infer(self, model: ModelSpec, batch: Any) -> dict[str, np.ndarray]:
        sess = self._session(model)
        names = [model.probabilities_output] + (
            [model.heatmap_output] if model.heatmap_output else []
        )
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for chunk in split_batch(model, batch):
            try:
                # ``held`` keeps the bound buffer alive until the run has read it.
                binding, held = self._bind(sess, model, chunk, names)
                sess.run_with_iobinding(binding)
                outs = binding.copy_outputs_to_cpu()
            except InferenceError:
                raise
            except Exception as exc:
                raise InferenceError(f"model {model.name!r} failed: {exc}") from exc
            del held
            for n, o in zip(names, outs, strict=True):
                parts[n].append(np.asarray(o))
        return {n: np.concatenate(p) for n, p in parts.items()}

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()


_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _is_loopback(url: str) -> bool:
    host = url.rsplit(":", 1)[0] if url.count(":") == 1 or url.startswith("[") else url
    return host in _LOOPBACK


#: Triton's tensor data types that a model's outputs may have, as NumPy reads them.
_TRITON_DTYPES: dict[str, Any] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}

#: Makes region names unique across the backends of one process (tests and the benchmark open
#: several at once against one Triton, which refuses a name already registered).
_BACKEND_SEQUENCE = itertools.count()


@dataclass(frozen=True)
class _Output:
    """One output the pipeline reads: its name, per-item shape (no batch dimension), dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: Any

    @property
    def item_bytes(self) -> int:
        return int(math.prod(self.shape)) * int(np.dtype(self.dtype).itemsize)


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


class _Slot:
    """The shared memory of one request in flight: registered with Triton once, then reused by
    one request at a time (the pool hands it out), never registered per request.

    A "system" slot is one POSIX shared-memory region holding the input chunk at offset 0 and each
    output after it, so neither the input nor the outputs cross the gRPC socket; the request
    message naming those offsets is built once per batch size and sent again as it is. A "cuda"
    slot holds the input in device memory that Triton opens by IPC handle (a GPU batch from the
    kernels reaches Triton without a host round trip); its outputs come back in the message.
    """

    def __init__(
        self, name: str, kind: str, model: ModelSpec, outputs: Sequence[_Output], prebuilt: Any
    ) -> None:
        self.name = name
        self.kind = kind
        self.model = model
        self.outputs = list(outputs)
        self._prebuilt = prebuilt  # service_pb2.ModelInferRequest, the class
        items = model.max_batch_size
        self.item_bytes = model.input.channels * model.input.height * model.input.width * 4
        self.offsets: list[int] = []
        end = _align(items * self.item_bytes)
        if kind == "system":
            for out in self.outputs:
                self.offsets.append(end)
                end = _align(end + items * out.item_bytes)
        self.size = end
        self._requests: dict[int, Any] = {}
        self._shm: Any = None
        self._cuda: Any = None
        self._input: np.ndarray | None = None
        if kind == "system":
            from multiprocessing import shared_memory

            # The stdlib's POSIX shared memory (shm_open + mmap): NumPy views write the input
            # and read the outputs in place, with no ctypes call per request.
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=self.size)
            shape = (items, model.input.channels, model.input.height, model.input.width)
            self._input = np.ndarray(shape, np.float32, buffer=self._shm.buf)
        else:
            from tritonclient.utils import cuda_shared_memory as cudashm

            self._cuda = cudashm.create_shared_memory_region(name, self.size, 0)

    def register(self, client: Any, timeout_s: float) -> None:
        """Tell Triton about this slot (at creation, and again if Triton has forgotten it)."""
        if self.kind == "system":
            client.register_system_shared_memory(
                self.name, f"/{self.name}", self.size, client_timeout=timeout_s
            )
        else:
            from tritonclient.utils import cuda_shared_memory as cudashm

            client.register_cuda_shared_memory(
                self.name,
                cudashm.get_raw_handle(self._cuda),
                0,
                self.size,
                client_timeout=timeout_s,
            )

    def write(self, chunk: Any) -> None:
        """Copy ``chunk`` (at most ``max_batch_size`` items) into the slot's input."""
        if self._input is not None:
            np.copyto(self._input[: chunk.shape[0]], chunk, casting="same_kind")
        else:
            from tritonclient.utils import cuda_shared_memory as cudashm

            cudashm.set_shared_memory_region_from_dlpack(self._cuda, [chunk])

    def request(self, n: int) -> Any:
        """The request for ``n`` items in this slot, built on first use and then reused."""
        req = self._requests.get(n)
        if req is None:
            m = self.model
            req = self._prebuilt(model_name=m.name)
            tensor = req.inputs.add(
                name=m.input.name,
                datatype="FP32",
                shape=[n, m.input.channels, m.input.height, m.input.width],
            )
            tensor.parameters["shared_memory_region"].string_param = self.name
            tensor.parameters["shared_memory_byte_size"].int64_param = n * self.item_bytes
            for k, out in enumerate(self.outputs):
                wanted = req.outputs.add(name=out.name)
                if self.kind == "system":
                    wanted.parameters["shared_memory_region"].string_param = self.name
                    wanted.parameters["shared_memory_offset"].int64_param = self.offsets[k]
                    wanted.parameters["shared_memory_byte_size"].int64_param = n * out.item_bytes
            self._requests[n] = req
        return req

    def read(self, n: int, response: Any) -> list[np.ndarray]:
        """The outputs of the last request for ``n`` items: copied out of the slot (the next
        request overwrites it), or taken from the message."""
        if self.kind != "system":
            return _outputs_from_message(self.outputs, response)
        if self._shm is None:
            raise InferenceError("the Triton backend was closed while this request was in flight")
        return [
            np.ndarray((n, *out.shape), out.dtype, buffer=self._shm.buf, offset=off).copy()
            for out, off in zip(self.outputs, self.offsets, strict=True)
        ]

    def destroy(self, client: Any | None) -> None:
        """Unregister from Triton (when reachable) and free the memory."""
        try:
            if client is not None:
                if self.kind == "system":
                    client.unregister_system_shared_memory(self.name)
                else:
                    client.unregister_cuda_shared_memory(self.name)
        except Exception as exc:  # best effort at shutdown; Triton drops them when it stops
            log.warning("shared memory region %s not unregistered: %s", self.name, exc)
        if self._shm is not None:
            self._input = None  # the view must go before the mapping can close
            self._shm.close()
            self._shm.unlink()
            self._shm = None
        if self._cuda is not None:
            from tritonclient.utils import cuda_shared_memory as cudashm

            cudashm.destroy_shared_memory_region(self._cuda)
            self._cuda = None


def _outputs_from_message(outputs: Sequence[_Output], response: Any) -> list[np.ndarray]:
    """``outputs`` from a response that carries them in ``raw_output_contents``."""
    by_name = {o.name: k for k, o in enumerate(response.outputs)}
    arrays = []
    for out in outputs:
        k = by_name.get(out.name)
        if k is None or k >= len(response.raw_output_contents):
            raise InferenceError(f"Triton's answer has no data for output {out.name!r}")
        shape = [int(d) for d in response.outputs[k].shape]
        data = np.frombuffer(response.raw_output_contents[k], dtype=out.dtype)
        arrays.append(data.reshape(shape).copy())  # writable, and not tied to the message
    return arrays


class _SlotPool:
    """A model's slots of one kind, grown to the number of requests in flight at once.

    A request takes a free slot (most recently used first, so the same few stay warm) or, when
    all are taken and the pool is below ``limit``, registers one more: the pool ends up as large
    as the concurrency the server runs at, and each slot is registered once for the backend's
    life. Past ``limit`` a request goes in the gRPC message instead of waiting for a slot.
    """

    def __init__(
        self,
        kind: str,
        model: ModelSpec,
        outputs: Sequence[_Output],
        client: Any,
        timeout_s: float,
        limit: int,
        prefix: str,
    ) -> None:
        from tritonclient.grpc import service_pb2

        self.kind = kind
        self.model = model
        self.outputs = list(outputs)
        self.client = client
        self.timeout_s = timeout_s
        self.limit = limit
        self.prefix = prefix
        self._request_class = service_pb2.ModelInferRequest
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._slots: list[_Slot] = []
        self._reserved = 0  # slots registered or being registered
        self._names = itertools.count()

    def grow(self) -> _Slot:
        """Create and register one more slot (raises if that fails)."""
        with self._lock:
            index = next(self._names)  # never reused, even after a failed grow
            self._reserved += 1
        try:
            slot = _Slot(
                f"{self.prefix}_{self.model.name}_{self.kind}_{index}",
                self.kind,
                self.model,
                self.outputs,
                self._request_class,
            )
        except BaseException:
            with self._lock:
                self._reserved -= 1
            raise
        try:
            slot.register(self.client, self.timeout_s)
        except BaseException:
            slot.destroy(None)
            with self._lock:
                self._reserved -= 1
            raise
        with self._lock:
            self._slots.append(slot)
        return slot

    def acquire(self) -> _Slot | None:
        """A slot for one request, or None when the pool is at its limit and all are busy."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._reserved >= self.limit:
                return None
        try:
            return self.grow()
        except Exception as exc:
            with self._lock:  # stop growing: more would fail the same way (e.g. /dev/shm full)
                self.limit = max(1, self._reserved)
            log.warning(
                "Triton %s shared memory: no more regions for %s past %d (%s); further requests "
                "in flight at once go in the gRPC message",
                self.kind,
                self.model.name,
                self._reserved,
                exc,
            )
            return None

    def release(self, slot: _Slot) -> None:
        """Give ``slot`` back once its request's outputs have been read."""
        with self._lock:
            self._free.append(slot)

    @property
    def size(self) -> int:
        """Slots registered now."""
        with self._lock:
            return len(self._slots)

    def close(self, reachable: bool = True) -> None:
        """Unregister (when Triton is ``reachable``) and free every slot."""
        with self._lock:
            slots, self._slots, self._free = self._slots, [], []
        for slot in slots:
            slot.destroy(self.client if reachable else None)


def _is_lost_region(exc: Any) -> bool:
    """Whether a failed call says Triton does not know a region of ours: it restarted, or a
    client unregistered every region (perf_analyzer does, when it starts and when it ends)."""
    import grpc

    details = str(exc.details() if hasattr(exc, "details") else exc)
    return (
        isinstance(exc, grpc.RpcError)
        and exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        and "shared memory region" in details
    )


class TritonBackend:
    """NVIDIA Triton over gRPC (``inference.backend = "triton"``), serving the same repository.

    One gRPC channel carries every request; callers on any thread send theirs on it directly,
    each blocking only itself (no hand-off to another thread), and the chunks of a large batch
    are all in flight at once, so Triton's dynamic batcher sees them together.

    At start it checks that Triton is ready and serves every model with the input and outputs the
    repository declares, so a mismatch is an error at start rather than at the first study. When
    Triton is on this host, requests travel in registered shared memory (``inference.
    triton_shared_memory``): system memory for host tensors (the outputs come back in it too),
    CUDA memory for GPU tensors. Each request in flight has a region of its own, registered once
    and reused (see ``_SlotPool``); docs/triton.md says what a request costs.
    """

    #: At most this many regions per model and kind (requests in flight at once beyond it go in
    #: the gRPC message), and at most ``MAX_REGION_BYTES`` of them, since /dev/shm must hold
    #: every region that has been used (Docker's default --shm-size is 64 MiB).
    MAX_REGIONS = 64
    MAX_REGION_BYTES = 512 * 1024 * 1024

    def __init__(self, config: InferenceConfig, models: Sequence[ModelSpec]) -> None:
        import grpc
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc import service_pb2, service_pb2_grpc
        from tritonclient.utils import InferenceServerException

        self._error = InferenceServerException
        self._rpc_error = grpc.RpcError
        self._request_class = service_pb2.ModelInferRequest
        self.url = config.triton_url
        self.timeout_s = config.triton_timeout_s
        self.mode = config.triton_shared_memory
        self.models = list(models)
        self._outputs: dict[str, list[_Output]] = {}
        self._pools: dict[tuple[str, str], _SlotPool] = {}
        self._message_requests: dict[tuple[str, int], Any] = {}
        self._prefix = f"nidaan_{os.getpid()}_{next(_BACKEND_SEQUENCE)}"
        self._closed = False
        # tritonclient for the control calls (readiness, metadata, shared memory); its generated
        # stub on a channel of our own for inference, so a request is one prebuilt message and
        # one blocking call. Same message limits as tritonclient's (a CT chunk can pass 4 MiB).
        self.client = grpcclient.InferenceServerClient(self.url)
        limit = [
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1),
        ]
        self._channel = grpc.insecure_channel(self.url, options=limit)
        self._infer = service_pb2_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        try:
            ready = self.client.is_server_ready(client_timeout=self.timeout_s)
        except self._error as exc:
            raise InferenceError(f"Triton at {self.url} is not reachable: {exc}") from exc
        if not ready:
            raise InferenceError(f"Triton at {self.url} is not ready")
        for m in self.models:
            self._outputs[m.name] = self._check(m)
        self._share_memory()

    def problem(self) -> str:
        """Why Triton cannot serve the models now ('' when it can): for /readyz."""
        try:
            if not self.client.is_server_ready(client_timeout=self.timeout_s):
                return f"Triton at {self.url} is not ready"
            for m in self.models:
                if not self.client.is_model_ready(m.name, client_timeout=self.timeout_s):
                    return f"Triton at {self.url} does not have model {m.name!r} ready"
        except self._error as exc:
            return f"Triton at {self.url} is not reachable: {type(exc).__name__}"
        return ""

    def _share_memory(self) -> None:
        local = _is_loopback(self.url)
        kinds = []
        if self.mode == "system" or (self.mode == "auto" and local):
            kinds.append("system")
        if self.mode == "cuda" or (self.mode == "auto" and local and _cupy_usable()):
            kinds.append("cuda")
        for kind in kinds:
            for m in self.models:
                outputs = self._outputs[m.name]
                slot_bytes = m.max_batch_size * (
                    m.input.channels * m.input.height * m.input.width * 4
                    + (sum(o.item_bytes for o in outputs) if kind == "system" else 0)
                )
                limit = max(1, min(self.MAX_REGIONS, self.MAX_REGION_BYTES // slot_bytes))
                pool = _SlotPool(kind, m, outputs, self.client, self.timeout_s, limit, self._prefix)
                try:  # one region now: shared memory that cannot work fails here, not later
                    pool.release(pool.grow())
                except Exception as exc:
                    pool.close()
                    if self.mode == kind:  # asked for explicitly: an error, not a fallback
                        raise InferenceError(
                            f"Triton at {self.url}: {kind} shared memory failed: {exc}"
                        ) from exc
                    log.warning("Triton %s shared memory unavailable, using gRPC: %s", kind, exc)
                    break
                self._pools[(m.name, kind)] = pool

    @property
    def accepts_device_arrays(self) -> bool:
        """GPU batches go to Triton through CUDA shared memory, when it is registered."""
        return any(kind == "cuda" for _, kind in self._pools)

    @property
    def shared_memory(self) -> list[str]:
        """The kinds of shared memory in use ("system", "cuda")."""
        return sorted({kind for _, kind in self._pools})

    def regions(self, model: ModelSpec, kind: str = "system") -> int:
        """Shared-memory regions registered now for ``model`` (0 without shared memory)."""
        pool = self._pools.get((model.name, kind))
        return pool.size if pool is not None else 0

    def _check(self, model: ModelSpec) -> list[_Output]:
        """Triton serves ``model`` as the repository says; the outputs the pipeline reads."""
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
        served = {o["name"]: o for o in meta["outputs"]}
        outputs = []
        for name in (model.probabilities_output, model.heatmap_output):
            if name is None:
                continue
            if name not in served:
                raise InferenceError(f"Triton's {model.name!r} has no output {name!r}")
            dims = tuple(int(d) for d in served[name]["shape"][1:])
            dtype = _TRITON_DTYPES.get(served[name]["datatype"])
            if dtype is None or any(d < 0 for d in dims):
                raise InferenceError(
                    f"Triton's {model.name!r} output {name!r} is {served[name]['datatype']} "
                    f"{served[name]['shape']}; Nidaan reads fixed-shape numeric outputs"
                )
            outputs.append(_Output(name, dims, dtype))
        return outputs

    def _message_request(self, model: ModelSpec, n: int) -> Any:
        """The request's fixed part (model, input shape, outputs) when tensors go in the message;
        a copy of it gets the input bytes."""
        req = self._message_requests.get((model.name, n))
        if req is None:
            req = self._request_class(model_name=model.name)
            req.inputs.add(
                name=model.input.name,
                datatype="FP32",
                shape=[n, model.input.channels, model.input.height, model.input.width],
            )
            for out in self._outputs[model.name]:
                req.outputs.add(name=out.name)
            self._message_requests[(model.name, n)] = req
        return req

    def _failure(self, model: ModelSpec, exc: Exception) -> InferenceError:
        import grpc

        if isinstance(exc, grpc.RpcError):
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return InferenceError(
                    f"Triton at {self.url} did not answer {model.name!r} in {self.timeout_s} s"
                )
            return InferenceError(
                f"Triton at {self.url} failed {model.name!r}: [{code.name}] {exc.details()}"
            )
        return InferenceError(f"Triton at {self.url} failed {model.name!r}: {exc}")

    def _prepare(self, model: ModelSpec, chunk: Any) -> tuple[_SlotPool | None, _Slot | None, Any]:
        """Put ``chunk`` where Triton will read it: in a slot of its own (which stays this
        request's until ``_finish`` gives it back), else in the request message."""
        if self._closed:
            raise InferenceError("the Triton backend is closed")
        device = is_device_array(chunk)
        pool = self._pools.get((model.name, "cuda" if device else "system"))
        slot = pool.acquire() if pool is not None else None
        if slot is not None:
            try:
                slot.write(chunk)
            except BaseException:
                pool.release(slot)  # type: ignore[union-attr]
                raise
            return pool, slot, slot.request(int(chunk.shape[0]))
        host = chunk.get() if device else chunk  # a CuPy array: to the host for the message
        req = self._request_class()
        req.CopyFrom(self._message_request(model, int(chunk.shape[0])))
        req.raw_input_contents.append(np.ascontiguousarray(host, np.float32).tobytes())
        return None, None, req

    def _finish(
        self,
        model: ModelSpec,
        prepared: tuple[_SlotPool | None, _Slot | None, Any],
        n: int,
        answer: Callable[[], Any],
    ) -> list[np.ndarray]:
        """Wait for ``answer()`` and read the outputs; the slot is free again afterwards."""
        pool, slot, req = prepared
        try:
            try:
                response = answer()
            except self._rpc_error as exc:
                if slot is None or pool is None or not _is_lost_region(exc):
                    raise
                # Triton has forgotten this region (it restarted, or a client unregistered every
                # region): register it again and send once more, rather than fail from now on.
                log.warning("Triton lost shared memory region %s; registering it again", slot.name)
                slot.register(pool.client, self.timeout_s)
                response = self._infer(req, timeout=self.timeout_s)
            if slot is not None:
                return slot.read(n, response)
            return _outputs_from_message(self._outputs[model.name], response)
        except InferenceError:
            raise
        except (self._rpc_error, self._error) as exc:
            raise self._failure(model, exc) from exc
        finally:
            if slot is not None and pool is not None:
                pool.release(slot)

    def infer(self, model: ModelSpec, batch: Any) -> dict[str, np.ndarray]:
        """Run ``model`` on ``batch`` (NumPy, or CuPy with CUDA shared memory) on Triton and
        return its outputs by name; safe to call from many threads at once."""
        outputs = self._outputs.get(model.name)
        if outputs is None:
            raise InferenceError(f"model {model.name!r} was not checked against Triton at start")
        chunks = split_batch(model, batch)
        if len(chunks) == 1:  # the common case: one blocking call on this thread, no future
            prepared = self._prepare(model, chunks[0])
            req = prepared[2]
            got = self._finish(
                model,
                prepared,
                int(chunks[0].shape[0]),
                lambda: self._infer(req, timeout=self.timeout_s),
            )
            return {o.name: got[k] for k, o in enumerate(outputs)}
        sent: list[tuple[Any, Any, int]] = []
        try:
            for chunk in chunks:  # every chunk in flight before waiting for any
                prepared = self._prepare(model, chunk)
                call = self._infer.future(prepared[2], timeout=self.timeout_s)
                sent.append((prepared, call, int(chunk.shape[0])))
        except BaseException:
            for (pool, slot, _), call, _ in sent:
                call.cancel()
                if slot is not None and pool is not None:
                    pool.release(slot)
            raise
        results: list[list[np.ndarray]] = []
        failure: InferenceError | None = None
        for prepared, call, n in sent:  # each one finished, so every slot goes back
            try:
                results.append(self._finish(model, prepared, n, call.result))
            except InferenceError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return {o.name: np.concatenate([r[k] for r in results]) for k, o in enumerate(outputs)}

    def close(self) -> None:
        """Unregister and free every region, and close both channels."""
        if self._closed:
            return
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._channel.close()
        self.client.close()


def _cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False
