"""Server memory under a burst of gRPC calls of CT studies: peak and settled resident size.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/grpc_memory.py [--calls 200] [--slices 16] [--settle 60]
                                               [--malloc-arena-max 2] [--json PATH]
    .venv/bin/python benchmarks/grpc_memory.py --smoke      # seconds: 8 calls of 2 small slices

Starts ``nidaan serve`` (embedded backend, defaults: ``grpc.max_inflight_mb = 48``) with
``MALLOC_ARENA_MAX=2`` in its environment, the two heaps ``nidaan serve`` also sets by itself
(``--malloc-arena-max 0``: leave the environment alone), measures
its idle resident set size (RSS, psutil), then sends ``--calls`` calls at once, each a CT study
of ``--slices`` 512 x 512 16-bit slices (``--slices`` x 0.5 MiB: 200 x 16 slices are 1.6 GiB in
flight if the server held them all), first all as ``AnalyzeStudy`` (instances streamed one per
message), then all as ``Analyze`` (one message per study). While they run it samples the
server's RSS every 50 ms; after the last call it samples once a second for ``--settle`` seconds.
Figures: peak RSS over idle (target at most 512 MiB) and RSS over idle at the end of the settle
time (target at most 100 MiB), per RPC. Calls refused (RESOURCE_EXHAUSTED: no room within
``grpc.admission_timeout_s``, raised to 300 s here so that every call is served) are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # workload.py, also when not run as a script

from workload import (  # noqa: E402
    _bytes,
    free_port,
    nidaan_config,
    start_nidaan,
    stop,
    synthetic_ct_series,
    wait_for_port,
)

MIB = 1 << 20
PEAK_TARGET_MIB = 512
SETTLED_TARGET_MIB = 100


def _rss(proc: psutil.Process) -> int:
    return int(proc.memory_info().rss)


def _burst(
    target: str, studies: list[list[bytes]], calls: int, rpc: str, proc: psutil.Process
) -> tuple[list[tuple[float, int]], int, int, float]:
    """Send ``calls`` calls at once; (RSS samples, served, refused, seconds)."""
    from nidaan.client import Client
    from nidaan.core.errors import NidaanError

    samples: list[tuple[float, int]] = []
    done = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic() - started, _rss(proc)))
            time.sleep(0.05)

    outcomes: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(calls + 1)

    def call(n: int, client: Any) -> None:
        study = studies[n % len(studies)]
        gate.wait()
        try:
            if rpc == "AnalyzeStudy":
                client.analyze_study(study)
            else:
                client.analyze(study)
            outcome = "OK"
        except NidaanError as exc:
            outcome = str(exc).split(":")[0]
        with lock:
            outcomes.append(outcome)

    # Several channels, as several integrators would have (one HTTP/2 connection each).
    clients = [Client(target, timeout_s=900) for _ in range(8)]
    threads = [
        threading.Thread(target=call, args=(n, clients[n % len(clients)])) for n in range(calls)
    ]
    for t in threads:
        t.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    gate.wait()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    done.set()
    sampler.join()
    for c in clients:
        c.close()
    served = outcomes.count("OK")
    return samples, served, len(outcomes) - served, seconds


def _settle(proc: psutil.Process, seconds: float) -> list[tuple[float, int]]:
    """RSS once a second for ``seconds``."""
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        samples.append((time.monotonic() - started, _rss(proc)))
        time.sleep(1.0)
    return samples


def run(
    smoke: bool = False,
    calls: int = 200,
    slices: int = 16,
    settle_s: float = 60.0,
    malloc_arena_max: int = 2,
) -> dict[str, Any]:
    """Measure; the benchmark convention's dict (benchmarks/README.md)."""
    size = 512
    if smoke:
        calls, slices, size, settle_s = 8, 2, 128, 3.0
    command = (
        ".venv/bin/python benchmarks/grpc_memory.py --smoke"
        if smoke
        else f".venv/bin/python benchmarks/grpc_memory.py --calls {calls} --slices {slices} "
        f"--settle {settle_s:g} --malloc-arena-max {malloc_arena_max}"
    )
    studies = [
        [_bytes(ds) for ds in synthetic_ct_series(700 + i, (1,), slices=slices, size=size)[0]]
        for i in range(4)
    ]
    rows: list[dict[str, Any]] = []
    plot_x: list[float] = []
    series: dict[str, list[float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        grpc_port = free_port()
        config = nidaan_config(
            work / "nidaan.toml",
            port=free_port(),
            data_dir=work / "data",
            models=ROOT / "models",
            extra=(
                f'[grpc]\nbind = "127.0.0.1"\nport = {grpc_port}\nadmission_timeout_s = 300.0\n'
            ),
        )
        saved = os.environ.get("MALLOC_ARENA_MAX")
        if malloc_arena_max > 0:  # read by glibc when the server process starts
            os.environ["MALLOC_ARENA_MAX"] = str(malloc_arena_max)
        try:
            server = start_nidaan(config, work / "nidaan.log")
        finally:
            if saved is None:
                os.environ.pop("MALLOC_ARENA_MAX", None)
            else:
                os.environ["MALLOC_ARENA_MAX"] = saved
        try:
            wait_for_port(grpc_port, timeout=180, proc=server)
            proc = psutil.Process(server.pid)
            target = f"127.0.0.1:{grpc_port}"
            from nidaan.client import Client

            with Client(target) as warm:  # models loaded, kernels compiled, threads started
                for rpc_study in studies[:1]:
                    warm.analyze_study(rpc_study)
                    warm.analyze(rpc_study)
            time.sleep(2.0 if not smoke else 0.5)
            idle = _rss(proc)
            print(f"idle RSS: {idle / MIB:.0f} MiB", flush=True)
            for rpc in ("AnalyzeStudy", "Analyze"):
                samples, served, refused, seconds = _burst(target, studies, calls, rpc, proc)
                peak = max(r for _, r in samples) if samples else _rss(proc)
                after = _settle(proc, settle_s)
                settled = after[-1][1] if after else _rss(proc)
                back = next((t for t, r in after if r - idle <= SETTLED_TARGET_MIB * MIB), None)
                print(
                    f"{rpc}: {calls} calls of {slices} x {size} x {size} CT slices in "
                    f"{seconds:.1f} s ({served} served, {refused} refused): peak RSS "
                    f"{peak / MIB:.0f} MiB (idle + {(peak - idle) / MIB:.0f} MiB), "
                    f"{settle_s:.0f} s later {settled / MIB:.0f} MiB (idle + "
                    f"{(settled - idle) / MIB:.0f} MiB)"
                    + ("" if back is None else f", within idle + 100 MiB after {back:.0f} s"),
                    flush=True,
                )
                over_peak = (peak - idle) / MIB
                over_settled = (settled - idle) / MIB
                rows.append(
                    {
                        "figure": f"{rpc}: peak RSS over idle, {calls} concurrent calls of "
                        f"{slices}-slice CT studies",
                        "value": round(over_peak, 1),
                        "unit": "MiB",
                        "baseline": "idle RSS of the same server",
                        "baseline_value": round(idle / MIB, 1),
                        "ratio": None,
                        "target": f"<= {PEAK_TARGET_MIB} MiB",
                        "met": over_peak <= PEAK_TARGET_MIB,
                        "why": None
                        if over_peak <= PEAK_TARGET_MIB
                        else "see docs/configuration.md, 'gRPC memory and overhead'",
                    }
                )
                rows.append(
                    {
                        "figure": f"{rpc}: RSS over idle {settle_s:.0f} s after the burst",
                        "value": round(over_settled, 1),
                        "unit": "MiB",
                        "baseline": "idle RSS of the same server",
                        "baseline_value": round(idle / MIB, 1),
                        "ratio": None,
                        "target": f"<= {SETTLED_TARGET_MIB} MiB",
                        "met": over_settled <= SETTLED_TARGET_MIB,
                        "why": None
                        if over_settled <= SETTLED_TARGET_MIB
                        else "mostly ONNX Runtime's CPU arena (docs/configuration.md, "
                        "'gRPC memory and overhead')",
                    }
                )
                rows.append(
                    {
                        "figure": f"{rpc}: calls served of {calls}",
                        "value": float(served),
                        "unit": "calls",
                        "baseline": None,
                        "baseline_value": None,
                        "ratio": None,
                        "target": None,
                        "met": None,
                        "why": None,
                    }
                )
                timeline = [(t, r) for t, r in samples] + [(seconds + t, r) for t, r in after]
                # One x axis for both: seconds from the start of the burst, in 1 s steps.
                steps = int(max(t for t, _ in timeline)) + 1 if timeline else 0
                values: list[float | None] = []
                for s in range(steps):
                    near = [r for t, r in timeline if s <= t < s + 1]
                    values.append(round(max(near) / MIB, 1) if near else None)
                series[f"{rpc} RSS (MiB)"] = values
                plot_x = list(range(max(len(plot_x), steps)))
        finally:
            stop(server)
    for values in series.values():  # align the series on the longest x
        values.extend([None] * (len(plot_x) - len(values)))
    return {
        "name": "grpc_memory",
        "title": f"nidaan serve resident memory under {calls} concurrent gRPC calls of CT studies",
        "command": command,
        "rows": rows,
        "plot": {
            "kind": "line",
            "title": f"server RSS, {calls} concurrent calls then {settle_s:.0f} s idle",
            "xlabel": "seconds from the start of the burst",
            "ylabel": "RSS (MiB)",
            "x": plot_x,
            "series": series,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--settle", type=float, default=60.0, help="seconds to watch after")
    parser.add_argument(
        "--malloc-arena-max", type=int, default=2, help="the server's MALLOC_ARENA_MAX (0: unset)"
    )
    parser.add_argument("--smoke", action="store_true", help="seconds: 8 calls, tiny studies")
    parser.add_argument("--json", type=Path, help="write the result dict here")
    args = parser.parse_args()
    result = run(args.smoke, args.calls, args.slices, args.settle, args.malloc_arena_max)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
