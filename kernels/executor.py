"""One owner per GPU: the thread that holds every buffer, stream and event of a device.

Any thread may :meth:`CudaExecutor.submit` an image (stored pixel words, its :class:`ImagePlan`
and the model's :class:`InputLayout`) and gets a :class:`~concurrent.futures.Future`. The
executor's own thread gathers what arrives (up to ``max_batch`` images or ``max_delay_s`` after
the first, as the inference batcher does), splits it into groups that one kernel can take (same
layout, pixel type, channel count, mode and tap count), and for each group:

1. waits on the staging slot's ``kernel_done`` event (the previous kernel that read the slot is
   finished, so its pinned and device buffers are free again),
2. packs the images, descriptors, coefficients, taps and tables into the slot's pinned buffer,
3. uploads it on the copy stream and records ``copied``,
4. makes the compute stream wait for ``copied``, launches the batch kernel once and records
   ``kernel_done``.

Two slots alternate, so packing and uploading one group overlaps the previous group's kernel.
Futures resolve once their group's ``kernel_done`` has completed, each with its image's
``(C, H, W)`` tensor: a view of the group's output batch, which stays on the device (for ONNX
Runtime's IO binding or Triton's CUDA shared memory) and is never written again. Nothing mutable
is reachable from two threads: submitters only touch the queue, and each output batch is fresh.

The device calls go through a small :class:`DeviceOps` interface: :class:`CupyOps` on a GPU; the
tests drive the same orchestration under Numba's CUDA simulator with a stand-in for the few CuPy
calls the simulator lacks (``tests/sim_device.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .cuda import (
    BLOCK,
    MAX_CHANNELS,
    batch_kernel,
    grid_for,
    layout_of_pack,
    mode_of,
    pack,
    taps_of,
)

log = logging.getLogger("nidaan.kernels")


class ExecutorClosed(RuntimeError):
    """The GPU executor was closed (or its thread died): it takes no more images."""


class DeviceOps(Protocol):
    """The device calls the executor makes (all from its own thread)."""

    def stream(self) -> Any:
        """A new non-blocking stream."""

    def event(self) -> Any:
        """A new event (no timing)."""

    def pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array."""

    def device(self, nbytes: int) -> Any:
        """Device memory as a uint8 array."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
        """A device array for a batch's output, allocated for use on ``stream``."""

    def upload(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        """Copy the first ``nbytes`` of pinned ``src`` to ``dst`` asynchronously on ``stream``."""

    def record(self, event: Any, stream: Any) -> None:
        """Record ``event`` on ``stream``."""

    def wait(self, stream: Any, event: Any) -> None:
        """Make ``stream`` wait for the last record of ``event``."""

    def synchronize(self, event: Any) -> None:
        """Block the calling thread until the last record of ``event`` has completed."""

    def view(self, buf: Any, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        """A typed view of device bytes, as the kernel takes it (no implicit synchronisation)."""

    def launch(
        self, kernel: Any, grid: tuple[int, ...], block: tuple[int, int], stream: Any, args: Any
    ) -> None:
        """Launch ``kernel`` on ``stream``."""

    def kernel_array(self, array: Any) -> Any:
        """A device array (an output batch) as the kernel takes it."""

    def stack(self, tensors: Sequence[Any]) -> Any:
        """Stack (C, H, W) device tensors into one batch, complete when this returns."""

    def copy_into(self, out: Any, tensors: Sequence[Any]) -> None:
        """Copy (C, H, W) device tensors into ``out[:len(tensors)]``, complete on return."""


class CupyOps:
    """:class:`DeviceOps` on a real GPU: CuPy manages memory and streams, Numba launches.

    Kernel arguments are wrapped with ``sync=False``: numba-cuda would otherwise synchronise on
    every CUDA-array-interface argument of every launch; the executor orders work with events.
    """

    def __init__(self, device_id: int = 0) -> None:
        import cupy as cp
        from numba import cuda

        self.cp = cp
        self.cuda = cuda
        self.device_id = device_id
        self._device = cp.cuda.Device(device_id)
        self._device.use()
        cuda.select_device(device_id)
        self._numba_streams: dict[int, Any] = {}

    def stream(self) -> Any:
        with self._device:
            return self.cp.cuda.Stream(non_blocking=True)

    def event(self) -> Any:
        with self._device:
            return self.cp.cuda.Event(disable_timing=True)

    def pinned(self, nbytes: int) -> np.ndarray:
        mem = self.cp.cuda.alloc_pinned_memory(nbytes)
        return np.frombuffer(mem, dtype=np.uint8, count=nbytes)

    def device(self, nbytes: int) -> Any:
        with self._device:
            return self.cp.empty(nbytes, dtype=self.cp.uint8)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> Any:
        # Allocated with ``stream`` current: CuPy's pool then reuses the block only on it.
        with self._device, stream:
            return self.cp.empty(shape, dtype=dtype)

    def upload(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        self.cp.cuda.runtime.memcpyAsync(
            dst.data.ptr, src.ctypes.data, nbytes, self.cp.cuda.runtime.memcpyHostToDevice,
            stream.ptr,
        )  # fmt: skip

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def view(self, buf: Any, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        count = int(np.prod(shape))
        typed = buf[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)
        return self.cuda.as_cuda_array(typed, sync=False)

    def _numba_stream(self, stream: Any) -> Any:
        ns = self._numba_streams.get(stream.ptr)
        if ns is None:
            ns = self._numba_streams[stream.ptr] = self.cuda.external_stream(stream.ptr)
        return ns

    def launch(
        self, kernel: Any, grid: tuple[int, ...], block: tuple[int, int], stream: Any, args: Any
    ) -> None:
        kernel[grid, block, self._numba_stream(stream)](*args)

    def kernel_array(self, array: Any) -> Any:
        return self.cuda.as_cuda_array(array, sync=False)

    def stack(self, tensors: Sequence[Any]) -> Any:
        cp = self.cp
        with self._device:
            out = cp.stack(tensors)
            # The consumer (ONNX Runtime, Triton) reads it on another stream.
            cp.cuda.get_current_stream().synchronize()
        return out

    def copy_into(self, out: Any, tensors: Sequence[Any]) -> None:
        cp = self.cp
        with self._device:
            for n, t in enumerate(tensors):
                out[n] = t
            cp.cuda.get_current_stream().synchronize()


@dataclass
class _Job:
    image: np.ndarray
    plan: Any
    layout: Any
    future: Future[Any]

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one launch."""
        return (
            self.layout,
            self.image.dtype.str,
            self.plan.coeffs.shape[0],
            mode_of(self.plan),
            taps_of(self.plan),
        )


@dataclass
class _Slot:
    """Pinned and device staging for one group in flight, and the events that guard them."""

    host: np.ndarray | None = None
    dev: Any = None
    nbytes: int = 0
    copied: Any = None
    kernel_done: Any = None
    used: bool = False


@dataclass
class _InFlight:
    slot: _Slot
    out: Any
    jobs: list[_Job] = field(default_factory=list)


_STOP = object()


class CudaExecutor:
    """The single owner of one GPU's preprocessing: batches submissions, launches, hands back."""

    def __init__(
        self,
        ops: DeviceOps | None = None,
        *,
        max_batch: int = 32,
        max_delay_s: float = 0.001,
        max_batch_bytes: int = 256 << 20,
        block: tuple[int, int] = BLOCK,
        slots: int = 2,
        name: str = "nidaan-gpu0",
    ) -> None:
        if max_batch < 1 or slots < 1:
            raise ValueError("max_batch and slots must be at least 1")
        self.ops: DeviceOps = ops if ops is not None else CupyOps()
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_batch_bytes = max_batch_bytes
        self.block = block
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()
        #: Counters for metrics and tests (written by the executor thread only).
        self.launches = 0
        self.images = 0
        # Device objects are created on the owner thread, below; nothing here touches them.
        self._slots_wanted = slots
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    # --- any thread ------------------------------------------------------------------------------

    def submit(self, image: np.ndarray, plan: Any, layout: Any) -> Future[Any]:
        """Queue one image; the future gives its (C, H, W) tensor on the device.

        The image array is read by the executor thread until the future resolves: do not write
        it before then.
        """
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"image has shape {image.shape}; expected one 2-D frame")
        if not 1 <= plan.coeffs.shape[0] <= MAX_CHANNELS:
            raise ValueError(
                f"{plan.coeffs.shape[0]} channels: the CUDA kernels take 1 to {MAX_CHANNELS}"
            )
        if not image.dtype.isnative:
            image = image.astype(image.dtype.newbyteorder("="))
        image = np.ascontiguousarray(image)
        future: Future[Any] = Future()
        with self._submit_lock:  # so that nothing is queued behind the stop marker
            if self._closed.is_set():
                raise ExecutorClosed("the GPU executor is closed")
            self._queue.put(_Job(image, plan, layout, future))
        return future

    def close(self) -> None:
        """Finish what was submitted, then release the device objects and stop the thread."""
        with self._submit_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._queue.put(_STOP)
        self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the executor thread is running."""
        return self._thread.is_alive()

    # --- the executor thread only ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            ops = self.ops
            self._copy = ops.stream()
            self._compute = ops.stream()
            self._slots = [
                _Slot(copied=ops.event(), kernel_done=ops.event())
                for _ in range(self._slots_wanted)
            ]
        except BaseException as e:  # no device: the constructor re-raises it
            self._failure = e
            self._closed.set()
            self._ready.set()
            return
        self._ready.set()
        self._next_slot = 0
        in_flight: list[_InFlight] = []
        jobs: list[_Job] = []
        stopping = False
        try:
            while not stopping:
                jobs, stopping = self._gather(block=not in_flight)
                launched = [self._launch(group) for group in self._groups(jobs)]
                jobs = []
                # What was launched before is most likely finished by now; hand it back.
                for done in in_flight:
                    self._finish(done)
                in_flight = [g for g in launched if g is not None]
            for done in in_flight:
                self._finish(done)
        except BaseException as e:  # a bug here must not leave callers waiting for ever
            log.exception("GPU executor stopped")
            self._closed.set()
            self._fail_all(in_flight, jobs, e)
        finally:
            self._slots = []

    def _gather(self, block: bool) -> tuple[list[_Job], bool]:
        """Up to ``max_batch`` jobs: the first (waiting for it if ``block``), then whatever
        arrives within ``max_delay_s`` of it."""
        jobs: list[_Job] = []
        try:
            first = self._queue.get(block=block)
        except queue.Empty:
            return jobs, False
        if first is _STOP:
            return jobs, True
        jobs.append(first)
        deadline = time.monotonic() + self.max_delay_s
        size = first.image.nbytes
        while len(jobs) < self.max_batch and size < self.max_batch_bytes:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return jobs, True
            jobs.append(item)
            size += item.image.nbytes
        return jobs, False

    @staticmethod
    def _groups(jobs: list[_Job]) -> list[list[_Job]]:
        groups: dict[tuple[Any, ...], list[_Job]] = {}
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                groups.setdefault(job.key, []).append(job)
        return list(groups.values())

    def _launch(self, jobs: list[_Job]) -> _InFlight | None:
        ops = self.ops
        slot: _Slot | None = None
        uploading = False
        try:
            images = [j.image for j in jobs]
            plans = [j.plan for j in jobs]
            layout = jobs[0].layout
            packed = layout_of_pack(images, plans)
            slot = self._slots[self._next_slot]
            self._next_slot = (self._next_slot + 1) % len(self._slots)
            if slot.used:
                # The kernel that last read this slot (and so the upload before it) is done.
                ops.synchronize(slot.kernel_done)
            if slot.nbytes < packed.nbytes:
                slot.host = slot.dev = None  # free the old pair before taking a larger one
                size = max(packed.nbytes, 2 * slot.nbytes)
                slot.host, slot.dev, slot.nbytes = ops.pinned(size), ops.device(size), size
            assert slot.host is not None
            pack(images, plans, slot.host)
            uploading = True
            ops.upload(slot.dev, slot.host, packed.nbytes, self._copy)
            ops.record(slot.copied, self._copy)
            ops.wait(self._compute, slot.copied)
            out = ops.empty(layout.shape(len(jobs)), np.dtype(layout.dtype), self._compute)
            src, desc, coef, itab, ftab = packed.views(ops.view, slot.dev)
            kernel = batch_kernel(plans[0].coeffs.shape[0], mode_of(plans[0]), taps_of(plans[0]))
            args = (
                src,
                ops.kernel_array(out),
                desc,
                coef,
                itab,
                ftab,
                np.float32(layout.pad_value),
                np.float32(layout.mean),
                np.float32(1.0 / layout.std),
            )
            grid = grid_for(layout.height, layout.width, len(jobs), self.block)
            ops.launch(kernel, grid, self.block, self._compute, args)
            ops.record(slot.kernel_done, self._compute)
            slot.used = True
            self.launches += 1
            self.images += len(jobs)
            return _InFlight(slot, out, jobs)
        except Exception as e:  # this group fails; the executor goes on serving
            log.warning("GPU preprocessing of %d image(s) failed: %s", len(jobs), e)
            if uploading and slot is not None:
                # The copy may still be reading the pinned buffer: let it finish before the slot
                # is packed again (it is not known to be guarded by kernel_done).
                try:
                    ops.record(slot.copied, self._copy)
                    ops.synchronize(slot.copied)
                except Exception:
                    log.exception("GPU copy stream failed")
                    raise
            for j in jobs:
                j.future.set_exception(e)
            return None

    def _finish(self, done: _InFlight) -> None:
        try:
            self.ops.synchronize(done.slot.kernel_done)
        except Exception as e:
            for j in done.jobs:
                j.future.set_exception(e)
            return
        for n, j in enumerate(done.jobs):
            j.future.set_result(done.out[n])

    def _fail_all(self, in_flight: list[_InFlight], jobs: list[_Job], error: BaseException) -> None:
        failure = ExecutorClosed(f"the GPU executor stopped: {error}")
        for j in [j for g in in_flight for j in g.jobs] + jobs:
            if not j.future.done():
                j.future.set_exception(failure)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and not item.future.done():
                item.future.set_exception(failure)


_executors: dict[int, CudaExecutor] = {}
_executors_lock = threading.Lock()
_settings: dict[str, Any] = {"max_batch": 32, "max_delay_s": 0.001}


def configure_executors(max_batch: int = 32, max_delay_s: float = 0.001) -> None:
    """Batching of the executors started from now on (``kernels.gpu_*`` in the config)."""
    if max_batch < 1 or max_delay_s < 0:
        raise ValueError("max_batch must be at least 1 and max_delay_s not negative")
    with _executors_lock:
        _settings.update(max_batch=max_batch, max_delay_s=max_delay_s)


def executor_for(device_id: int = 0) -> CudaExecutor:
    """The process's executor for a GPU, started on first use."""
    with _executors_lock:
        ex = _executors.get(device_id)
        if ex is None or not ex.alive:
            ex = _executors[device_id] = CudaExecutor(
                CupyOps(device_id), name=f"nidaan-gpu{device_id}", **_settings
            )
        return ex


def close_executors() -> None:
    """Stop every GPU executor (at server shutdown)."""
    with _executors_lock:
        executors = list(_executors.values())
        _executors.clear()
    for ex in executors:
        ex.close()
