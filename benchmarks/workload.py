"""What the benchmarks and the tests send and run: one implementation for both (benchmarks do
not import from tests/; tests/peers.py and tests/factory.py load this file):

- studies: synthetic chest radiographs and small chest CT studies with real headers (pydicom-data's
  CR, pydicom's CT) and pixels from the demo models' generator (models/training/synthetic.py);
- processes: dcmtk's tools found unambiguously, ``nidaan serve``, Orthanc and tritonserver on free
  loopback ports.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]

#: Relative weights of the two kinds of study.
MIX = {"radiograph": 3, "ct": 1}
POOL = 8

# --- studies -------------------------------------------------------------------------------------


def sample_file(name: str) -> Path:
    """A file from pydicom's test data or pydicom-data (e.g. RG1_UNCR.dcm, CT_small.dcm)."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not in pydicom's test data (pip install pydicom-data)")
    return Path(str(path))


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@cache
def synthetic_module() -> Any:
    """The demo models' NumPy-only generator, loaded by path (models/ is not a package)."""
    path = ROOT / "models" / "training" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("nidaan_synthetic", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _cr_header() -> Dataset:
    return pydicom.dcmread(sample_file("RG1_UNCR.dcm"), stop_before_pixels=True)


@cache
def ct_header() -> Dataset:
    """pydicom's example CT without its pixels: the header every synthetic CT slice copies."""
    from pydicom import examples

    ds = copy.deepcopy(examples.ct)
    del ds.PixelData
    return ds


def synthetic_cxr(
    seed: int,
    *,
    nodule: bool = False,
    tb: bool = False,
    rows: int = 1024,
    columns: int = 900,
    study_uid: str | None = None,
    monochrome1: bool = False,
) -> tuple[Dataset, dict[str, np.ndarray]]:
    """A 12-bit chest radiograph with a real CR header and synthetic pixels; also lesion masks."""
    gen = synthetic_module()
    rng = np.random.default_rng(seed)
    img, masks = gen.synthesize_radiograph(rng, rows, columns, nodule=nodule, tb=tb)
    stored = np.clip(np.round(img * 4095.0), 0, 4095).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    ds = copy.deepcopy(_cr_header())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    for kw in ("RescaleSlope", "RescaleIntercept"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    return ds, masks


def synthetic_ct_series(
    seed: int,
    nodule_slices: tuple[int, ...] = (),
    *,
    slices: int = 4,
    size: int = 512,
    study_uid: str | None = None,
    patient: Dataset | None = None,
) -> tuple[list[Dataset], dict[int, np.ndarray]]:
    """An axial chest CT series (signed 16-bit, Rescale Intercept -1024) with a real CT header and
    synthetic slices; a nodule in each slice listed in ``nodule_slices``. Also the nodule masks.

    ``patient``: a dataset whose Patient module the slices take (to share a study with it)."""
    gen = synthetic_module()
    rng = np.random.default_rng(seed)
    study = study_uid or generate_uid()
    series = generate_uid()
    out, masks = [], {}
    for k in range(slices):
        hu, mask = gen.synthesize_ct_slice(rng, size, nodule=k in nodule_slices)
        if k in nodule_slices:
            masks[k] = mask
        ds = copy.deepcopy(ct_header())
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        if patient is not None:  # one patient's study: its Patient and General Study modules
            for kw in (
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "PatientSex",
                "StudyID",
                "StudyDate",
                "StudyTime",
                "AccessionNumber",
                "ReferringPhysicianName",
                "StudyDescription",
            ):
                setattr(ds, kw, patient.get(kw, ""))
        ds.ImagePositionPatient = [-250.0, -250.0, -100.0 - 5.0 * k]
        ds.SliceLocation = -100.0 - 5.0 * k
        ds.BodyPartExamined = "CHEST"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [500.0 / size, 500.0 / size]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        stored = np.round(hu + 1024.0).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        out.append(ds)
    return out, masks


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def radiograph_studies(n: int = POOL) -> list[list[bytes]]:
    """One-image 1024 x 1024 chest radiograph studies, half with a planted nodule."""
    return [
        [_bytes(synthetic_cxr(500 + i, nodule=i % 2 == 0, rows=1024, columns=1024)[0])]
        for i in range(n)
    ]


def ct_studies(n: int = POOL) -> list[list[bytes]]:
    """Four-slice 512 x 512 chest CT studies with a nodule in one slice."""
    return [
        [_bytes(ds) for ds in synthetic_ct_series(600 + i, (1,), slices=4, size=512)[0]]
        for i in range(n)
    ]


# --- processes -----------------------------------------------------------------------------------

#: dcmtk stalls about 40 ms per file on loopback without TCP_NODELAY.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

#: Searched for dcmtk's tools, then PATH; never a virtual environment's bin, where pynetdicom
#: installs console scripts of the same names (storescp, storescu, echoscu, findscu).
SYSTEM_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

NIDAAN = Path(sys.executable).parent / "nidaan"


@cache
def dcmtk(program: str) -> str:
    """The path of dcmtk's ``program`` (it prints "$dcmtk: <program> v..." for --version)."""
    in_venv = sys.prefix != sys.base_prefix
    venv = {Path(sys.executable).parent.resolve(), (Path(sys.prefix) / "bin").resolve()}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    for folder in (*SYSTEM_BIN_DIRS, *path):
        candidate = Path(folder) / program
        if not candidate.is_file() or (in_venv and candidate.resolve().parent in venv):
            continue
        try:
            run = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if run.stdout.startswith(f"$dcmtk: {program} v"):
            return str(candidate)
    raise SystemExit(f"dcmtk's {program} is not installed: apt-get install dcmtk")


#: Every port :func:`free_port` handed out in this process, and the lock that guards it.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A free high TCP port on loopback, never one this process handed out before: the kernel
    offers a port again as soon as it is closed (6 times in 20,000 calls, a port one of the
    two before it had been), and two peers of one run, each told its port before it binds,
    must not be given the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with _HANDED_OUT_LOCK:
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop(proc: subprocess.Popen, sig: int = 15, timeout: float = 20.0) -> None:
    """Stop a process and wait for it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nidaan_config(
    path: Path,
    *,
    port: int,
    data_dir: Path,
    models: Path,
    extra: str = "",
    peers: dict[str, int] | None = None,
    peer_objects: tuple[str, ...] | None = None,
) -> Path:
    """Write a Nidaan TOML config on loopback; ``peers`` maps AE titles to loopback ports,
    ``peer_objects`` (``[[peers]] objects``) what each gets, None the product's default."""
    text = (
        f'[dicom]\nbind = "127.0.0.1"\nport = {port}\n'
        f'[storage]\ndata_dir = "{data_dir}"\n[models]\nrepository = "{models}"\n{extra}'
    )
    if "[grpc]" not in extra:  # never the default port: it may be taken
        text += f'[grpc]\nbind = "127.0.0.1"\nport = {free_port()}\n'
    for ae, peer_port in (peers or {}).items():
        text += f'[[peers]]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {peer_port}\n'
        if peer_objects is not None:
            text += f"objects = [{', '.join(repr(o) for o in peer_objects)}]\n"
    path.write_text(text)
    return path


def start_nidaan(config: Path, log: Path | None = None, *, http: bool = False) -> subprocess.Popen:
    """``nidaan serve`` (the installed command) in its own process, output to ``log``."""
    args = [str(NIDAAN), "--config", str(config), "serve"] + ([] if http else ["--no-http"])
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


@cache
def orthanc_program() -> str:
    """The path of Debian's ``Orthanc`` (it prints "Orthanc <version>" for --version)."""
    for folder in SYSTEM_BIN_DIRS + tuple(os.environ.get("PATH", "").split(os.pathsep)):
        candidate = Path(folder) / "Orthanc"
        if not candidate.is_file():
            continue
        try:
            run = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        first = (run.stdout or run.stderr).strip().splitlines()[:1]
        if first and os.path.basename(first[0].split(" ")[0]) == "Orthanc":
            return str(candidate)
    raise SystemExit("Orthanc is not installed: apt-get install orthanc")


def orthanc_config(
    workdir: Path,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, tuple[str, str, int]],
    name: str,
) -> Path:
    """Write ``workdir/orthanc.json``: an Orthanc on loopback that stores whatever it is sent,
    knows ``modalities`` (AE title: (AE title, host, port)) and keeps its database in
    ``workdir/db``. The tests' and the benchmarks' Orthanc both start from it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": name,
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": True,
        "DicomModalities": {k: list(v) for k, v in modalities.items()},
        # Release each association right after sending: Nidaan completes a study on release.
        "DicomAssociationCloseDelay": 0,
        "StableAge": 1,
        "Plugins": [],
        "StorageCompression": False,
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=1))
    return path


class Orthanc:
    """A real Orthanc (the PACS) on loopback, with its own folder, REST and DICOM ports; as
    tests/peers.py starts it (benchmarks do not import tests)."""

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        self.workdir = workdir
        self.http_port, self.dicom_port = free_port(), free_port()
        self.aet = "ORTHANC"
        config = orthanc_config(
            workdir, self.http_port, self.dicom_port, modalities, name="nidaan-bench-pacs"
        )
        self._log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [orthanc_program(), str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        wait_for_port(self.http_port, proc=self.process)
        wait_for_port(self.dicom_port, proc=self.process)

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> Any:
        """One REST call; the decoded JSON answer (or the raw bytes). Raises
        ``urllib.error.HTTPError`` (its body holds Orthanc's error details) on a 4xx/5xx."""
        headers = {"Content-Type": content_type} if content_type else {}
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method, headers=headers
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            out = r.read()
        return json.loads(out) if out[:1] in (b"{", b"[") else out

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store one Part 10 instance over REST; Orthanc's answer (its IDs, ParentStudy...)."""
        answer: dict[str, Any] = self.request("POST", "/instances", data, "application/dicom")
        return answer

    def stop(self) -> None:
        stop(self.process)  # wait for it: another Orthanc must not open the same database
        self._log.close()


def pytriton_package() -> Path | None:
    """The installed ``pytriton`` package's folder, or None: located, not imported, because the
    wheel is installed without its Python dependencies (they pin NumPy < 2); only its
    tritonserver build and bundled libraries are used."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_launch(
    workdir: Path, models: Path, package: Path
) -> tuple[list[str], dict[str, str], int]:
    """Prepare ``workdir`` for the wheel's tritonserver over a copy of the model repository
    ``models``, and say how to start it: its arguments, its environment and its gRPC port.

    The wheel's tritonserver has no ONNX Runtime backend, so each model's config says
    ``backend: "python"`` and deploy/triton/model.py runs the unchanged model.onnx with
    onnxruntime. The tests and the Triton benchmark both start it this way.
    """
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(root / "backends" / "python" / f, backend / f)
    shutil.copy(root / "python_backend_stubs" / version / "triton_python_backend_stub", backend)
    repo = workdir / "models"
    model_py = ROOT / "deploy" / "triton" / "model.py"
    for model in models.iterdir():
        if not (model / "config.pbtxt").is_file():
            continue
        shutil.copytree(model, repo / model.name)
        config = (model / "config.pbtxt").read_text()
        config = re.sub(r'platform:\s*"onnxruntime_onnx"', 'backend: "python"', config)
        (repo / model.name / "config.pbtxt").write_text(config)
        for version_dir in (repo / model.name).iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit():
                shutil.copy(model_py, version_dir / "model.py")
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        # The Python backend's stub runs this interpreter's packages (onnxruntime, numpy).
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        # The interpreter's libpython (pyenv builds keep it outside the linker's path) and the
        # wheel's bundled libraries (the stub links its own libcudart, with or without a GPU).
        "LD_LIBRARY_PATH": os.pathsep.join(
            [
                str(sysconfig.get_config_var("LIBDIR")),
                str(package.parent / "nvidia_pytriton.libs"),
                os.environ.get("LD_LIBRARY_PATH", ""),
            ]
        ),
        # Not benchmarks/ itself: there benchmarks/triton.py would shadow any ``import triton``.
        "PYTHONPATH": os.pathsep.join(
            p for p in sys.path if p and Path(p).resolve() != ROOT / "benchmarks"
        ),
    }
    args = [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={workdir / 'backends'}",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        "--allow-metrics=false",
        "--log-verbose=0",
    ]
    return args, env, grpc_port


def with_new_uids(ds: Dataset, study: str | None = None, series: str | None = None) -> Dataset:
    """A copy of ``ds`` with new (or the given) Study and Series Instance UIDs and a new SOP
    Instance UID: each benchmark study must be a study the server has not seen."""
    out = copy.deepcopy(ds)
    out.StudyInstanceUID = study or generate_uid()
    out.SeriesInstanceUID = series or generate_uid()
    out.SOPInstanceUID = generate_uid()
    if hasattr(out, "file_meta"):
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def part10(ds: Dataset) -> bytes:
    """``ds`` as Part 10 bytes."""
    return _bytes(ds)


def ct_series_datasets(slices: int, size: int = 512, seed: int = 0) -> list[Dataset]:
    """An axial CT series as benchmarks/ingest.py makes it: pydicom's CT_small.dcm header, new
    UIDs, ``size`` x ``size`` random 16-bit slices (about 0.5 MB each at 512)."""
    base = pydicom.dcmread(sample_file("CT_small.dcm"))
    base.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(slices):
        ds = with_new_uids(base, study, series)
        ds.InstanceNumber = i + 1
        # Each slice at its own position, as a scanner writes them (a Segmentation of the
        # study's regions needs distinct planes).
        ds.ImagePositionPatient = [-250.0, -250.0, -100.0 - 5.0 * i]
        ds.SliceLocation = -100.0 - 5.0 * i
        ds.Rows = ds.Columns = size
        ds.PixelData = rng.integers(-1000, 2000, (size, size), dtype=np.int16).tobytes()
        out.append(ds)
    return out
