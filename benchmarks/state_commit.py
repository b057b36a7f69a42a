"""The state database's group commit: instances recorded per second by 1-8 threads at once;
and the per-study cap's check, counted against kept.

    .venv/bin/python benchmarks/state_commit.py [--instances 400] [--dir PATH]

Each receiving process records every instance in SQLite (WAL, ``synchronous=FULL``) before its
C-STORE response; its associations' threads call ``StateStore.add_instance`` at once. Here
1, 2, 4 and 8 threads each record ``--instances`` distinct instances (of 4 studies) into one
store on the disk of ``--dir`` (default: a temporary folder; the spool's disk is the one that
counts), with nothing else in the way. One thread is the baseline measured in the same run:
each call then waits for its own commit and WAL fsync, as every call did before group commit.
(Before it, one connection serialised one transaction per call, and more threads gained only
what they overlapped outside it: 1.05-1.50x at 2-8 threads, measured with this script on the
code of e00dcd9.) The transactions per instance say how many calls each commit carried.
Then the per-study cap's check on every C-STORE: a ``COUNT(*)`` of the study's rows (before
``instance_count`` was kept) against reading the kept count, for studies of 300, 3,000 and
10,000 instances. Standalone, like profile_ingest.py: not in run_all.py and not a test; nothing
is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from nidaan.pacs_bridge.state import InstanceRecord, StateStore


def measure(folder: Path, threads: int, instances: int) -> tuple[float, float]:
    """(instances recorded per second, transactions per instance) for ``threads`` threads."""
    store = StateStore(folder / f"state-{threads}.sqlite3")
    start = threading.Barrier(threads + 1)

    def record(t: int) -> None:
        start.wait()
        for i in range(instances):
            study = f"1.2.826.0.1.3680043.10.1.{i % 4}"
            store.add_instance(
                InstanceRecord(
                    f"{study}.{t}.{i}",
                    study,
                    f"{study}.1",
                    "1.2.840.10008.5.1.4.1.1.2",
                    folder / f"{t}-{i}.dcm",
                    True,
                ),
                "PACS",
            )

    workers = [threading.Thread(target=record, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    took = time.perf_counter() - began
    total = threads * instances
    commits = store.group_commits
    store.close()
    return total / took, commits / total


def cap_check_us(folder: Path, sizes: tuple[int, ...] = (300, 3000, 10_000)) -> list[tuple]:
    """(instances in the study, µs per ``COUNT(*)`` of its rows, µs per ``instance_count``):
    what the per-study cap cost on every C-STORE before the count was kept, and now."""
    store = StateStore(folder / "cap.sqlite3")
    rows = []
    for n in sizes:
        study = f"1.2.826.0.1.3680043.10.2.{n}"
        with store._tx() as db:  # one transaction: the set-up is not what is measured
            for i in range(n):
                rec = InstanceRecord(f"{study}.{i}", study, f"{study}.1", "1.2", folder, True)
                store._insert_instance(db, rec, "PACS")
        times = []
        for query in (
            lambda s=study: store._db.execute(
                "SELECT COUNT(*) FROM instances WHERE study_uid = ?", (s,)
            ).fetchone(),
            lambda s=study: store.instance_count(s),
        ):
            calls = 1000
            began = time.perf_counter()
            for _ in range(calls):
                query()
            times.append((time.perf_counter() - began) / calls * 1e6)
        rows.append((n, times[0], times[1]))
    store.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400, help="per thread")
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="nidaan-commit-", dir=args.dir))
    try:
        base = 0.0
        print("threads  instances/s  transactions per instance  against 1 thread")
        for threads in (1, 2, 4, 8):
            rate, per = measure(folder, threads, args.instances)
            base = base or rate
            print(f"{threads:7d}  {rate:11.0f}  {per:25.2f}  {rate / base:15.2f}x")
        print("\nthe per-study cap's check: instances  COUNT(*) µs  instance_count µs")
        for n, count, kept in cap_check_us(folder):
            print(f"{n:37d}  {count:11.1f}  {kept:17.1f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
