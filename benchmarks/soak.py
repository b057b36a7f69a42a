"""A long run of ``nidaan serve`` at a fixed DICOM arrival rate: does anything grow but the spool?

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--rate 2] [--retention-minutes M]
                                        [--smoke] [--json PATH]

Starts ``nidaan serve`` with dcmtk's ``storescp`` as the PACS its reports go to, and sends it
studies open loop (one ``storescu`` per study, TCP_NODELAY=1, ``--rate`` studies a second
whatever the server does), each a study it has not seen: of every six, four one-image 1024 x 1024
synthetic chest radiographs, one JPEG 2000 chest radiograph (pydicom-data's RG1_J2KR, decoded in
the decode pool) and one four-slice CT study. Every ``interval`` seconds it samples all of Nidaan's
processes (the server, its receivers and its pools): resident memory, open file descriptors,
threads, and the size of the data folder. At the end it waits for the last reports.

What it says: studies whose C-STORE failed, studies without an SR at the PACS, and whether
memory, descriptors and threads stay level once warm (the median of the last third of the samples
against the first third after the first minute). The data folder grows with every study until
retention removes what was delivered (days, by default): the figure per study is what an
administrator sizes the disk by (docs/sizing.md). ``--retention-minutes M`` keeps finished studies
M minutes instead, so that in a run of more than twice that the folder must stop growing: the
largest it gets in the second half against the first. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))  # when imported by run_all.py

import report  # noqa: E402
from workload import (  # noqa: E402
    DCMTK_ENV,
    ROOT,
    dcmtk,
    free_port,
    nidaan_config,
    sample_file,
    save,
    start_nidaan,
    stop,
    synthetic_ct_series,
    synthetic_cxr,
    wait_for_port,
    with_new_uids,
)

#: Memory, descriptors or threads growing by more than this from the first third of the run to
#: the last is what a leak looks like at this length: warm-up is over after the first minute.
LEVEL = 1.10


class _Studies:
    """The mix of studies, each sent as a new study (new UIDs), written to ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cxr = [
            synthetic_cxr(2000 + i, nodule=i % 2 == 0, rows=1024, columns=1024)[0] for i in range(4)
        ]
        self.ct = [synthetic_ct_series(2100 + i, (1,), slices=4, size=512)[0] for i in range(2)]
        self.j2k = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))

    def files(self, k: int) -> tuple[list[Path], list[str]]:
        """The ``k``-th study's files, and what ``storescu`` must propose to send them."""
        out = self.folder / str(k)
        kind = k % 6
        datasets: list[Dataset]
        if kind == 5:
            study, series = generate_uid(), generate_uid()
            datasets = [with_new_uids(ds, study, series) for ds in self.ct[k % 2]]
        elif kind == 4:
            datasets = [with_new_uids(self.j2k)]
        else:
            datasets = [with_new_uids(self.cxr[kind])]
        paths = [save(ds, out / f"{i}.dcm") for i, ds in enumerate(datasets)]
        # storescu proposes uncompressed transfer syntaxes only, unless told: -xv adds JPEG
        # 2000 lossless, the file's own.
        return paths, (["-xv"] if kind == 4 else [])


def _cpu(server: psutil.Process) -> float:
    """CPU seconds of the server and its processes so far."""
    total = 0.0
    for p in [server, *server.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _sample(server: psutil.Process, data: Path, started: float) -> dict[str, float]:
    procs = [server, *server.children(recursive=True)]
    rss = fds = threads = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
            threads += p.num_threads()
        except psutil.Error:  # a pool's process that just ended
            continue
    size = 0
    for folder, _, files in os.walk(data):  # the sweeper may remove what this walks over
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                size += os.stat(os.path.join(folder, name)).st_size
    return {
        "minutes": (time.monotonic() - started) / 60,
        "rss_mib": rss / 2**20,
        "server_rss_mib": server.memory_info().rss / 2**20,
        "processes": float(len(procs)),
        "fds": float(fds),
        "threads": float(threads),
        "data_mib": size / 2**20,
    }


def measure(minutes: float, rate: float, interval: float, retention: float) -> dict[str, Any]:
    """Send for ``minutes`` at ``rate`` studies/s, sampling every ``interval`` s; ``retention``
    (minutes, 0 for the product's defaults): how long finished studies' instances and results
    are kept, swept every 30 s."""
    work = Path(tempfile.mkdtemp(prefix="nidaan-soak-"))
    studies = _Studies(work / "out")
    pacs_port, nidaan_port = free_port(), free_port()
    pacs_dir = work / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(pacs_dir), "+xa", str(pacs_port)],
        env=DCMTK_ENV,
    )
    config = nidaan_config(
        work / "nidaan.toml",
        port=nidaan_port,
        data_dir=work / "data",
        models=ROOT / "models",
        extra='[reports]\ndestinations = ["PACS"]\n'
        + (
            f"[retention]\nspool_days = {retention / 1440}\nreports_days = {retention / 1440}\n"
            "interval_s = 30\n"
            if retention
            else ""
        ),
        peers={"PACS": pacs_port},
    )
    nidaan = start_nidaan(config, work / "nidaan.log")
    sent, refused = [0], [0]
    lock = threading.Lock()

    def send(k: int) -> None:
        paths, propose = studies.files(k)
        run = subprocess.run(
            [dcmtk("storescu"), *propose, "-aet", "MODALITY", "-aec", "NIDAAN"]
            + ["127.0.0.1", str(nidaan_port), *map(str, paths)],
            env=DCMTK_ENV,
            capture_output=True,
        )
        shutil.rmtree(paths[0].parent, ignore_errors=True)
        with lock:
            (sent if run.returncode == 0 else refused)[0] += 1

    samples: list[dict[str, float]] = []
    try:
        wait_for_port(pacs_port, proc=pacs)
        wait_for_port(nidaan_port, timeout=180, proc=nidaan)
        server = psutil.Process(nidaan.pid)
        data = work / "data"
        started = time.monotonic()
        cpu0 = _cpu(server)
        samples.append(_sample(server, data, started))
        senders: list[threading.Thread] = []
        k, due, sampled = 0, started, started
        while (now := time.monotonic()) < started + minutes * 60:
            if now >= due:  # open loop: the next study leaves on time, whatever the last did
                senders.append(threading.Thread(target=send, args=(k,)))
                senders[-1].start()
                k, due = k + 1, due + 1 / rate
            if now - sampled >= interval:
                samples.append(_sample(server, data, started))
                sampled = now
            time.sleep(0.005)
        for t in senders:
            t.join()
        sending = time.monotonic() - started
        deadline = time.monotonic() + 300
        while len(list(pacs_dir.glob("SR*"))) < sent[0] and time.monotonic() < deadline:
            time.sleep(0.5)
        drained = time.monotonic() - started - sending
        reports = len(list(pacs_dir.glob("SR*")))
        samples.append(_sample(server, data, started))
        cpu = _cpu(server) - cpu0
    finally:
        stop(nidaan)
        stop(pacs)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "studies": k,
        "sent": sent[0],
        "refused": refused[0],
        "reports": reports,
        "sending_s": sending,
        "drained_s": drained,
        "cpu_s": cpu,
        "samples": samples,
    }


def _thirds(samples: list[dict[str, float]], key: str) -> tuple[float, float]:
    """The median of ``key`` over the first third of the samples taken after the first minute
    (or after the first sample, in a run shorter than three minutes) and over the last third."""
    warm = [s for s in samples[1:-1] if s["minutes"] >= 1.0] or samples[1:-1] or samples
    third = max(1, len(warm) // 3)
    return statistics.median(s[key] for s in warm[:third]), statistics.median(
        s[key] for s in warm[-third:]
    )


def run(
    smoke: bool = False,
    *,
    minutes: float = 10.0,
    rate: float = 2.0,
    interval: float = 15.0,
    retention: float = 0.0,
) -> dict[str, Any]:
    """The benchmark convention's dict (benchmarks/README.md); ``smoke``: 20 s, sampled every
    2 s."""
    if smoke:
        minutes, interval = 1 / 3, 2.0
    m = measure(minutes, rate, interval, retention)
    samples = m["samples"]
    print(
        f"{m['studies']} studies in {m['sending_s']:.0f} s ({rate}/s), {m['refused']} refused; "
        f"{m['reports']} SRs at the PACS, the last {m['drained_s']:.1f} s after every send ended"
    )
    for s in samples:
        print(
            f"  {s['minutes']:5.1f} min: {s['rss_mib']:6.0f} MiB in {s['processes']:.0f} "
            f"processes (server {s['server_rss_mib']:.0f}), {s['fds']:.0f} fds, "
            f"{s['threads']:.0f} threads, data {s['data_mib']:.0f} MiB"
        )
    rows = [
        report.row("studies sent", m["studies"], "studies"),
        report.row("C-STORE refused or failed", m["refused"], "studies", target="<= 0"),
        report.row(
            "studies acknowledged without an SR at the PACS",
            m["sent"] - m["reports"],
            "studies",
            target="<= 0",
        ),
        report.row("waiting for the last SRs once every send had ended", m["drained_s"], "s"),
        report.row(
            "CPU of Nidaan's processes per study", m["cpu_s"] / max(1, m["sent"]) * 1000, "ms"
        ),
    ]
    why = "growing while the arrival rate stays the same: a leak, or a cache without a bound"
    for key, label, unit in (
        ("rss_mib", "resident memory of Nidaan's processes", "MiB"),
        ("fds", "open file descriptors of Nidaan's processes", "fds"),
        ("threads", "threads of Nidaan's processes", "threads"),
    ):
        first, last = _thirds(samples, key)
        rows.append(
            report.row(
                f"{label}, last third of the run",
                last,
                unit,
                baseline="first third after the first minute",
                baseline_value=first,
                target=f"<= {LEVEL}x",
                on="ratio",
                why=why,
            )
        )
    if retention:  # before the sweeper may remove anything: the studies sent by then
        before = [s for s in samples if s["minutes"] <= retention]
        sent_by_then = max(1.0, before[-1]["minutes"] * 60 * rate)
        per_study = (before[-1]["data_mib"] - before[0]["data_mib"]) / sent_by_then
    else:
        per_study = (samples[-1]["data_mib"] - samples[0]["data_mib"]) / max(1, m["sent"])
    rows.append(report.row("data folder per study", per_study, "MiB"))
    if retention:
        half = minutes / 2
        first = max(s["data_mib"] for s in samples if s["minutes"] <= half)
        last = max(s["data_mib"] for s in samples if s["minutes"] > half)
        rows.append(
            report.row(
                f"data folder with {retention:g} min retention, largest in the second half",
                last,
                "MiB",
                baseline="largest in the first half",
                baseline_value=first,
                target=f"<= {LEVEL}x",
                on="ratio",
                why="the retention sweeper does not keep up with what arrives",
            )
        )
    args = [] if smoke else [f"--minutes {minutes:g}", f"--rate {rate:g}"]
    args += [f"--retention-minutes {retention:g}"] if retention else []
    length = f"{minutes:g} min" if minutes >= 1 else f"{minutes * 60:.0f} s"
    return report.result(
        "soak",
        f"nidaan serve for {length} at {rate:g} studies/s (radiographs, JPEG 2000, CT; "
        "storescu -> nidaan serve -> SR at a storescp PACS): what grows",
        report.command_line("soak.py", smoke, *args),
        rows,
        report.plot_spec(
            "line",
            "Nidaan's processes during the run",
            "minutes",
            "MiB / count",
            [round(s["minutes"], 2) for s in samples],
            {
                "resident memory (MiB)": [s["rss_mib"] for s in samples],
                "open file descriptors": [s["fds"] for s in samples],
                "threads": [s["threads"] for s in samples],
            },
        ),
        samples=samples,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0, help="studies per second")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between samples")
    parser.add_argument(
        "--retention-minutes",
        type=float,
        default=0.0,
        help="keep finished studies this long, swept every 30 s (0: the product's defaults)",
    )
    report.add_convention_arguments(parser)
    args = parser.parse_args()
    data = run(
        args.smoke,
        minutes=args.minutes,
        rate=args.rate,
        interval=args.interval,
        retention=args.retention_minutes,
    )
    report.print_rows(data)
    report.write_json(data, args.json)


if __name__ == "__main__":
    main()
