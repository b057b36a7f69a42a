"""The embedded dynamic batcher running the real demo model: batches form across concurrent
callers as config.pbtxt says, every caller gets its own outputs, and a full queue pushes back."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from nidaan.core.errors import InferenceError, QueueFullError
from nidaan.core.machine import cgroup_cpu_limit, usable_cores
from nidaan.server.batching import DynamicBatcher
from nidaan.server.inference import OnnxRuntimeBackend
from nidaan.server.model_repository import ModelSpec


@pytest.fixture(scope="module")
def cxr(repository) -> ModelSpec:  # type: ignore[no-untyped-def]
    return next(m for m in repository if m.name == "cxr_screen")


@pytest.fixture(scope="module")
def engine() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()


def _inputs(model: ModelSpec, n: int, seed: int = 0) -> np.ndarray:
    shape = (n, model.input.channels, model.input.height, model.input.width)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


class _Recorder:
    """Collects the batcher's per-batch observations."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, model: str, images: int, queued_s: float, ran_s: float) -> None:
        with self.lock:
            self.sizes.append(images)


def _concurrently(batcher: DynamicBatcher, model: ModelSpec, inputs: list[np.ndarray]) -> list:
    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(lambda x: batcher.infer(model, x), inputs))


def test_concurrent_callers_share_batches_and_each_gets_its_own_outputs(cxr, engine) -> None:
    recorder = _Recorder()
    model = dataclasses.replace(cxr, max_queue_delay_us=200_000)
    batcher = DynamicBatcher(engine, [model], observe=recorder)
    try:
        inputs = [_inputs(model, 1, seed) for seed in range(16)]
        results = _concurrently(batcher, model, inputs)
    finally:
        batcher.close()
    stats = batcher.stats()[model.name]
    assert stats.inference_count == 16
    assert stats.execution_count < 16, recorder.sizes
    assert max(recorder.sizes) > 1
    alone = engine.infer(model, np.concatenate(inputs))
    for k, result in enumerate(results):
        for name, value in result.items():
            np.testing.assert_allclose(value[0], alone[name][k], rtol=1e-5, atol=1e-6)


def test_a_preferred_batch_size_goes_without_waiting_out_the_delay(cxr, engine) -> None:
    recorder = _Recorder()
    # A delay far longer than the test: only reaching a preferred size can release the batch.
    model = dataclasses.replace(cxr, preferred_batch_sizes=(4,), max_queue_delay_us=600_000_000)
    batcher = DynamicBatcher(engine, [model], observe=recorder)
    try:
        results = _concurrently(batcher, model, [_inputs(model, 1, s) for s in range(4)])
    finally:
        batcher.close()
    assert recorder.sizes == [4]
    assert all(r[model.probabilities_output].shape == (1, 2) for r in results)


def test_a_lone_request_runs_after_the_queue_delay(cxr, engine) -> None:
    recorder = _Recorder()
    model = dataclasses.replace(cxr, preferred_batch_sizes=(8,), max_queue_delay_us=20_000)
    batcher = DynamicBatcher(engine, [model], observe=recorder)
    try:
        out = batcher.infer(model, _inputs(model, 3))
    finally:
        batcher.close()
    assert recorder.sizes == [3]
    assert out[model.heatmap_output].shape == (3, 2, 32, 32)


def test_a_request_larger_than_max_batch_is_split_and_reassembled(cxr, engine) -> None:
    recorder = _Recorder()
    model = dataclasses.replace(cxr, max_queue_delay_us=0)
    batcher = DynamicBatcher(engine, [model], observe=recorder)
    x = _inputs(model, 2 * model.max_batch_size + 3)
    try:
        out = batcher.infer(model, x)
    finally:
        batcher.close()
    assert max(recorder.sizes) == model.max_batch_size
    assert sum(recorder.sizes) == len(x)
    alone = engine.infer(model, x)
    np.testing.assert_allclose(out["probabilities"], alone["probabilities"], rtol=1e-5, atol=1e-6)


def test_without_dynamic_batching_each_request_runs_alone(cxr, engine) -> None:
    recorder = _Recorder()
    model = dataclasses.replace(cxr, dynamic_batching=False)
    batcher = DynamicBatcher(engine, [model], observe=recorder)
    try:
        _concurrently(batcher, model, [_inputs(model, 1, s) for s in range(6)])
    finally:
        batcher.close()
    assert recorder.sizes == [1] * 6


class _Gated:
    """The real backend behind a gate, so a test can hold a batch in flight (a slow model)."""

    def __init__(self, backend: OnnxRuntimeBackend) -> None:
        self.backend = backend
        self.gate = threading.Event()
        self.entered = threading.Event()

    def infer(self, model: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(60)
        return self.backend.infer(model, batch)

    def close(self) -> None:
        pass


def test_a_full_queue_pushes_back_and_loses_nothing_queued(cxr, engine) -> None:
    gated = _Gated(engine)
    model = dataclasses.replace(cxr, max_queue_size=4, max_queue_delay_us=0)
    batcher = DynamicBatcher(gated, [model], queue_timeout_s=0.2)
    pool = ThreadPoolExecutor(8)
    try:
        first = pool.submit(batcher.infer, model, _inputs(model, 1, 0))
        assert gated.entered.wait(30)  # a batch is in flight and the runner is busy
        queued = [pool.submit(batcher.infer, model, _inputs(model, 2, s)) for s in (1, 2)]
        for _ in range(100):  # both requests in the queue: 4 images, the limit
            if batcher.stats()[model.name].queued_images == 4:
                break
            threading.Event().wait(0.05)
        assert batcher.stats()[model.name].queued_images == 4
        with pytest.raises(QueueFullError, match="cxr_screen.*queue is full"):
            batcher.infer(model, _inputs(model, 1, 3))
        assert batcher.stats()[model.name].rejected == 1
        gated.gate.set()
        outputs = [first.result(30)] + [f.result(30) for f in queued]
    finally:
        gated.gate.set()
        pool.shutdown()
        batcher.close()
    assert [o["probabilities"].shape[0] for o in outputs] == [1, 2, 2]
    assert batcher.stats()[model.name].inference_count == 5


def test_a_request_queued_past_the_policy_timeout_is_refused(cxr, engine) -> None:
    gated = _Gated(engine)
    model = dataclasses.replace(cxr, queue_timeout_us=100_000, max_queue_delay_us=0)
    batcher = DynamicBatcher(gated, [model])
    pool = ThreadPoolExecutor(2)
    try:
        first = pool.submit(batcher.infer, model, _inputs(model, 1, 0))
        assert gated.entered.wait(30)  # the runner is busy with the first request
        late = pool.submit(batcher.infer, model, _inputs(model, 1, 1))
        threading.Event().wait(0.3)  # the second waits three times the policy's timeout
        gated.gate.set()
        assert first.result(30)["probabilities"].shape == (1, 2)
        with pytest.raises(QueueFullError, match="waited more than 100 ms in the queue"):
            late.result(30)
    finally:
        gated.gate.set()
        pool.shutdown()
        batcher.close()
    assert batcher.stats()[model.name].rejected == 1


def test_the_queue_policy_is_read_from_config_pbtxt(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from nidaan.server.model_repository import load_model

    from conftest import MODELS

    folder = tmp_path / "ct_nodule"
    shutil.copytree(MODELS / "ct_nodule", folder)
    config = folder / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            "default_queue_policy { max_queue_size: 256 }",
            "default_queue_policy { max_queue_size: 64 default_timeout_microseconds: 250000 }",
        )
    )
    model = load_model(folder)
    assert (model.max_queue_size, model.queue_timeout_us) == (64, 250_000)
    delayed = config.read_text().replace("250000", "250000 timeout_action: DELAY")
    config.write_text(delayed)
    assert load_model(folder).queue_timeout_us == 0  # DELAY refuses nothing


def test_a_wrongly_shaped_request_is_refused_alone(cxr, engine) -> None:
    batcher = DynamicBatcher(engine, [cxr])
    try:
        with pytest.raises(InferenceError, match=r"takes \(N, 1, 256, 256\)"):
            batcher.infer(cxr, np.zeros((1, 3, 256, 256), np.float32))
        assert batcher.infer(cxr, _inputs(cxr, 1))["probabilities"].shape == (1, 2)
    finally:
        batcher.close()


def test_a_container_cpu_quota_caps_the_threads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert cgroup_cpu_limit(str(cpu_max)) == 2
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(str(cpu_max)) is None
    assert cgroup_cpu_limit(str(tmp_path / "absent")) is None


def _own_cpu_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cgroup cpu.max file of the test's own, read in place of /sys/fs/cgroup/cpu.max."""
    from nidaan.core import machine

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")  # no quota
    read_limit = machine.cgroup_cpu_limit
    monkeypatch.setattr(machine, "cgroup_cpu_limit", lambda path="": read_limit(str(cpu_max)))
    return cpu_max


@contextmanager
def _running_on(cpus: list[int]) -> Iterator[None]:
    """This thread (which calls usable_cores) may run only on ``cpus`` while inside."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_cpu_sessions_use_the_cores_this_process_may_run_on(cxr, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The truth is set here, not read back from the code under test: this thread's CPU affinity,
    # and a cgroup cpu.max file of the test's own in place of /sys/fs/cgroup/cpu.max.
    cpu_max = _own_cpu_max(tmp_path, monkeypatch)
    one = dataclasses.replace(cxr, instance_count=1)
    two = dataclasses.replace(cxr, instance_count=2)

    def threads(model: ModelSpec) -> int:
        opts = OnnxRuntimeBackend().session_options(model)
        assert opts.inter_op_num_threads == 1
        return int(opts.intra_op_num_threads)

    allowed = sorted(os.sched_getaffinity(0))
    cpu_max.write_text("max 100000\n")  # no quota
    with _running_on(allowed[:1]):
        assert (usable_cores(), threads(one), threads(two)) == (1, 1, 1)
    if len(allowed) < 2:
        pytest.skip("one CPU: affinity cannot show more than one core")
    with _running_on(allowed[:2]):
        assert (usable_cores(), threads(one), threads(two)) == (2, 2, 1)
        cpu_max.write_text("100000 100000\n")  # docker run --cpus 1: the quota caps affinity
        assert (usable_cores(), threads(one), threads(two)) == (1, 1, 1)
        cpu_max.write_text("300000 100000\n")  # a quota above the affinity caps nothing
        assert (usable_cores(), threads(one)) == (2, 2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_worker_processes_default_to_the_cores_a_container_allows(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Receivers, decoders and report builders on ``auto``/0 follow the usable cores: a CPU
    quota (``docker run --cpus 1``) caps them as a cpuset does, so a small container on a big
    node does not start a process per node core. Nothing is started: the counts are read."""
    from nidaan.core.config import DicomConfig
    from nidaan.server.decode_pool import DecodePool
    from nidaan.server.result_objects import MAX_AUTO_WORKERS, ResultBuilder

    cpu_max = _own_cpu_max(tmp_path, monkeypatch)

    def counts() -> tuple[int, int, int]:
        return (
            DicomConfig(receivers="auto").receiver_count(),
            DecodePool(0).workers,
            ResultBuilder(0).workers,
        )

    allowed = sorted(os.sched_getaffinity(0))
    with _running_on(allowed[:1]):
        assert counts() == (1, 1, 1)
    if len(allowed) < 2:
        pytest.skip("one CPU: affinity cannot show more than one core")
    with _running_on(allowed[:2]):
        assert counts() == (2, 2, min(2, MAX_AUTO_WORKERS))
        cpu_max.write_text("100000 100000\n")  # docker run --cpus 1
        assert counts() == (1, 1, 1)
    assert ResultBuilder(3).workers == 3 and ResultBuilder(-1).workers == 0  # as configured
