"""Provenance (issue 14 item 3): which exact model file made a result, and which operating
threshold a site has adopted: in the report, `nidaan models`, gRPC ListModels and the audit log.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from nidaan.client import Client
from nidaan.core.config import load_config
from nidaan.core.errors import ConfigError, ModelRepositoryError
from nidaan.core.findings import Finding, ImageAnalysis
from nidaan.pacs_bridge.reports import build_report
from nidaan.server.cli import main
from nidaan.server.model_repository import load_repository

from conftest import MODELS, make_config
from factory import synthetic_cxr


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _texts(ds) -> list[str]:  # type: ignore[no-untyped-def]
    """Every TextValue and ContributionDescription anywhere in a dataset."""
    out: list[str] = []
    for elem in ds.iterall():
        if elem.keyword in ("TextValue", "ContributionDescription"):
            out.append(str(elem.value))
    return out


def test_each_model_carries_the_sha256_of_its_onnx_file() -> None:
    models = load_repository(MODELS, check_onnx=False)
    assert {m.name for m in models} == {"ct_nodule", "cxr_screen"}
    for m in models:
        assert m.onnx_path == MODELS / m.name / "1" / "model.onnx"
        assert m.algorithm.digest == _file_sha256(m.onnx_path)


def test_the_report_names_model_version_and_file_hash() -> None:
    (cxr,) = [m for m in load_repository(MODELS, check_onnx=False) if m.name == "cxr_screen"]
    source, _ = synthetic_cxr(3, rows=256, columns=256)
    spec = cxr.findings[0]
    analysis = ImageAnalysis(
        cxr.algorithm, source, (Finding(spec.label, spec.code, 0.1, spec.threshold),)
    )
    sr = build_report(
        [analysis],
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        device_observer_uid=generate_uid(),
    )
    digest = _file_sha256(cxr.onnx_path)
    (equipment,) = [
        e for e in sr.ContributingEquipmentSequence if e.get("SoftwareVersions") == cxr.version
    ]
    assert digest in equipment.ContributionDescription
    assert "cxr_screen" in equipment.ContributionDescription
    # The content tree's Algorithm Parameters say it too, where any SR viewer shows it.
    assert any(digest in t and "SHA-256" in t for t in _texts(sr))


def test_nidaan_models_prints_hash_card_and_a_site_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "nidaan.toml"
    config.write_text(
        f'[models]\nrepository = "{MODELS}"\n\n[models.thresholds.cxr_screen]\nnodule = 0.31\n'
    )
    assert main(["--config", str(config), "models"]) == 0
    out = capsys.readouterr().out
    for name in ("cxr_screen", "ct_nodule"):
        onnx = MODELS / name / "1" / "model.onnx"
        assert f"sha256 {_file_sha256(onnx)}" in out
        assert str(MODELS / name / "MODEL_CARD.md") in out
    cxr = out[out.index("cxr_screen 0.1.0") :]
    (nodule,) = [line for line in cxr.splitlines() if "finding nodule" in line]
    assert "threshold 0.31 (site override in models.thresholds; sidecar 0.3847)" in nodule
    (tb,) = [line for line in cxr.splitlines() if "finding tb" in line]
    assert "threshold 0.5199" in tb and "override" not in tb
    assert out.count("site override") == 1  # ct_nodule's nodule keeps its sidecar's


def test_a_mistyped_threshold_override_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelRepositoryError, match=r"models.thresholds.cxr_screen.nodul\b"):
        load_repository(MODELS, check_onnx=False, thresholds={"cxr_screen": {"nodul": 0.3}})
    with pytest.raises(ModelRepositoryError, match=r"models.thresholds.cxr"):
        load_repository(MODELS, check_onnx=False, thresholds={"cxr": {"nodule": 0.3}})
    config = tmp_path / "bad.toml"
    config.write_text("[models.thresholds.cxr_screen]\nnodule = 1.5\n")
    with pytest.raises(ConfigError, match=r"models.thresholds.cxr_screen.nodule: 1.5"):
        load_config(config, environ={})


def test_list_models_returns_hash_and_the_audit_log_records_the_site_threshold(
    tmp_path: Path, start_server
) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(tmp_path)
    cfg.models.thresholds = {"cxr_screen": {"tb": 0.45}}
    cfg.validate()
    server = start_server(cfg)
    assert server.api is not None
    with Client(f"127.0.0.1:{server.api.port}") as client:
        models = {m.name: m for m in client.list_models().models}
    for name, m in models.items():
        assert m.sha256 == _file_sha256(MODELS / name / "1" / "model.onnx")
        assert m.model_card_path == str(MODELS / name / "MODEL_CARD.md")
    tb = next(f for f in models["cxr_screen"].findings if f.label == "tb")
    assert tb.threshold == pytest.approx(0.45)
    assert tb.HasField("sidecar_threshold") and tb.sidecar_threshold == pytest.approx(0.5199)
    nodule = next(f for f in models["cxr_screen"].findings if f.label == "nodule")
    assert not nodule.HasField("sidecar_threshold")
    audit = (cfg.storage.data_dir / "audit.jsonl").read_text().splitlines()
    overrides = [e for e in map(json.loads, audit) if e["event"] == "threshold_override"]
    assert overrides == [
        {
            "event": "threshold_override",
            "time": overrides[0]["time"],
            "model": "cxr_screen",
            "version": "0.1.0",
            "finding": "tb",
            "threshold": 0.45,
            "sidecar_threshold": 0.5199,
        }
    ]
