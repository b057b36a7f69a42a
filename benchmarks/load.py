"""Load test of the gRPC API (Analyze, 16 concurrent callers) against the same work in process.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/load.py [--users 16] [--seconds 30] [--json PATH]
    .venv/bin/python benchmarks/load.py --smoke          # seconds: 2 callers, 3 s each

Four measurements, one after the other, on the same studies (three one-image 1024 x 1024
radiograph studies to one four-slice 512 x 512 CT study, from benchmarks/workload.py):

1. in process (the baseline): ``--users`` threads parsing the instances' bytes (``dcmread``)
   and calling ``Pipeline.analyse``, i.e. the work without gRPC, the server process or a client;
2. gRPC, threads: ``nidaan serve`` called by ``--users`` threads of this process, each with the
   bundled client (``nidaan.client.Client``) sending Analyze calls back to back; the client's
   own CPU time is measured too (it shares the machine's cores with the server);
3. gRPC, locust: the same server driven by ``benchmarks/locustfile.py``'s IntegratorUser
   headless (its users run on gevent); the load tool's view;
4. gRPC alone: the same callers and requests against a server with Nidaan's gRPC settings and
   handler shape that does no work (``floor_server``, in its own process). Its CPU per call,
   server and client, is what any handler starts from: on a machine whose cores the callers
   share, no handler can reach more than in process / (in process + gRPC alone).

Figures: studies/s of each and their ratio to in process (target for the threads: at least
0.8x); CPU milliseconds per study of the server process against in process (what the server
adds per study, whatever the client costs). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # workload.py, also when not run as a script

from workload import (  # noqa: E402
    MIX,
    ct_studies,
    free_port,
    nidaan_config,
    radiograph_studies,
    start_nidaan,
    stop,
    wait_for_port,
)

TARGET = 0.8


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _studies() -> dict[str, list[list[bytes]]]:
    return {"radiograph": radiograph_studies(), "ct": ct_studies()}


def _drive(
    studies: dict[str, list[list[bytes]]],
    users: int,
    seconds: float,
    caller: Callable[[], AbstractContextManager[Callable[[list[bytes]], Any]]],
) -> dict[str, Any]:
    """``users`` threads, each with its own ``caller()`` (a context giving the function that
    analyses one study), taking the mix's studies back to back for ``seconds``: latencies (ms),
    failures, the elapsed time and this process's CPU seconds meanwhile."""
    order = [k for k, w in MIX.items() for _ in range(w)]  # the kinds, as often as the mix says
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def user(u: int) -> None:
        with caller() as analyse:
            for turn in itertools.count(u):
                if time.monotonic() >= deadline:
                    return
                kind = order[turn % len(order)]
                study = studies[kind][turn % len(studies[kind])]
                started = time.perf_counter()
                try:
                    analyse(study)
                except Exception:  # counted, not raised: the run goes on
                    with lock:
                        failed[0] += 1
                    continue
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)

    me = psutil.Process()
    cpu0, started = _cpu(me), time.monotonic()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "latencies": latencies,
        "failed": failed[0],
        "elapsed": time.monotonic() - started,
        "client_cpu": _cpu(me) - cpu0,
    }


def in_process(users: int, seconds: float) -> tuple[float, list[float], float]:
    """Studies/s, latencies (ms) and CPU ms per study of ``users`` threads calling the
    pipeline directly."""
    from pydicom import dcmread

    from nidaan.core.config import InferenceConfig
    from nidaan.server.backends import create_backend
    from nidaan.server.model_repository import load_repository
    from nidaan.server.pipeline import Pipeline

    models = load_repository(ROOT / "models")
    pipeline = Pipeline(models, create_backend(InferenceConfig(), models))
    studies = _studies()
    for kind in studies:  # warm up: each kind's kernels compiled (or loaded) and models run
        pipeline.analyse([dcmread(io.BytesIO(b)) for b in studies[kind][0]])

    def analyse(study: list[bytes]) -> None:
        pipeline.analyse([dcmread(io.BytesIO(b)) for b in study])

    run = _drive(studies, users, seconds, lambda: contextlib.nullcontext(analyse))
    latencies, elapsed, cpu = run["latencies"], run["elapsed"], run["client_cpu"]
    if run["failed"]:
        raise RuntimeError(f"{run['failed']} studies failed in process")
    pipeline.backend.close()
    close = getattr(pipeline, "close", None)
    if close is not None:
        close()
    return len(latencies) / elapsed, latencies, cpu / max(1, len(latencies)) * 1000


class _Server:
    """``nidaan serve`` on free loopback ports (embedded backend, no DICOM peers)."""

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.http_port = free_port(), free_port()
        config = nidaan_config(
            work / "nidaan.toml",
            port=free_port(),
            data_dir=work / "data",
            models=ROOT / "models",
            extra=f'[grpc]\nbind = "127.0.0.1"\nport = {self.grpc_port}\n'
            f'[http]\nbind = "127.0.0.1"\nport = {self.http_port}\n',
        )
        self.proc = start_nidaan(config, work / "nidaan.log", http=True)
        wait_for_port(self.grpc_port, timeout=180, proc=self.proc)
        wait_for_port(self.http_port, timeout=30, proc=self.proc)
        self.ps = psutil.Process(self.proc.pid)

    def gc_collections(self) -> float:
        """The server's garbage collections so far, all generations (``python_gc_*`` on
        /metrics)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics") as r:
            text = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("python_gc_collections_total{")
        )

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)


def _callers(target: str, users: int, seconds: float) -> dict[str, Any]:
    """``users`` threads of this process, each with the bundled client (one channel each),
    calling Analyze on the mix back to back for ``seconds``: latencies (ms), failures, the
    elapsed time and this process's CPU seconds meanwhile."""
    from nidaan.client import Client

    studies = _studies()
    with Client(target) as warm:
        warm.analyze(studies["ct"][0])

    @contextlib.contextmanager
    def caller() -> Iterator[Callable[[list[bytes]], Any]]:
        with Client(target, timeout_s=300) as client:  # one channel per caller
            yield client.analyze

    return _drive(studies, users, seconds, caller)


def served_threads(users: int, seconds: float, work: Path) -> dict[str, float]:
    """Studies/s, latencies, and server and client CPU of ``users`` threads calling Analyze."""
    with _Server(work) as server:
        cpu0, gc0 = _cpu(server.ps), server.gc_collections()
        calls = _callers(f"127.0.0.1:{server.grpc_port}", users, seconds)
        server_cpu = _cpu(server.ps) - cpu0
        collections = server.gc_collections() - gc0
    return {**_summary(calls, server_cpu), "gc_collections": collections}


def _summary(calls: dict[str, Any], server_cpu: float) -> dict[str, float]:
    latencies, elapsed = calls["latencies"], calls["elapsed"]
    n = max(1, len(latencies))
    return {
        "rate": len(latencies) / elapsed,
        "median": statistics.median(latencies) if latencies else float("nan"),
        "p95": statistics.quantiles(latencies, n=20)[18] if len(latencies) > 1 else 0.0,
        "studies": float(len(latencies)),
        "failed": float(calls["failed"]),
        "server_cpu_ms": server_cpu / n * 1000,
        "client_cpu_ms": calls["client_cpu"] / n * 1000,
        "client_cores": calls["client_cpu"] / elapsed,
        "server_cores": server_cpu / elapsed,
    }


def floor_server(port: int, threads: int) -> None:
    """Serve Analyze the way ``nidaan serve`` does on the wire and do no work: the same gRPC
    settings (``server_options``), the same request-streaming handler reading the request as
    raw bytes and parsing it, an empty response. What gRPC itself costs per call."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from nidaan.client.proto import inference_pb2 as pb
    from nidaan.server.api import SERVICE, server_options

    def analyze(requests: Any, context: Any) -> Any:
        for data in requests:
            pb.AnalyzeRequest.FromString(data)
        return pb.AnalyzeResponse()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Analyze": grpc.stream_unary_rpc_method_handler(
                analyze, response_serializer=pb.AnalyzeResponse.SerializeToString
            )
        },
    )
    server = grpc.server(
        ThreadPoolExecutor(threads), handlers=[handler], options=server_options(512 << 20)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def transport_floor(users: int, seconds: float) -> dict[str, float]:
    """The same callers and requests against :func:`floor_server` (in its own process): the
    server's and the client's CPU per call that any handler starts from."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--floor-server", str(port), "--users", str(users)]
    )
    try:
        wait_for_port(port, timeout=60, proc=proc)
        ps = psutil.Process(proc.pid)
        cpu0 = _cpu(ps)
        calls = _callers(f"127.0.0.1:{port}", users, seconds)
        server_cpu = _cpu(ps) - cpu0
    finally:
        stop(proc)
    return _summary(calls, server_cpu)


def served_locust(users: int, seconds: float, work: Path) -> dict[str, str]:
    """Locust's aggregated row for the whole run against ``nidaan serve``."""
    with _Server(work) as server:
        locust = Path(sys.executable).parent / "locust"
        run = subprocess.run(
            [
                str(locust),
                "-f",
                str(ROOT / "benchmarks" / "locustfile.py"),
                "IntegratorUser",
                "--headless",
                "--users",
                str(users),
                "--spawn-rate",
                str(users),
                "--run-time",
                f"{max(1, int(seconds))}s",
                "--host",
                f"127.0.0.1:{server.grpc_port}",
                "--csv",
                str(work / "locust"),
                "--only-summary",
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode not in (0, 1):  # 1: some requests failed (reported below)
            raise RuntimeError(run.stderr[-2000:])
    with open(work / "locust_stats.csv") as f:
        return next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")


def _row(
    figure: str,
    value: float,
    unit: str,
    baseline: str | None = None,
    baseline_value: float | None = None,
    target: str | None = None,
    met: bool | None = None,
    why: str | None = None,
) -> dict[str, Any]:
    ratio = None if not baseline_value else round(value / baseline_value, 3)
    return {
        "figure": figure,
        "value": round(value, 2),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": None if baseline_value is None else round(baseline_value, 2),
        "ratio": ratio,
        "target": target,
        "met": met,
        "why": why,
    }


def run(smoke: bool = False, users: int = 16, seconds: float = 30.0) -> dict[str, Any]:
    """Measure; the benchmark convention's dict (benchmarks/README.md)."""
    if smoke:
        users, seconds = 2, 3.0
    command = (
        ".venv/bin/python benchmarks/load.py --smoke"
        if smoke
        else f".venv/bin/python benchmarks/load.py --users {users} --seconds {seconds:g}"
    )
    rate, latencies, cpu_ms = in_process(users, seconds)
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [0.0] * 19
    print(
        f"in process: {rate:.1f} studies/s, median {statistics.median(latencies):.0f} ms, "
        f"p95 {q[18]:.0f} ms ({len(latencies)} studies, {users} threads), "
        f"{cpu_ms:.1f} CPU ms per study",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        threads = served_threads(users, seconds, Path(tmp) / "threads")
    ratio = threads["rate"] / rate
    print(
        f"gRPC ({users} threads, bundled client): {threads['rate']:.1f} studies/s, median "
        f"{threads['median']:.0f} ms, p95 {threads['p95']:.0f} ms, {threads['studies']:.0f} "
        f"studies, {threads['failed']:.0f} failed; {ratio:.2f}x of in process; server "
        f"{threads['server_cpu_ms']:.1f} CPU ms per study ({threads['server_cores']:.2f} "
        f"cores), client {threads['client_cores']:.2f} cores; "
        f"{threads['gc_collections']:.0f} garbage collections in the server meanwhile",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        row = served_locust(users, seconds, Path(tmp) / "locust")
    locust_rate = float(row["Requests/s"])
    print(
        f"gRPC (locust, {users} users): {locust_rate:.1f} studies/s, median "
        f"{row['50%']} ms, p95 {row['95%']} ms, {row['Request Count']} studies, "
        f"{row['Failure Count']} failed; {locust_rate / rate:.2f}x of in process"
    )
    floor = transport_floor(users, seconds)
    best = cpu_ms / (cpu_ms + floor["server_cpu_ms"] + floor["client_cpu_ms"])
    print(
        f"gRPC alone (a handler that does no work, same settings, callers and requests): "
        f"{floor['rate']:.1f} calls/s, server {floor['server_cpu_ms']:.2f} + client "
        f"{floor['client_cpu_ms']:.2f} CPU ms per call; on these cores no handler can do "
        f"better than {cpu_ms:.1f} / ({cpu_ms:.1f} + {floor['server_cpu_ms']:.2f} + "
        f"{floor['client_cpu_ms']:.2f}) = {best:.2f}x",
        flush=True,
    )
    met = ratio >= TARGET
    # A second, independent measure of the same ratio: if both runs are bound by the machine's
    # cores (the server and its callers share them), studies/s go as 1 / CPU per study, so the
    # CPU figures alone predict the ratio the clock measured.
    client_ms = threads["client_cpu_ms"]
    predicted = cpu_ms / (threads["server_cpu_ms"] + client_ms)
    cores_in_process = cpu_ms * rate / 1000
    cores_served = threads["server_cores"] + threads["client_cores"]
    handler_ms = threads["server_cpu_ms"] - cpu_ms - floor["server_cpu_ms"]
    print(
        f"CPU-bound prediction: {cpu_ms:.1f} ms in process / "
        f"({threads['server_cpu_ms']:.1f} ms server + {client_ms:.1f} ms client) = "
        f"{predicted:.2f}x; cores busy {cores_in_process:.2f} in process, "
        f"{cores_served:.2f} over gRPC; Nidaan's handler adds {handler_ms:.1f} ms per study "
        f"beyond the work and gRPC itself",
        flush=True,
    )
    why = (
        f"the server and its callers share the cores ({cores_in_process:.2f} busy in process, "
        f"{cores_served:.2f} over gRPC), so studies/s go as 1 / CPU per study: "
        f"{cpu_ms:.1f} ms in process against {threads['server_cpu_ms']:.1f} + "
        f"{client_ms:.1f} ms (server + client) predicts {predicted:.2f}x, and gRPC alone "
        f"with a handler doing nothing costs {floor['server_cpu_ms']:.1f} + "
        f"{floor['client_cpu_ms']:.1f} ms per call, so no handler could pass {best:.2f}x "
        "here; docs/configuration.md, 'gRPC memory and overhead'"
    )
    rows = [
        _row("in process: studies/s", rate, "studies/s"),
        _row(
            f"gRPC Analyze, {users} concurrent callers (threads, bundled client): studies/s",
            threads["rate"],
            "studies/s",
            f"in process, {users} threads",
            rate,
            f">= {TARGET}x",
            met,
            None if met else why,
        ),
        _row(
            "server CPU per study over gRPC",
            threads["server_cpu_ms"],
            "ms",
            "CPU per study in process",
            cpu_ms,
        ),
        _row("client CPU per study over gRPC (bundled client, same machine)", client_ms, "ms"),
        _row(
            "gRPC alone (handler doing no work): server CPU per call",
            floor["server_cpu_ms"],
            "ms",
        ),
        _row(
            "gRPC alone (handler doing no work): client CPU per call", floor["client_cpu_ms"], "ms"
        ),
        _row(
            "best ratio any handler could reach here (in process / (in process + gRPC alone))",
            best,
            "x",
        ),
        _row(
            "ratio predicted from CPU per study (in process / (server + client))",
            predicted,
            "x",
        ),
        _row(
            "garbage collections in the server during the gRPC run (core.heap)",
            threads["gc_collections"],
            "collections",
        ),
        _row(
            f"gRPC Analyze, {users} locust users: studies/s",
            locust_rate,
            "studies/s",
            f"in process, {users} threads",
            rate,
            None,
            None,
            "locust shares the cores with the server",
        ),
    ]
    return {
        "name": "load",
        "title": f"gRPC Analyze at {users} concurrent callers against the same work in process",
        "command": command,
        "rows": rows,
        "plot": {
            "kind": "bar",
            "title": f"studies/s, {users} concurrent callers",
            "xlabel": "",
            "ylabel": "studies/s",
            "x": ["in process", "gRPC (threads)", "gRPC (locust)"],
            "series": {"studies/s": [round(rate, 2), round(threads["rate"], 2), locust_rate]},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 callers, 3 s each")
    parser.add_argument("--json", type=Path, help="write the result dict here")
    parser.add_argument("--floor-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        floor_server(args.floor_server, args.users + 8)
        return
    result = run(args.smoke, args.users, args.seconds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
