"""The model repository: the shipped models are valid; broken ones are refused with a reason."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from nidaan.core.errors import ModelRepositoryError
from nidaan.server.model_repository import load_model, load_repository

from conftest import MODELS


def test_shipped_models_are_valid_and_carry_a_card(repository) -> None:  # type: ignore[no-untyped-def]
    names = {m.name for m in repository}
    assert "cxr_screen" in names
    for m in repository:
        assert m.card.is_file()
        card = m.card.read_text()
        if m.algorithm.trained_on_synthetic_data:
            assert re.search(r"not for diagnos", card, re.IGNORECASE)
        assert m.onnx_path.stat().st_size < 5_000_000  # small enough to commit
        assert m.findings and all(0 < f.threshold < 1 for f in m.findings)


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "cxr_screen"
    shutil.copytree(MODELS / "cxr_screen", dst)
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "1" / "model.onnx").unlink(), "no model.onnx"),
        (lambda d: (d / "MODEL_CARD.md").unlink(), "model card"),
        (lambda d: (d / "labels.txt").unlink(), "labels.txt is missing"),
        (
            lambda d: _edit(d / "nidaan.toml", "height = 256", "height = 224"),
            "input shape mismatch",
        ),
        (
            lambda d: _edit(d / "config.pbtxt", "dims: [ 1, 256, 256 ]", "dims: [ 1, 224, 224 ]"),
            "input shape mismatch",
        ),
        (
            lambda d: _edit(d / "nidaan.toml", 'scheme = "SCT"', 'scheme = "MADEUP"'),
            "unknown coding scheme 'MADEUP'",
        ),
        (lambda d: _edit(d / "nidaan.toml", "index = 1", "index = 7"), "outside the 2 outputs"),
        (lambda d: (d / "config.pbtxt").write_text("name: [oops"), "not a valid Triton"),
    ],
)
def test_broken_model_is_refused_naming_the_problem(tmp_path: Path, breakage, message: str) -> None:  # type: ignore[no-untyped-def]
    d = _copy(tmp_path)
    breakage(d)
    with pytest.raises(ModelRepositoryError, match=re.escape(message)) as err:
        load_model(d)
    assert "cxr_screen" in str(err.value)


def test_empty_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelRepositoryError, match="holds no model"):
        load_repository(tmp_path)


#: SNOMED CT disorders a screening model cannot diagnose, which a finding code must never be
#: (issue 12: "TB-like opacity" was coded "Pulmonary tuberculosis", so reports said
#: "Pulmonary tuberculosis: Absent"). A finding names what the model detects.
DISORDERS = {("SCT", "154283005"): "Pulmonary tuberculosis"}


def test_shipped_finding_codes_name_what_a_model_detects_not_a_disorder(repository) -> None:  # type: ignore[no-untyped-def]
    for m in repository:
        for f in m.findings:
            assert (f.code.scheme, f.code.value) not in DISORDERS, (m.name, f.label, f.code)
        sidecar = (m.directory / "nidaan.toml").read_text(encoding="utf-8")
        # Not even commented out as an example to copy.
        assert "154283005" not in sidecar, m.name


def test_every_shipped_model_has_an_intended_use_in_every_report_language(repository) -> None:  # type: ignore[no-untyped-def]
    from nidaan.pacs_bridge.languages import available

    for m in repository:
        for tag in available():
            statement = m.algorithm.intended_use_in(tag)
            assert statement.strip(), f"{m.name} has no intended use in {tag!r}"
            if m.algorithm.trained_on_synthetic_data and tag == "en":
                assert "not for diagnosis" in statement.lower(), m.name
