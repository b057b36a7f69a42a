"""What each destination gets of a study's results (``[[peers]] objects`` and ``language``), the
study attributes every object carries, and the checks made of a peer's settings at start."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from nidaan.core.config import Config, Peer, load_config
from nidaan.core.errors import ConfigError
from nidaan.server.app import NidaanServer

from conftest import MODELS, make_config
from factory import synthetic_ct_series, synthetic_cxr
from netutil import c_store
from peers import free_port, wait_until

SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _study() -> list[Dataset]:
    """A chest radiograph with an accession number and a CT series of the same study whose
    slices have none (the case of issue 12), a nodule on two slices."""
    cr, _ = synthetic_cxr(5, nodule=True, rows=512, columns=512)
    cr.AccessionNumber = "ACC-7"
    slices, _ = synthetic_ct_series(
        7, nodule_slices=(1, 2), slices=4, study_uid=cr.StudyInstanceUID, patient=cr
    )
    for ds in slices:
        ds.AccessionNumber = ""
    return [cr, *slices]


def _state(server: NidaanServer, study: str) -> str:
    return (server.state.study(study) or ("",))[0]


def test_each_peer_gets_the_objects_it_is_configured_for_with_the_studys_attributes(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    # Nobody listens on these ports: deliveries wait in the outbox, which is what is checked.
    peers = [
        Peer("SRONLY", "127.0.0.1", free_port(), objects=["sr"]),
        Peer(
            "EVERYTHING",
            "127.0.0.1",
            free_port(),
            objects=["sc", "sr", "gsps", "seg"],
            language="hi",
        ),
    ]
    cfg = make_config(tmp_path, peers=peers, destinations=["SRONLY", "EVERYTHING"])
    server = start_server(cfg)
    images = _study()
    study = str(images[0].StudyInstanceUID)
    assert all(s.Status == 0 for s in c_store(server.scp.port, images))
    wait_until(lambda: _state(server, study) in ("reported", "failed"), 120, "the report")
    state, reason, _ = server.state.study(study)
    assert state == "reported", reason

    rows = server.state.outbox()
    by_peer: dict[str, list[Dataset]] = {}
    for row in rows:
        by_peer.setdefault(row.destination, []).append(pydicom.dcmread(row.report_path))
    # objects = ["sr"]: the report and nothing else.
    (only,) = by_peer["SRONLY"]
    assert only.SOPClassUID == SR
    assert "ISO_IR 192" not in only.get("SpecificCharacterSet", "")  # English only
    # Every kind, the SR in Hindi beside English.
    kinds = sorted({str(ds.SOPClassUID) for ds in by_peer["EVERYTHING"]})
    assert kinds == sorted({SR, SEG, GSPS, SC})
    (hindi,) = [ds for ds in by_peer["EVERYTHING"] if ds.SOPClassUID == SR]
    assert (
        hindi.SOPInstanceUID != only.SOPInstanceUID and hindi.SpecificCharacterSet == "ISO_IR 192"
    )

    # Every object is filed under the same accession as the SR, though the CT slices (which
    # the SEG, presentation state and captures of the CT nodule are made from) have none.
    objects = [ds for kind in by_peer.values() for ds in kind]
    assert any(ds.SOPClassUID == SEG and ds.Modality == "SEG" for ds in objects)
    for ds in objects:
        assert ds.AccessionNumber == "ACC-7", (ds.SOPClassUID, ds.AccessionNumber)
        assert ds.StudyInstanceUID == study and ds.PatientID == images[0].PatientID

    # The served SR's Device Observer UID is this installation's, kept in the data dir.
    node = (cfg.storage.data_dir / "node-uid").read_text(encoding="ascii").strip()
    observer = [
        item.UID
        for item in only.ContentSequence
        if "UID" in item and item.ConceptNameCodeSequence[0].CodeValue == "121012"
    ]
    assert observer == [node]


def test_images_that_disagree_on_a_study_attribute_fail_the_study_naming_it(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    cr, _ = synthetic_cxr(11, rows=512, columns=512)
    cr.AccessionNumber = "ACC-FIRST"
    other, _ = synthetic_cxr(12, rows=512, columns=512, study_uid=cr.StudyInstanceUID)
    other.AccessionNumber = "ACC-SECOND"
    server = start_server(make_config(tmp_path))
    study = str(cr.StudyInstanceUID)
    with caplog.at_level(logging.INFO):
        assert all(s.Status == 0 for s in c_store(server.scp.port, [cr, other]))
        wait_until(lambda: _state(server, study) == "failed", 120, "the study to fail")
    _, reason, _ = server.state.study(study)
    assert "AccessionNumber" in reason and "internal error" not in reason, reason
    assert "ACC-FIRST" not in reason and "ACC-SECOND" not in reason  # no patient data
    assert "ACC-FIRST" not in caplog.text and "ACC-SECOND" not in caplog.text
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


def test_a_language_nobody_reviewed_or_a_model_without_its_intended_use_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = shutil.copytree(MODELS, tmp_path / "models", ignore=shutil.ignore_patterns("training"))
    sidecar = models / "cxr_screen" / "nidaan.toml"
    lines = sidecar.read_text(encoding="utf-8").splitlines(keepends=True)
    sidecar.write_text("".join(x for x in lines if not x.startswith("hi = ")), encoding="utf-8")
    cfg = make_config(tmp_path, peers=[Peer("PACS", "127.0.0.1", 104, language="hi")])
    cfg.models.repository = models
    with caplog.at_level(logging.WARNING, logger="nidaan.server"):
        NidaanServer(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'hi'" in w and "reviewed_by is empty" in w for w in warnings), warnings
    assert any(
        "model cxr_screen has no intended use in 'hi'" in w and "English only" in w
        for w in warnings
    ), warnings
    assert not any("model ct_nodule" in w for w in warnings)  # its sidecar has the Hindi one


def test_a_peer_sent_secondary_captures_no_installed_font_can_write_in_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Secondary Captures for a Hindi peer carry English alone where no Devanagari font is
    installed: `serve` says so at start, for that peer only (VIEWER gets no SC)."""
    from nidaan.pacs_bridge import languages

    peers = [
        Peer("PACS", "127.0.0.1", 104, objects=["sr", "sc"], language="hi"),
        Peer("VIEWER", "127.0.0.1", 105, objects=["sr"], language="hi"),
    ]

    def font_warnings(where: Path) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nidaan.server"):
            NidaanServer(make_config(where, peers=peers))
        return [r.getMessage() for r in caplog.records if "no font for" in r.getMessage()]

    monkeypatch.setattr(languages, "FONT_DIRS", (tmp_path / "no-fonts",))
    (warning,) = font_warnings(tmp_path / "a")
    assert "'hi'" in warning and "peer PACS carry English alone" in warning
    assert "truetype/lohit-devanagari/Lohit-Devanagari.ttf" in warning  # what to install
    monkeypatch.undo()  # the system's folders, where the test command installs Lohit
    assert font_warnings(tmp_path / "b") == []


def _config_with(tmp_path: Path, peer: str) -> Config:
    path = tmp_path / "nidaan.toml"
    path.write_text(
        f'[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n{peer}\n', encoding="utf-8"
    )
    return load_config(path, environ={})


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        (
            'objects = ["sr", "pdf"]',
            "peers[0].objects must name some of sr, seg, gsps, sc (unknown: pdf)",
        ),
        ("objects = []", "peers[0].objects must name some of sr, seg, gsps, sc"),
        ('objects = "sr"', "peers[0].objects must be a list of names"),
        ("objects = [1]", "peers[0].objects must be a list of names"),
        ('language = "Hindi"', "peers[0].language must be a language tag such as 'hi'"),
    ],
)
def test_bad_peer_object_and_language_settings_are_refused_naming_them(
    tmp_path: Path, setting: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _config_with(tmp_path, setting).validate()
    assert says in str(caught.value)


def test_objects_are_sent_in_one_order_and_english_needs_no_second_language(
    tmp_path: Path,
) -> None:
    cfg = _config_with(tmp_path, 'objects = ["sc", "sr", "seg"]\nlanguage = "en"')
    cfg.validate()
    assert cfg.peers[0].objects == ["sr", "seg", "sc"] and cfg.peers[0].language == ""
    default = _config_with(tmp_path, "")
    default.validate()
    assert default.peers[0].objects == ["sr", "seg", "gsps"]


def test_a_language_without_its_file_stops_the_start(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, peers=[Peer("PACS", "127.0.0.1", 104, language="ta")])
    with pytest.raises(ConfigError, match="no report language 'ta'"):
        NidaanServer(cfg)


def test_a_study_whose_objects_cannot_be_built_in_time_fails_naming_why(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    """The result objects are built in report builder processes (server.result_objects): one
    that overruns ``reports.build_timeout_s`` is replaced, and its study ends ``failed`` with
    the reason, never ``reported`` without a report, nor stuck."""
    cfg = make_config(
        tmp_path, peers=[Peer("PACS", "127.0.0.1", free_port())], destinations=["PACS"]
    )
    cfg.reports.build_timeout_s = 0.001  # no SR is built that fast
    server = start_server(cfg)
    cr, _ = synthetic_cxr(13, nodule=True, rows=512, columns=512)
    study = str(cr.StudyInstanceUID)
    assert all(s.Status == 0 for s in c_store(server.scp.port, [cr]))
    wait_until(lambda: _state(server, study) in ("reported", "failed"), 120, "the study's end")
    state, reason, _ = server.state.study(study)
    assert state == "failed", reason
    assert "building the study's result objects took longer than 0.001 s" in reason, reason
    assert server.state.outbox() == []  # nothing half-built was queued
    builders = server.snapshot()["report_builders"]
    assert builders["workers"] >= 1 and builders["restarts"] >= 1, builders
