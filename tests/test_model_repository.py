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
