"""Inference backends. The embedded default runs ONNX Runtime in this process.

A backend takes a model from the repository and a float32 NCHW batch and returns the model's
named outputs. Batches larger than the model's ``max_batch_size`` (config.pbtxt) are split.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from nidaan.core.config import InferenceConfig
from nidaan.core.errors import InferenceError

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


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Whole cores a cgroup v2 CPU quota allows (a container's ``--cpus``), or None if unlimited.

    ``cpu.max`` holds "<quota> <period>" in microseconds, or "max <period>".
    """
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (a container's cpuset), capped by a cgroup
    CPU quota, so that ONNX Runtime does not start more threads than it will get time for."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


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


class _ShmPool:
    """Shared-memory regions registered with Triton for one model's input, reused across requests.

    ``kind`` "system" maps POSIX shared memory (Triton on this host reads the input without it
    crossing the gRPC socket); "cuda" allocates device memory Triton opens by IPC handle (Triton on
    this GPU reads the kernels' output without a host round trip).
    """

    def __init__(self, kind: str, model: ModelSpec, size: int, count: int) -> None:
        self.kind = kind
        self.model = model
        self.size = size
        self.names = [f"nidaan_{os.getpid()}_{model.name}_{kind}_{i}" for i in range(count)]
        self.handles: dict[str, Any] = {}
        self.free: asyncio.Queue[str] = asyncio.Queue()

    async def register(self, client: Any, timeout_s: float) -> None:
        if self.kind == "system":
            from tritonclient.utils import shared_memory as shm

            for name in self.names:
                self.handles[name] = shm.create_shared_memory_region(name, f"/{name}", self.size)
                await client.register_system_shared_memory(
                    name, f"/{name}", self.size, client_timeout=timeout_s
                )
                self.free.put_nowait(name)
        else:
            from tritonclient.utils import cuda_shared_memory as cudashm

            for name in self.names:
                handle = cudashm.create_shared_memory_region(name, self.size, 0)
                self.handles[name] = handle
                await client.register_cuda_shared_memory(
                    name, cudashm.get_raw_handle(handle), 0, self.size, client_timeout=timeout_s
                )
                self.free.put_nowait(name)

    def write(self, name: str, chunk: Any) -> None:
        if self.kind == "system":
            from tritonclient.utils import shared_memory as shm

            shm.set_shared_memory_region(self.handles[name], [np.ascontiguousarray(chunk)])
        else:
            from tritonclient.utils import cuda_shared_memory as cudashm

            cudashm.set_shared_memory_region_from_dlpack(self.handles[name], [chunk])

    async def unregister(self, client: Any) -> None:
        for name, handle in self.handles.items():
            try:
                if self.kind == "system":
                    from tritonclient.utils import shared_memory as shm

                    await client.unregister_system_shared_memory(name)
                    shm.destroy_shared_memory_region(handle)
                else:
                    from tritonclient.utils import cuda_shared_memory as cudashm

                    await client.unregister_cuda_shared_memory(name)
                    cudashm.destroy_shared_memory_region(handle)
            except Exception as exc:  # best effort at shutdown; Triton drops them when it stops
                log.warning("shared memory region %s not released: %s", name, exc)


class TritonBackend:
    """NVIDIA Triton over gRPC (``inference.backend = "triton"``), serving the same repository.

    One asyncio gRPC client (``tritonclient.grpc.aio``) on its own event loop carries every request:
    callers on any thread (or coroutine, via :meth:`infer_async`) share one channel, and the chunks
    of a large batch are all in flight at once, so Triton's dynamic batcher sees them together.

    At start it checks that Triton is ready and serves every model with the input and outputs the
    repository declares, so a mismatch is an error at start rather than at the first study. When
    Triton is on this host, inputs travel in registered shared memory (``inference.
    triton_shared_memory``): system memory for host tensors, CUDA memory for GPU tensors.
    """

    #: Regions per model and kind: requests in flight that use shared memory at once (more go
    #: in the gRPC message meanwhile).
    REGIONS = 8

    def __init__(self, config: InferenceConfig, models: Sequence[ModelSpec]) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self._grpc = grpcclient
        self._error = InferenceServerException
        self.url = config.triton_url
        self.timeout_s = config.triton_timeout_s
        self.mode = config.triton_shared_memory
        self.models = list(models)
        self._pools: dict[tuple[str, str], _ShmPool] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="nidaan-triton", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Any) -> Any:
        """Run ``coro`` on the client's loop and wait for it (from any other thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout_s * 2 + 5)
        except TimeoutError as exc:
            future.cancel()
            raise InferenceError(f"Triton at {self.url} did not answer in time") from exc

    async def _start(self) -> None:
        import tritonclient.grpc.aio as aio

        self.client = aio.InferenceServerClient(self.url)
        try:
            ready = await self.client.is_server_ready(client_timeout=self.timeout_s)
        except self._error as exc:
            raise InferenceError(f"Triton at {self.url} is not reachable: {exc}") from exc
        if not ready:
            raise InferenceError(f"Triton at {self.url} is not ready")
        for m in self.models:
            await self._check(m)
        await self._share_memory()

    async def _share_memory(self) -> None:
        local = _is_loopback(self.url)
        kinds = []
        if self.mode == "system" or (self.mode == "auto" and local):
            kinds.append("system")
        if self.mode == "cuda" or (self.mode == "auto" and local and _cupy_usable()):
            kinds.append("cuda")
        for kind in kinds:
            for m in self.models:
                size = m.max_batch_size * m.input.channels * m.input.height * m.input.width * 4
                pool = _ShmPool(kind, m, size, self.REGIONS)
                try:
                    await pool.register(self.client, self.timeout_s)
                except Exception as exc:
                    await pool.unregister(self.client)
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

    async def _check(self, model: ModelSpec) -> None:
        try:
            if not await self.client.is_model_ready(model.name, client_timeout=self.timeout_s):
                raise InferenceError(f"Triton at {self.url} does not serve model {model.name!r}")
            meta = await self.client.get_model_metadata(
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

    async def _infer_chunk(self, model: ModelSpec, chunk: Any, names: list[str]) -> list[Any]:
        device = is_device_array(chunk)
        pool = self._pools.get((model.name, "cuda" if device else "system"))
        tensor = self._grpc.InferInput(model.input.name, list(chunk.shape), "FP32")
        region = None
        if pool is not None:
            try:  # all regions in flight: this request goes in the gRPC message, never waits
                region = pool.free.get_nowait()
            except asyncio.QueueEmpty:
                region = None
        if region is not None and pool is not None:
            pool.write(region, chunk)
            tensor.set_shared_memory(region, int(chunk.nbytes))
        elif device:
            chunk = chunk.get()  # a CuPy array: to the host for the gRPC message
            tensor.set_data_from_numpy(np.ascontiguousarray(chunk, np.float32))
        else:
            tensor.set_data_from_numpy(np.ascontiguousarray(chunk, np.float32))
        wanted = [self._grpc.InferRequestedOutput(n) for n in names]
        try:
            result = await self.client.infer(
                model.name, [tensor], outputs=wanted, client_timeout=self.timeout_s
            )
        except self._error as exc:
            raise InferenceError(f"Triton at {self.url} failed {model.name!r}: {exc}") from exc
        finally:
            if pool is not None and region is not None:
                pool.free.put_nowait(region)
        return [result.as_numpy(n) for n in names]

    async def infer_async(self, model: ModelSpec, batch: Any) -> dict[str, np.ndarray]:
        """Run ``model`` on ``batch`` from a coroutine on this backend's loop."""
        names = [model.probabilities_output] + (
            [model.heatmap_output] if model.heatmap_output else []
        )
        chunks = split_batch(model, batch)
        results = await asyncio.gather(*(self._infer_chunk(model, c, names) for c in chunks))
        return {n: np.concatenate([r[k] for r in results]) for k, n in enumerate(names)}

    def infer(self, model: ModelSpec, batch: Any) -> dict[str, np.ndarray]:
        return self._call(self.infer_async(model, batch))

    async def _close(self) -> None:
        for pool in self._pools.values():
            await pool.unregister(self.client)
        self._pools.clear()
        await self.client.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if hasattr(self, "client"):
            try:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            except Exception as exc:
                log.warning("closing the Triton client: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def _cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False
