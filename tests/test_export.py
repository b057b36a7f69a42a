"""`nidaan export --deidentify` (issue 14 item 2): analysed studies as an anonymised dataset.

Studies go through a real in-process Nidaan over DICOM (so the export meets real SRs and region
objects), with an identifying value planted in every attribute of the PS3.15 Annex E table that
can hold one, in the images, in a sequence, in the SR and in the Segmentation. After the export
no planted value and no original UID is anywhere in the exported bytes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from nidaan.core.config import Peer
from nidaan.server.cli import main
from nidaan.server.export import PROFILE_TABLE

from conftest import make_config
from factory import synthetic_cxr
from netutil import c_store
from peers import wait_until

#: Attributes that must keep a working value for Nidaan to analyse and report the image (each
#: still checked: its original value must not survive the export).
_KEEP = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"}
_SKIP_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "US", "SS", "UL", "SL", "FL", "FD"}


def _profile_keywords() -> list[tuple[str, str]]:
    """(keyword, VR) of every single attribute in the profile's table that holds a value."""
    tables = dicom_anonymization_database_selector(PROFILE_TABLE)
    out = []
    for tag in tables["ALL_TAGS"]:
        if len(tag) != 2 or tag[0] in (0x0000, 0x0002):  # command and file meta groups
            continue
        t = (tag[0] << 16) | tag[1]
        keyword = keyword_for_tag(t)
        try:
            vr = dictionary_VR(t)
        except KeyError:
            continue
        if keyword and vr not in _SKIP_VRS and " " not in vr and keyword not in _KEEP:
            out.append((keyword, vr))
    return sorted(out)


def _value(vr: str, n: int, planted: list[str]) -> str:
    """A unique, valid value of ``vr`` (remembered in ``planted`` when searchable)."""
    value = {
        "DA": f"1971{1 + n % 12:02d}{1 + n % 28:02d}",
        "TM": f"{n % 24:02d}{n % 60:02d}17.{n:06d}",
        "DT": f"1971{1 + n % 12:02d}{1 + n % 28:02d}0304{n % 60:02d}.{n:06d}",
        "AS": f"{n % 1000:03d}Y",
        "UI": f"1.2.826.0.1.3680043.8.498.77{n:06d}",
        "DS": f"97{n:04d}.5",
        "IS": f"97{n:04d}",
        "CS": f"PLNTCS{n:05d}",
        "AE": f"PLNTAE{n:05d}",
        "PN": f"PLNT{n:05d}^PN",
        "UR": f"http://plnt{n:05d}.example",
    }.get(vr, f"PLNT{n:05d}{vr}")
    planted.append(value)
    return value


def _plant(ds: Dataset, counter: list[int], planted: list[str]) -> None:
    for keyword, vr in _profile_keywords():
        if keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
            continue  # set per patient by the caller
        counter[0] += 1
        setattr(ds, keyword, _value(vr, counter[0], planted))
    # A sequence the profile does not name, holding attributes it does (PS3.15 E.1: they are
    # cleaned at any depth), and one nested a level further.
    equipment = Dataset()
    counter[0] += 1
    equipment.InstitutionName = _value("LO", counter[0], planted)
    counter[0] += 1
    equipment.OperatorsName = _value("PN", counter[0], planted)
    counter[0] += 1
    equipment.DeviceSerialNumber = _value("LO", counter[0], planted)
    inner = Dataset()
    counter[0] += 1
    inner.PersonName = _value("PN", counter[0], planted)
    equipment.ContributingEquipmentSequence = [inner]
    ds.ContributingEquipmentSequence = [equipment]
    # An overlay plane with a comment and a recognisable bit pattern.
    counter[0] += 1
    ds.add_new(0x60000010, "US", 8)  # Overlay Rows
    ds.add_new(0x60000011, "US", 8)  # Overlay Columns
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60004000, "LT", _value("LT", counter[0], planted))  # Overlay Comments
    ds.add_new(0x60003000, "OW", b"OVLYPLNT" * 1)  # Overlay Data: 64 bits
    planted.append("OVLYPLNT")
    ds.BurnedInAnnotation = "NO"


def _study(patient: str, birth: str, seed: int, counter: list[int], planted: list[str]) -> Dataset:
    ds, _ = synthetic_cxr(seed, nodule=True, rows=320, columns=288)
    _plant(ds, counter, planted)
    ds.PatientID = f"PLNT-PID-{patient}"
    ds.PatientName = f"PLNT^{patient}NAME"
    ds.PatientBirthDate = birth
    ds.PatientSex = "F"
    planted += [ds.PatientID, f"PLNT^{patient}NAME", birth]
    return ds


def _uids(path: Path) -> set[str]:
    """Every UID value in a file that is not one of DICOM's registered ones."""
    out: set[str] = set()

    def visit(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.VR == "UI" and elem.value and elem.keyword != "ImplementationClassUID":
                values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
                for v in map(str, values):
                    if not v.startswith("1.2.840.10008.") and "." in v:
                        out.add(v)

    ds = dcmread(path)
    visit(ds)
    visit(ds.file_meta)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[no-untyped-def]
    from nidaan.server.app import NidaanServer

    tmp = tmp_path_factory.mktemp("export")
    # A PACS that never answers: the region objects are made and queued, never delivered.
    pacs = Peer("PACS", "127.0.0.1", 9, objects=["sr", "seg", "gsps", "sc"])
    cfg = make_config(tmp, peers=[pacs], destinations=["PACS"], idle_timeout_s=0.5)
    server = NidaanServer(cfg)
    server.start(http=False, grpc=False)
    planted: list[str] = []
    counter = [0]
    studies = [
        _study("A", "19500101", 71, counter, planted),
        _study("A", "19500101", 72, counter, planted),
        _study("B", "19600202", 73, counter, planted),
    ]
    burned = _study("B", "19600202", 74, counter, planted)
    burned.BurnedInAnnotation = "YES"
    try:
        for ds in [*studies, burned]:
            assert c_store(server.scp.port, [ds])[0].Status == 0
        uids = [str(ds.StudyInstanceUID) for ds in [*studies, burned]]
        wait_until(
            lambda: all(server.state.study(u)[0] in ("reported", "delivered") for u in uids),
            60,
            "four studies reported",
        )
        # What Nidaan wrote carries the patient attributes it copied; plant more in the SR's
        # Contributing Equipment and in the Segmentation.
        originals: set[str] = set()
        for uid in uids:
            for path in [*(r.path for r in server.state.instances(uid))]:
                originals |= _uids(path)
            for path in server.state.report_files(uid):
                ds = dcmread(path)
                if ds.Modality in ("SR", "SEG"):
                    counter[0] += 1
                    item = ds.ContributingEquipmentSequence[0]
                    item.InstitutionName = _value("LO", counter[0], planted)
                    counter[0] += 1
                    ds.OperatorsName = _value("PN", counter[0], planted)
                    ds.save_as(path)
                originals |= _uids(path)
        stored = [
            p.read_bytes()
            for uid in uids
            for p in [
                *(r.path for r in server.state.instances(uid)),
                *server.state.report_files(uid),
            ]
        ]
    finally:
        server.stop()
    # The planted values are really there before the export (the SR and SEG copy the patient's).
    missing = [v for v in planted if not any(v.encode() in b for b in stored)]
    assert not missing, missing
    sr_bytes = [b for b in stored if b"PLNT^ANAME" in b and b"1.2.840.10008.5.1.4.1.1.88" in b]
    assert sr_bytes, "the SR does not carry the patient's name"
    config = tmp / "nidaan.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{cfg.storage.data_dir}"\n'
        f'[models]\nrepository = "{cfg.models.repository}"\n'
    )
    out = tmp / "out"
    assert main(["--config", str(config), "export", "--deidentify", str(out), "--quiet"]) == 0
    return {
        "out": out,
        "planted": planted,
        "originals": originals,
        "studies": studies,
        "burned": burned,
        "config": config,
        "data": cfg.storage.data_dir,
        "tmp": tmp,
    }


def test_no_planted_value_or_original_uid_survives_in_the_exported_bytes(exported: dict) -> None:
    files = sorted(p for p in exported["out"].rglob("*") if p.is_file())
    dicoms = [p for p in files if p.suffix == ".dcm"]
    modalities = sorted(dcmread(p).Modality for p in dicoms)
    # Three images and four studies' SRs, SEGs and GSPSs; every SC (its legend is burned in) and
    # the image marked as burned in are left out.
    assert modalities.count("CR") == 3 and modalities.count("SR") == 4, modalities
    assert "SEG" in modalities and "PR" in modalities and "OT" not in modalities
    blobs = {p: p.read_bytes() for p in files}
    assert len(exported["planted"]) > 300
    for value in exported["planted"]:
        needle = value.encode()
        leaks = [p.name for p, b in blobs.items() if needle in b]
        assert not leaks, f"planted {value!r} survives in {leaks}"
    for uid in exported["originals"]:
        leaks = [p.name for p, b in blobs.items() if uid.encode() in b]
        assert not leaks, f"original UID {uid} survives in {leaks}"
    for p in dicoms:
        ds = dcmread(p)
        assert ds.PatientIdentityRemoved == "YES"
        codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert codes[0] == "113100" and "113106" not in codes
        assert ds.get("PatientBirthDate", "") in ("", "00010101")


def test_uids_stay_consistent_and_a_patient_keeps_one_pseudonym(exported: dict) -> None:
    manifest = json.loads((exported["out"] / "manifest.json").read_text())
    images = manifest["images"]
    assert len(images) == 3
    pseudonyms = [row["patient_pseudonym"] for row in images]
    studies = [row["study_instance_uid"] for row in images]
    assert len(set(studies)) == 3
    a = {row["patient_pseudonym"] for row in images if row["study_instance_uid"] in studies}
    assert len(a) == 2 and sorted(pseudonyms).count(sorted(pseudonyms)[0]) in (1, 2)
    by_patient: dict[str, int] = {}
    for p in pseudonyms:
        by_patient[p] = by_patient.get(p, 0) + 1
    assert sorted(by_patient.values()) == [1, 2]  # patient A's two studies share one
    # Each SR references its image by the image's new SOP Instance UID, in the new study.
    for row in images:
        folder = exported["out"] / row["study_instance_uid"]
        srs = [dcmread(p) for p in folder.rglob("*.dcm") if dcmread(p).Modality == "SR"]
        (sr,) = srs
        assert sr.PatientID == row["patient_pseudonym"]
        refs = {
            str(r.ReferencedSOPInstanceUID)
            for e in sr.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence
        }
        assert refs == {row["sop_instance_uid"]}
        # Its content tree is cleaned, not dropped: the finding and its certainty are still there.
        content = sr.to_json()
        assert "786838002" in content and "111012" in content
        nodule = row["models"]["cxr_screen"]["findings"]["nodule"]
        assert nodule["present"] and nodule["probability"] > 0.5
        assert row["models"]["cxr_screen"]["version"] == "0.1.0"
        assert len(row["models"]["cxr_screen"]["sha256"]) == 64
        assert row["modality"] == "CR"
    with open(exported["out"] / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["finding"] for r in rows} == {"nodule", "tb"} and len(rows) == 6
    (excluded,) = manifest["excluded"][:1] if len(manifest["excluded"]) else [None]
    assert excluded is not None
    reasons = [e["reason"] for e in manifest["excluded"]]
    assert any(r.startswith("Burned In Annotation is YES") for r in reasons)
    assert (exported["out"] / "excluded.csv").is_file()


def test_a_second_export_gives_the_same_pseudonyms_and_the_key_stays_home(
    exported: dict, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    argv = ["--config", str(exported["config"]), "export", "--deidentify", str(again)]
    assert main([*argv, "--quiet", "--model", "cxr_screen", "--since", "2000-01-01"]) == 0
    first = json.loads((exported["out"] / "manifest.json").read_text())["images"]
    second = json.loads((again / "manifest.json").read_text())["images"]
    assert sorted(r["sop_instance_uid"] for r in first) == sorted(
        r["sop_instance_uid"] for r in second
    )
    key = (exported["data"] / "export.key").read_bytes()
    assert len(key) == 32 and (exported["data"] / "export.key").stat().st_mode & 0o077 == 0
    for p in [*exported["out"].rglob("*"), *again.rglob("*")]:
        if p.is_file():
            assert key not in p.read_bytes()
    # A date after every study: nothing to export.
    later = tmp_path / "later"
    assert main([*argv[:-1], str(later), "--quiet", "--since", "2999-01-01"]) == 0
    assert json.loads((later / "manifest.json").read_text())["images"] == []
    audit = (exported["data"] / "audit.jsonl").read_text()
    assert '"event": "export"' in audit


def test_new_uids_are_keyed(exported: dict) -> None:
    from nidaan.server.export import Pseudonyms, load_key

    p = Pseudonyms(load_key(exported["data"]))
    image = exported["studies"][0]
    manifest = json.loads((exported["out"] / "manifest.json").read_text())["images"]
    assert p.uid(str(image.SOPInstanceUID)) in {r["sop_instance_uid"] for r in manifest}
    other = Pseudonyms(b"x" * 32)
    assert other.uid(str(image.SOPInstanceUID)) != p.uid(str(image.SOPInstanceUID))
    assert len(p.uid(generate_uid())) <= 64
