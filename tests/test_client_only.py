"""The public client, installed alone: a fresh virtual environment with ``pip install <checkout>``
(no extras) has the client and its exceptions and none of the server's dependencies, and it
analyses a study on a running server."""

from __future__ import annotations

import io
import json
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import make_config
from factory import synthetic_cxr

ROOT = Path(__file__).resolve().parents[1]

#: Builds a wheel and installs from PyPI's cache into a new environment: slow, like the peers.
pytestmark = pytest.mark.peers

#: What an integrator's script does with the client alone.
SCRIPT = r"""
import json, sys
import nidaan.client as api
from nidaan.client import Client, InputError, NidaanError

heavy = []
for name in ("numpy", "numba", "pydicom", "pynetdicom", "onnxruntime", "tritonclient"):
    try:
        __import__(name)
        heavy.append(name)
    except ImportError:
        pass
with Client(sys.argv[1]) as nidaan:
    models = [m.name for m in nidaan.list_models().models]
    response = nidaan.analyze([sys.argv[2]])
    try:
        nidaan.analyze([b"not DICOM at all"])
        refused = ""
    except InputError as exc:
        refused = str(exc)
print(json.dumps({
    "heavy": heavy,
    "models": models,
    "results": [r.model for r in response.results],
    "refused": refused,
    "hierarchy": issubclass(InputError, NidaanError),
    "exports": sorted(api.__all__),
}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding only ``nidaan`` without extras (built from this tree)."""
    where = tmp_path_factory.mktemp("client-venv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    build = tmp_path_factory.mktemp("client-build")
    run = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=build,  # not the checkout: its folders must not shadow the installed package
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return python


def test_the_client_alone_analyses_a_study_without_the_server_dependencies(
    client_venv: Path, tmp_path: Path, start_server
) -> None:  # type: ignore[no-untyped-def]
    freeze = subprocess.run(
        [str(client_venv), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower() for p in json.loads(freeze.stdout)}
    server_side = {
        "numpy",
        "numba",
        "pydicom",
        "pynetdicom",
        "highdicom",
        "onnxruntime",
        "tritonclient",
        "prometheus-client",
        "pylibjpeg",
        "grpcio-health-checking",
    }
    assert {"nidaan", "grpcio", "protobuf"} <= installed and not installed & server_side
    server = start_server(make_config(tmp_path))
    ds, _ = synthetic_cxr(11, rows=600, columns=500)
    path = tmp_path / "cr.dcm"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    run = subprocess.run(
        [str(client_venv), "-c", SCRIPT, f"127.0.0.1:{server.api.port}", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["heavy"] == []  # nothing of the server came with the client
    assert "cxr_screen" in out["models"] and out["results"] == ["cxr_screen"]
    assert out["refused"].startswith("INVALID_ARGUMENT: instance 0: not a readable DICOM")
    assert out["hierarchy"] and {"Client", "InputError", "NidaanError"} <= set(out["exports"])


def test_the_server_command_in_a_client_only_install_says_what_to_install(
    client_venv: Path, tmp_path: Path
) -> None:
    run = subprocess.run(
        [str(client_venv.parent / "nidaan"), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr
    assert "pip install 'nidaan[server]'" in run.stderr and "Traceback" not in run.stderr
