"""A stand-in for the CuPy calls the GPU executor makes, for Numba's CUDA simulator.

This is a test double, and only where no real peer can run: CI has no GPU, and CuPy raises on
every device call without one. The kernels themselves run in Numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``); this module gives them what CuPy gives them on a GPU: streams,
events, pinned and device buffers, asynchronous copies.

It is asynchronous the way a GPU is: each stream is a thread that runs its operations in order,
after a random delay, so an operation that the executor does not order with an event really does
race. A copy reads its pinned source when it runs (not when it is queued), device memory starts
as garbage and outputs as NaN, so reusing a pinned buffer too early, reading a device buffer
before its upload, or handing out an output before its kernel has finished all give wrong
results, which the tests compare with the NumPy reference.

Timing alone may miss a race, so the stand-in also checks the order itself, with vector clocks:
each stream knows how far every other stream has got from the events it waited for, the host
knows what it synchronised, and a kernel that reads a device buffer not known to be uploaded, an
upload into a buffer a kernel may still read, or a pinned buffer rewritten while a copy may still
read it, is recorded in ``hazards``.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Clock = dict[int, int]  # stream id -> how many of its operations are known complete


def _merge(into: Clock, other: Clock) -> None:
    for k, v in other.items():
        into[k] = max(into.get(k, 0), v)


def _root(a: Any) -> int:
    """The identity of the allocation an array views."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return id(a)


class SimEvent:
    """An event: each record replaces the flag a wait or synchronize looks at."""

    def __init__(self) -> None:
        self.current = threading.Event()
        self.current.set()  # never recorded: complete, as in CUDA
        self.clock: Clock = {}


class SimStream:
    """A stream: one thread running queued operations in order."""

    def __init__(self, name: str, max_delay_s: float, seed: int, index: int = 0) -> None:
        self.index = index
        self.enqueued = 0
        self.clock: Clock = {}
        self._ops: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._rng = random.Random(seed)
        self._max_delay_s = max_delay_s
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def enqueue(self, op: Callable[[], None]) -> None:
        self._ops.put(op)

    def _run(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                return
            time.sleep(self._rng.random() * self._max_delay_s)
            try:
                op()
            except BaseException as e:  # reported by the test, like a CUDA error
                self.errors.append(e)

    def close(self) -> None:
        self._ops.put(None)
        self._thread.join()


class SimOps:
    """``nidaan.kernels.executor.DeviceOps`` over host memory and simulator kernels.

    ``skip_waits`` drops every cross-stream wait, and ``early_sync`` makes event synchronisation
    return at once: the ordering bugs the tests must be able to catch.
    """

    def __init__(
        self,
        max_delay_s: float = 0.003,
        copy_delay_s: float = 0.01,
        seed: int = 0,
        skip_waits: bool = False,
        early_sync: bool = False,
    ) -> None:
        self.max_delay_s = max_delay_s
        #: Copies take longer than kernels here (as a large image over PCIe does), so a kernel
        #: not ordered after its upload reads the buffer before the upload reaches it.
        self.copy_delay_s = copy_delay_s
        self.seed = seed
        self.skip_waits = skip_waits
        self.early_sync = early_sync
        self.streams: list[SimStream] = []
        self.calls: list[str] = []
        self._rng = np.random.default_rng(seed)
        #: Threads that called into the device (the executor's owner thread only, if all is well).
        self.threads: set[str] = set()
        #: Unordered uses found by the vector clocks (empty, if all is well).
        self.hazards: list[str] = []
        self._host: Clock = {}
        self._uploaded: dict[int, tuple[SimStream, int]] = {}  # device buffer -> its upload
        self._read_by_kernel: dict[int, tuple[SimStream, int]] = {}  # device buffer -> kernel
        self._read_by_copy: dict[int, tuple[SimStream, int]] = {}  # pinned buffer -> copy

    def _known(self, clock: Clock, stream: SimStream, op: tuple[SimStream, int] | None) -> bool:
        """Whether ``op`` is ordered before the next operation on ``stream``."""
        if op is None:
            return True
        other, k = op
        return other is stream or clock.get(other.index, 0) >= k

    def _enqueue(self, stream: SimStream) -> int:
        """Ordering of a host-issued operation: after all the host knows is complete."""
        _merge(stream.clock, self._host)
        stream.enqueued += 1
        return stream.enqueued

    def _note(self, call: str) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(call)

    def stream(self) -> SimStream:
        self._note("stream")
        n = len(self.streams)
        s = SimStream(f"sim-stream-{n}", self.max_delay_s, self.seed + n, index=n + 1)
        self.streams.append(s)
        return s

    def event(self) -> SimEvent:
        self._note("event")
        return SimEvent()

    def pinned(self, nbytes: int) -> np.ndarray:
        self._note("pinned")
        return self._rng.integers(0, 256, nbytes, dtype=np.uint8)

    def device(self, nbytes: int) -> np.ndarray:
        self._note("device")
        return self._rng.integers(0, 256, nbytes, dtype=np.uint8)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, stream: Any) -> np.ndarray:
        self._note("empty")
        return np.full(shape, np.nan, dtype=dtype)

    def upload(self, dst: np.ndarray, src: np.ndarray, nbytes: int, stream: SimStream) -> None:
        self._note("upload")
        dst_id, src_id = _root(dst), _root(src)
        if not self._known(self._host, stream, self._read_by_copy.get(src_id)):
            self.hazards.append("a pinned buffer was rewritten while a copy may still read it")
        k = self._enqueue(stream)
        if not self._known(stream.clock, stream, self._read_by_kernel.get(dst_id)):
            self.hazards.append("an upload overwrites a buffer a kernel may still read")
        self._uploaded[dst_id] = self._read_by_copy[src_id] = (stream, k)

        def copy() -> None:
            time.sleep(self.copy_delay_s)
            dst[:nbytes] = src[:nbytes]

        stream.enqueue(copy)

    def record(self, event: SimEvent, stream: SimStream) -> None:
        self._note("record")
        flag = threading.Event()
        event.current = flag
        self._enqueue(stream)
        event.clock = {**stream.clock, stream.index: stream.enqueued}
        stream.enqueue(flag.set)

    def wait(self, stream: SimStream, event: SimEvent) -> None:
        self._note("wait")
        if self.skip_waits:
            return
        _merge(stream.clock, event.clock)
        flag = event.current
        stream.enqueue(flag.wait)

    def synchronize(self, event: SimEvent) -> None:
        self._note("synchronize")
        if not self.early_sync:
            event.current.wait()
            _merge(self._host, event.clock)

    def view(self, buf: np.ndarray, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
        count = int(np.prod(shape))
        return buf[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)

    #: Set to make the next launch raise, as a CUDA launch error would.
    fail_next_launch = False

    def launch(
        self,
        kernel: Any,
        grid: tuple[int, ...],
        block: tuple[int, int],
        stream: SimStream,
        args: Any,
    ) -> None:
        self._note("launch")
        if self.fail_next_launch:
            self.fail_next_launch = False
            raise RuntimeError("injected launch failure")
        k = self._enqueue(stream)
        for a in args:
            if isinstance(a, np.ndarray):
                buf = _root(a)
                if not self._known(stream.clock, stream, self._uploaded.get(buf)):
                    self.hazards.append("a kernel reads a buffer before its upload is known done")
                if buf in self._uploaded:
                    self._read_by_kernel[buf] = (stream, k)

        def run() -> None:
            kernel[grid, block](*args)

        stream.enqueue(run)

    def kernel_array(self, array: np.ndarray) -> np.ndarray:
        return array

    def stack(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(tensors)

    def copy_into(self, out: np.ndarray, tensors: Sequence[np.ndarray]) -> None:
        for n, t in enumerate(tensors):
            out[n] = t

    def errors(self) -> list[BaseException]:
        return [e for s in self.streams for e in s.errors]

    def close(self) -> None:
        for s in self.streams:
            s.close()
