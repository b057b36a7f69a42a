"""Real peers for tests: Orthanc (the PACS), dcmtk and dicom3tools, started on loopback.

When a peer's program is missing, a test fails under CI (CI=true) with a message naming the
Debian package to install, and is skipped with that message elsewhere: never silently.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest


@dataclass(frozen=True)
class PeerProgram:
    """The Debian package that provides a peer program, and how to tell the right program: run
    with ``version_argument``, the first line it prints (stdout, else stderr) starts with
    ``banner``."""

    package: str
    version_argument: str
    banner: str  # "{program}" is replaced by the program's name


DCMTK = PeerProgram("dcmtk", "--version", "$dcmtk: {program} v")  # "$dcmtk: storescp v3.6.7 ..."

#: Every peer program the tests run. The banner check matters: pynetdicom installs console
#: scripts named like dcmtk's tools (storescp, storescu, echoscu, findscu) in the venv's bin.
PROGRAMS = {
    "Orthanc": PeerProgram("orthanc", "--version", "Orthanc "),
    **{
        name: DCMTK
        for name in ("storescu", "storescp", "echoscu", "dsrdump", "dcmcjpeg", "dcmcrle", "dcmconv")
    },
    "dciodvfy": PeerProgram("dicom3tools", "-version", "dicom3tools Version:"),
    "openssl": PeerProgram("openssl", "version", "OpenSSL "),
    # The browser the status page is tested in (tests/test_status_page.py, with Playwright).
    "chromium": PeerProgram("chromium", "--version", "Chromium "),
}
PACKAGES = {name: program.package for name, program in PROGRAMS.items()}

#: Where system packages install programs (Debian's default PATH order), searched before PATH.
SYSTEM_BIN_DIRS: tuple[str, ...] = (
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
)

#: dcmtk stalls about 40 ms per file on loopback without TCP_NODELAY (see shared/design.md).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _venv_bins() -> set[Path]:
    """Bin directories of virtual environments (this interpreter's, an activated one's): never
    searched. A system bin directory is never among them (a candidate there is checked by its
    banner like any other)."""
    bins = {Path(sys.executable).parent}
    if sys.prefix != sys.base_prefix:
        bins.add(Path(sys.prefix) / "bin")
    if os.environ.get("VIRTUAL_ENV"):
        bins.add(Path(os.environ["VIRTUAL_ENV"]) / "bin")
    system = {Path(d).resolve() for d in SYSTEM_BIN_DIRS}
    return {b.resolve() for b in bins} - system


def _banner(path: str, spec: PeerProgram) -> str:
    """The first line ``path`` prints when asked its version ("" if it cannot say)."""
    try:
        run = subprocess.run(
            [path, spec.version_argument],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    for stream in (run.stdout, run.stderr):
        lines = stream.strip().splitlines()
        if lines:
            # Some (Orthanc) start with the path they were run as: keep only its name.
            first, space, rest = lines[0].partition(" ")
            return f"{os.path.basename(first)}{space}{rest}"
    return ""


@functools.cache
def _locate(program: str, dirs: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """The first ``program`` in ``dirs`` whose version banner is the expected one, and the
    impostors met on the way (path: what they printed)."""
    spec = PROGRAMS.get(program)
    excluded = _venv_bins()
    impostors = []
    seen: set[Path] = set()
    for folder in dirs:
        candidate = Path(folder) / program
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        real = candidate.resolve()
        if real in seen:
            continue
        seen.add(real)
        if real.parent in excluded or Path(folder).resolve() in excluded:
            impostors.append(f"{candidate}, in a virtual environment's bin")
            continue
        if spec is None:
            return str(candidate), tuple(impostors)
        banner = _banner(str(candidate), spec)
        if banner.startswith(spec.banner.format(program=program)):
            return str(candidate), tuple(impostors)
        impostors.append(f"{candidate}, which printed {banner[:60]!r}")
    return None, tuple(impostors)


def search_path() -> tuple[str, ...]:
    """Where peers are looked for: the system's bin directories, then PATH (a virtual
    environment's bin is skipped, wherever it appears)."""
    path = tuple(p for p in os.environ.get("PATH", "").split(os.pathsep) if p)
    return SYSTEM_BIN_DIRS + tuple(p for p in path if p not in SYSTEM_BIN_DIRS)


def locate(program: str) -> str | None:
    """The path of the real ``program`` (identified by its version banner), or None."""
    return _locate(program, search_path())[0]


def unavailable(why: str) -> NoReturn:
    """What this test needs is missing here (a program, a package, root): a failure under CI
    (CI=true), whose test command installs everything and runs as root, and a skip on a
    contributor's machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)  # outside CI only: under CI=true the line above fails instead


def need(program: str) -> str:
    """The path of the real ``program``; fail (under CI) or skip naming the Debian package.

    Programs are looked up in the system's bin directories first, then on PATH, never in a
    virtual environment's bin, and each candidate must print its project's version banner:
    pynetdicom's ``storescp`` is not dcmtk's."""
    path, impostors = _locate(program, search_path())
    if path is None:
        package = PACKAGES.get(program, program)
        found = f" (passed over: {'; '.join(impostors)})" if impostors else ""
        msg = (
            f"{program} from Debian's {package} package is not installed{found}: "
            f"apt-get install {package} (the README's test command does this)"
        )
        unavailable(msg)
    return path


def workload() -> types.ModuleType:
    """``benchmarks/workload.py``, loaded once under the name the benchmarks import it by (the
    benchmarks never import the tests): one :func:`free_port` for both, and, in a test that
    also imports a benchmark's modules, one record of the ports handed out in that process."""
    if "workload" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "workload.py"
        spec = importlib.util.spec_from_file_location("workload", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["workload"] = module
        spec.loader.exec_module(module)
    return sys.modules["workload"]


# What the tests and the benchmarks both need, from the one implementation: a free port (never
# one this process handed out before), waiting for a listener, stopping a process, Orthanc's
# configuration, and `nidaan serve` (the installed command) with its TOML config.
free_port = workload().free_port
wait_for_port = workload().wait_for_port
stop = workload().stop
orthanc_config = workload().orthanc_config
NIDAAN = workload().NIDAAN
nidaan_config = workload().nidaan_config
start_nidaan = workload().start_nidaan


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Orthanc:
    """A running Orthanc with REST on ``http_port`` and DICOM (AE ``ORTHANC``) on ``dicom_port``."""

    http_port: int
    dicom_port: int
    process: subprocess.Popen
    aet: str = "ORTHANC"

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str):  # type: ignore[no-untyped-def]
        with urllib.request.urlopen(self._url(path), timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: bytes | str, content_type: str = "application/dicom"):  # type: ignore[no-untyped-def]
        body = data.encode() if isinstance(data, str) else data
        req = urllib.request.Request(
            self._url(path), data=body, method="POST", headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            out = r.read()
        return json.loads(out) if out[:1] in (b"{", b"[") else out

    def upload(self, path: Path) -> dict:
        """Store a file in Orthanc over REST; returns Orthanc's answer (IDs of the instance)."""
        return self.post("/instances", path.read_bytes())

    def send_to(self, modality: str, resource_id: str) -> None:
        """Have Orthanc C-STORE a resource (study/series/instance ID) to a configured modality."""
        self.post(f"/modalities/{modality}/store", resource_id, content_type="text/plain")

    def study_instances(self, study_id: str) -> list[dict]:
        return self.get(f"/studies/{study_id}/instances")

    def reports(self, study_id: str) -> list[dict]:
        """Instances of the study whose series modality is SR."""
        out = []
        for series in self.get(f"/studies/{study_id}/series"):
            if series["MainDicomTags"].get("Modality") == "SR":
                out.extend(self.get(f"/series/{series['ID']}/instances"))
        return out


def start_orthanc(workdir: Path, modalities: dict[str, tuple[str, str, int]]) -> Orthanc:
    """Start a fresh Orthanc in ``workdir`` knowing the given DICOM modalities."""
    exe = need("Orthanc")
    http_port, dicom_port = free_port(), free_port()
    cfg = orthanc_config(workdir, http_port, dicom_port, modalities, name="nidaan-test-pacs")
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    wait_for_port(http_port, proc=proc)
    wait_for_port(dicom_port, proc=proc)
    return Orthanc(http_port, dicom_port, proc)


class StoreSCP:
    """dcmtk's storescp as a PACS that reports go to; not listening until ``start()``."""

    def __init__(
        self, port: int, folder: Path, aet: str = "PACS", extra: tuple[str, ...] = ()
    ) -> None:
        self.port, self.folder, self.aet, self.extra = port, folder, aet, extra
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                need("storescp"),
                *self.extra,
                "-aet",
                self.aet,
                "-od",
                str(self.folder),
                "+xa",
                str(self.port),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.process)

    def reports(self) -> list[Path]:
        """Report files storescp has finished writing (it writes in place, so a file that does
        not parse yet is still arriving)."""
        import pydicom

        done = []
        for path in sorted(self.folder.glob("SR*")):
            try:
                pydicom.dcmread(path)
            except Exception:  # noqa: BLE001 - partial file: look again on the next poll
                continue
            done.append(path)
        return done

    def wait_reports(self, n: int = 1, timeout: float = 60) -> list[Path]:
        return wait_until(
            lambda: r if len(r := self.reports()) >= n else None,
            timeout,
            f"{n} report(s) at the PACS",
        )

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@dataclass
class Triton:
    """A running tritonserver (from nvidia-pytriton) serving a copy of the model repository."""

    grpc_port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def start_triton(workdir: Path, models: Path) -> Triton:
    """Start a real tritonserver over a copy of ``models`` whose ONNX files run in the Python
    backend (deploy/triton/model.py): the wheel's tritonserver has no ONNX Runtime backend."""
    package = workload().pytriton_package()
    if package is None:
        msg = "tritonserver is not installed: pip install --no-deps nvidia-pytriton==0.7.0"
        unavailable(msg)
    args, env, grpc_port = workload().tritonserver_launch(workdir, models, package)
    log = open(workdir / "triton.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    wait_for_port(grpc_port, timeout=120, proc=proc)
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    wait_until(lambda: client.is_server_ready(), 120, "tritonserver to be ready")
    return Triton(grpc_port, proc)
