"""Nidaan's Triton backend against Triton's own load generator, perf_analyzer, on one tritonserver.

    .venv/bin/python benchmarks/triton.py [--model cxr_screen] [--concurrency 1 4 16]
                                          [--rounds 3] [--window-ms 3000]
                                          [--shared-memory system] [--smoke] [--json PATH]

It starts one tritonserver (nvidia-pytriton's build, each ONNX model served through the Python
backend's deploy/triton/model.py, as the tests do) and, at each concurrency, alternately:

- perf_analyzer (the binary bundled in the tritonclient 2.51.0 wheel, the server's release; the
  benchmark downloads that wheel with pip once and keeps the binary in ~/.cache/nidaan) in its
  default synchronous mode, one thread per concurrent request, batch 1, the same input tensor
  every time, inputs and outputs in system shared memory;
- Nidaan's ``TritonBackend`` (server/inference.py) driven as the server drives it: that many
  threads calling ``infer`` concurrently with the same tensor, in the same shared-memory mode.

Reports the median inferences/s of each over ``--rounds`` and their ratio per concurrency.
perf_analyzer needs Debian's libb64-0d and libcudart.so.12 (pip ``nvidia-cuda-runtime-cu12``,
loaded through LD_LIBRARY_PATH by this benchmark; no GPU is needed). Not a test: timings are
never asserted. docs/triton.md says how to run perf_analyzer by hand.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nidaan.core.config import InferenceConfig
from nidaan.server.inference import TritonBackend
from nidaan.server.model_repository import ModelSpec, load_repository

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # workload.py, also when not run as a script

from workload import pytriton_package, tritonserver_launch  # noqa: E402

#: perf_analyzer ships in the tritonclient wheel of the same release as pytriton's tritonserver
#: (2.51). Later tritonclient wheels (the venv's 2.73) no longer bundle it, and this one pins
#: NumPy < 2 and protobuf < 5, so it is never installed: only its binary is taken out.
PERF_ANALYZER_WHEEL = "tritonclient==2.51.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nidaan"

# --- tritonserver --------------------------------------------------------------------------------


@dataclass
class Server:
    """A running tritonserver and where its log goes."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        """SIGINT (Triton's clean stop, unloading the models) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_tritonserver(workdir: Path, models: Path) -> Server:
    """tritonserver over a copy of ``models`` whose ONNX files run in the Python backend
    (``workload.tritonserver_launch``, as the tests start it)."""
    package = pytriton_package()
    if package is None:
        raise SystemExit(
            "tritonserver is not installed: pip install --no-deps nvidia-pytriton==0.7.0"
        )
    args, env, grpc_port = tritonserver_launch(workdir, models, package)
    log = workdir / "triton.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = Server(proc, grpc_port, log)
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tritonserver exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if client.is_server_ready():
                client.close()
                return server
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.2)
    server.stop()
    raise SystemExit(f"tritonserver not ready after 120 s:\n{log.read_text()}")


# --- perf_analyzer -------------------------------------------------------------------------------


def cuda_runtime_lib() -> Path:
    """The folder with libcudart.so.12 (pip nvidia-cuda-runtime-cu12), which perf_analyzer links
    even when it never touches a GPU."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is not None and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
        if (lib / "libcudart.so.12").is_file():
            return lib
    raise SystemExit(
        "perf_analyzer needs libcudart.so.12: "
        ".venv/bin/pip install 'nvidia-cuda-runtime-cu12==12.*'"
    )


def perf_analyzer_binary() -> Path:
    """perf_analyzer 2.51.0: $NIDAAN_PERF_ANALYZER if set, else the copy in the cache, else taken
    out of the tritonclient 2.51.0 wheel, downloaded once with pip (never installed)."""
    if os.environ.get("NIDAAN_PERF_ANALYZER"):
        return Path(os.environ["NIDAAN_PERF_ANALYZER"])
    version = PERF_ANALYZER_WHEEL.split("==")[1]
    binary = CACHE / f"perf_analyzer-{version}" / "perf_analyzer"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            + [PERF_ANALYZER_WHEEL],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("tritonclient-*.whl"))
        if fetched.returncode != 0 or not wheels:
            raise SystemExit(f"pip download {PERF_ANALYZER_WHEEL} failed:\n{fetched.stderr}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith("/data/bin/perf_analyzer"))
            binary.parent.mkdir(parents=True, exist_ok=True)
            partial = binary.with_suffix(".partial")
            partial.write_bytes(wheel.read(member))
            partial.chmod(0o755)
            partial.rename(binary)  # whole or absent, even if two runs race
    return binary


def perf_analyzer_env() -> dict[str, str]:
    """The environment perf_analyzer runs in: libcudart.so.12 on the loader's path."""
    lib = str(cuda_runtime_lib())
    return {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join([lib, os.environ.get("LD_LIBRARY_PATH", "")]),
    }


def perf_analyzer_command(
    binary: Path,
    model: ModelSpec,
    url: str,
    concurrency: int,
    shared_memory: str,
    data_dir: Path,
    window_ms: int,
    report: Path,
    trials: int,
    stability_pct: int,
) -> list[str]:
    """perf_analyzer at one concurrency: synchronous gRPC (one thread per request in flight, as
    Nidaan's callers are), batch 1, ``data_dir``'s input tensor every time."""
    return [
        str(binary),
        *("-m", model.name, "-u", url, "-i", "grpc", "-b", "1", "--sync"),
        f"--concurrency-range={concurrency}",
        f"--shared-memory={shared_memory}",
        f"--input-data={data_dir}",
        f"--measurement-interval={window_ms}",
        f"--max-trials={trials}",
        f"--stability-percentage={stability_pct}",
        "-f",
        str(report),
    ]


def run_perf_analyzer(command: list[str], report: Path) -> float:
    """Run ``command``; perf_analyzer's inferences/s from its CSV report."""
    done = subprocess.run(command, capture_output=True, text=True, env=perf_analyzer_env())
    if "libb64" in done.stderr:
        raise SystemExit("perf_analyzer needs Debian's libb64-0d: apt-get install libb64-0d")
    if done.returncode != 0 or not report.is_file():
        raise SystemExit(
            f"perf_analyzer failed ({done.returncode}): {shlex.join(command)}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    with open(report, newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["Inferences/Second"])


# --- Nidaan --------------------------------------------------------------------------------------


def run_nidaan(
    backend: TritonBackend,
    model: ModelSpec,
    batch: np.ndarray,
    concurrency: int,
    window_s: float,
    warmup_s: float,
) -> float:
    """Inferences/s of ``concurrency`` threads each calling ``backend.infer`` back to back with
    the same tensor, counted over ``window_s`` after ``warmup_s``."""
    stop = threading.Event()
    start = threading.Barrier(concurrency + 1)
    counts = [0] * concurrency
    window: list[float] = []
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        start.wait()
        try:
            while not stop.is_set():
                backend.infer(model, batch)
                if window and time.perf_counter() < window[1]:
                    counts[k] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(warmup_s)
    now = time.perf_counter()
    window.extend([now, now + window_s])
    time.sleep(window_s)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) * int(batch.shape[0]) / window_s


# --- the benchmark -------------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement: inferences/s, and what Triton and the client did for it."""

    rate: float
    inferences: int  # Triton's inference count over the whole run (warm-up included)
    executions: int  # the batches Triton ran for them
    client_cpu_s: float  # the client's CPU time over the same run

    @property
    def mean_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0

    @property
    def cpu_us(self) -> float:
        """Client CPU time per inference, in microseconds."""
        return self.client_cpu_s / self.inferences * 1e6 if self.inferences else 0.0


def triton_counts(url: str, model: ModelSpec) -> tuple[int, int]:
    """Triton's (inference_count, execution_count) for ``model`` so far."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model.name, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, model: ModelSpec, run: Any, who: int) -> Sample:
    """``run()`` (returning inferences/s) with Triton's counts and ``who``'s CPU around it."""
    before, cpu = triton_counts(url, model), _cpu(who)
    rate = run()
    after, cpu = triton_counts(url, model), _cpu(who) - cpu
    return Sample(rate, after[0] - before[0], after[1] - before[1], cpu)


def _median(samples: list[Sample], key: str) -> float:
    return float(statistics.median(getattr(s, key) for s in samples))


def run(
    smoke: bool = False,
    *,
    model_name: str = "cxr_screen",
    concurrencies: tuple[int, ...] = (1, 4, 16),
    rounds: int = 3,
    window_ms: int = 3000,
    shared_memory: str = "system",
    stability_pct: int = 10,
) -> dict[str, Any]:
    """Measure and return the benchmark's result dict (see benchmarks/README.md)."""
    if smoke:
        rounds, window_ms = 1, 500
    # perf_analyzer fails unless 3 windows in a row agree within stability_pct; a smoke run only
    # checks that everything runs, so any 3 windows do.
    trials, stability_pct = (3, 1000) if smoke else (10, stability_pct)
    command = (
        f".venv/bin/python benchmarks/triton.py --model {model_name} --concurrency "
        f"{' '.join(map(str, concurrencies))} --rounds {rounds} --window-ms {window_ms} "
        f"--shared-memory {shared_memory} --stability {stability_pct}"
        + (" --smoke" if smoke else "")
    )
    models = {m.name: m for m in load_repository(ROOT / "models")}
    model = models[model_name]
    shape = (1, model.input.channels, model.input.height, model.input.width)
    batch = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    binary = perf_analyzer_binary()
    pa: dict[int, list[Sample]] = {c: [] for c in concurrencies}
    ours: dict[int, list[Sample]] = {c: [] for c in concurrencies}
    with tempfile.TemporaryDirectory(prefix="nidaan-triton-bench-") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir()
        (data / model.input.name).write_bytes(batch[0].tobytes())  # perf_analyzer's batch-1 file
        server = start_tritonserver(work / "server", ROOT / "models")
        try:
            cfg = InferenceConfig(
                backend="triton", triton_url=server.url, triton_shared_memory=shared_memory
            )
            for r in range(rounds):
                for c in concurrencies:
                    report = work / f"pa_{r}_{c}.csv"
                    cmd = perf_analyzer_command(
                        binary,
                        model,
                        server.url,
                        c,
                        shared_memory,
                        data,
                        window_ms,
                        report,
                        trials,
                        stability_pct,
                    )
                    pa[c].append(
                        measure(
                            server.url,
                            model,
                            lambda: run_perf_analyzer(cmd, report),  # noqa: B023 - called now
                            resource.RUSAGE_CHILDREN,
                        )
                    )
                    # A backend per measurement, registering its regions at start as the server
                    # does: perf_analyzer unregisters every region on the server, ours included,
                    # when it starts and when it ends.
                    backend = TritonBackend(cfg, [model])
                    try:
                        for _ in range(2):  # warm the channel (and the model on the first run)
                            backend.infer(model, batch)
                        window_s = 3 * window_ms / 1000  # perf_analyzer's last 3 windows
                        ours[c].append(
                            measure(
                                server.url,
                                model,
                                lambda: run_nidaan(backend, model, batch, c, window_s, 0.5),  # noqa: B023
                                resource.RUSAGE_SELF,
                            )
                        )
                    finally:
                        backend.close()
                    t, n = pa[c][-1], ours[c][-1]
                    print(
                        f"  round {r + 1} concurrency {c:2d}: perf_analyzer {t.rate:7.1f}/s "
                        f"(batches of {t.mean_batch:.2f}, {t.cpu_us:.0f} us CPU each), "
                        f"Nidaan {n.rate:7.1f}/s (batches of {n.mean_batch:.2f}, "
                        f"{n.cpu_us:.0f} us CPU each)",
                        flush=True,
                    )
        finally:
            server.stop()
    rows = []
    for c in concurrencies:
        theirs, mine = _median(pa[c], "rate"), _median(ours[c], "rate")
        ratio = mine / theirs if theirs else None
        met = ratio is not None and ratio >= 0.9
        batches = (_median(ours[c], "mean_batch"), _median(pa[c], "mean_batch"))
        cpu = (_median(ours[c], "cpu_us"), _median(pa[c], "cpu_us"))
        why = (
            None
            if met
            else f"Triton formed batches of {batches[0]:.2f} requests for Nidaan's {c} threads "
            f"and {batches[1]:.2f} for perf_analyzer's; Nidaan's client spent {cpu[0]:.0f} us "
            f"of CPU per inference, perf_analyzer {cpu[1]:.0f} us (docs/triton.md)"
        )
        baseline = "perf_analyzer 2.51.0 --sync (same server, model, tensor, memory)"
        rows.append(
            {
                "figure": f"{model_name} at concurrency {c}, shared memory {shared_memory}",
                "value": round(mine, 1),
                "unit": "inferences/s",
                "baseline": baseline,
                "baseline_value": round(theirs, 1),
                "ratio": round(ratio, 3) if ratio is not None else None,
                "target": ">= 0.9x",
                "met": met,
                "why": why,
            }
        )
        for what, unit, (a, b) in (
            ("mean batch Triton formed", "requests", batches),
            ("client CPU per inference", "us", cpu),
        ):
            rows.append(
                {
                    "figure": f"{what} at concurrency {c}",
                    "value": round(a, 2),
                    "unit": unit,
                    "baseline": baseline,
                    "baseline_value": round(b, 2),
                    "ratio": round(a / b, 3) if b else None,
                    "target": None,
                    "met": None,
                    "why": None,
                }
            )
    rates = [r for r in rows if r["unit"] == "inferences/s"]
    return {
        "name": "triton",
        "title": f"Nidaan's Triton backend vs perf_analyzer on one tritonserver ({model_name})",
        "command": command,
        "rows": rows,
        "plot": {
            "kind": "bar",
            "title": f"{model_name} on tritonserver: inferences/s",
            "xlabel": "concurrency",
            "ylabel": "inferences/s",
            "x": list(concurrencies),
            "series": {
                "perf_analyzer": [r["baseline_value"] for r in rates],
                "Nidaan TritonBackend": [r["value"] for r in rates],
            },
        },
    }


def serve() -> None:
    """Start the benchmark's tritonserver over models/, print how to reach it, wait for Ctrl-C."""
    with tempfile.TemporaryDirectory(prefix="nidaan-triton-") as tmp:
        server = start_tritonserver(Path(tmp), ROOT / "models")
        lib = cuda_runtime_lib()
        print(
            f"tritonserver serves models/ on {server.url} (gRPC); its log: {server.log}\n"
            f"perf_analyzer: {perf_analyzer_binary()} (LD_LIBRARY_PATH={lib})\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cxr_screen")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=3000)
    parser.add_argument("--shared-memory", choices=["system", "none"], default="system")
    parser.add_argument(
        "--stability", type=int, default=10, help="perf_analyzer's --stability-percentage"
    )
    parser.add_argument("--smoke", action="store_true", help="one round of short windows")
    parser.add_argument("--json", type=Path, help="also write the result dict here")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="only start the tritonserver this benchmark uses and wait (Ctrl-C stops it), to "
        "run perf_analyzer by hand (docs/triton.md)",
    )
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    result = run(
        args.smoke,
        model_name=args.model,
        concurrencies=tuple(args.concurrency),
        rounds=args.rounds,
        window_ms=args.window_ms,
        shared_memory=args.shared_memory,
        stability_pct=args.stability,
    )
    print(result["title"])
    for row in result["rows"]:
        if row["unit"] != "inferences/s":
            continue
        print(
            f"  {row['figure']}: Nidaan {row['value']:.1f}/s, perf_analyzer "
            f"{row['baseline_value']:.1f}/s: {row['ratio']:.2f}x "
            f"({'met' if row['met'] else 'missed'} {row['target']})"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
