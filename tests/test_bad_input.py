"""Malformed objects over a real association: each gets a failure status, its bytes are kept in
quarantine with the reason, and the server keeps serving."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE

from conftest import make_config
from factory import sample_file, synthetic_cxr
from netutil import c_store, send_raw
from peers import wait_until

CR = "1.2.840.10008.5.1.4.1.1.1"


def _file_with_body(path: Path, body: bytes) -> Path:
    """Keep the data set bytes to send (the test sends them raw)."""
    path.write_bytes(body)
    return path


def _dataset_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_len = struct.unpack("<I", raw[140:144])[0]
    return raw[144 + meta_len :]


#: Every malformed object claims this SOP Instance UID, as its C-STORE request does.
SOP_UID = generate_uid()


def _good() -> Dataset:
    ds = synthetic_cxr(41, rows=256, columns=256)[0]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = SOP_UID
    return ds


def _truncated(tmp: Path) -> Path:
    body = _dataset_bytes(_good())
    return _file_with_body(tmp / "t.dcm", body[: len(body) // 2])


def _length_beyond_end(tmp: Path) -> Path:
    body = bytearray(_dataset_bytes(_good()))
    # The Pixel Data element (7FE0,0010) OW: claim far more bytes than follow.
    at = body.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    body[at + 8 : at + 12] = struct.pack("<I", 0x7FFFFFF0)
    return _file_with_body(tmp / "l.dcm", bytes(body))


def _length_just_beyond_end(tmp: Path) -> Path:
    body = bytearray(_dataset_bytes(_good()))
    at = body.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    declared = struct.unpack("<I", body[at + 8 : at + 12])[0]
    body[at + 8 : at + 12] = struct.pack("<I", declared + 4096)  # small: read, not deferred
    return _file_with_body(tmp / "j.dcm", bytes(body))


def _deeply_nested(tmp: Path) -> Path:
    # Written as bytes: pydicom itself cannot write (or print) 2000 levels. Undefined-length
    # sequences and items (PS3.5 7.5.2), in a private SQ element after Pixel Data.
    seq = struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    depth = 2000
    nested = (seq + item) * depth + (item_end + seq_end) * depth
    return _file_with_body(tmp / "n.dcm", _dataset_bytes(_good()) + nested)


def _not_dicom(tmp: Path) -> Path:
    return _file_with_body(tmp / "g.dcm", bytes(range(256)) * 64)


def _palette_out_of_range(tmp: Path) -> Path:
    ds = _good()
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.RedPaletteColorLookupTableDescriptor = [16, 0, 16]
    ds.GreenPaletteColorLookupTableDescriptor = [16, 0, 16]
    ds.BluePaletteColorLookupTableDescriptor = [16, 0, 16]
    ds.RedPaletteColorLookupTableData = ds.GreenPaletteColorLookupTableData = (
        ds.BluePaletteColorLookupTableData
    ) = b"\0\0" * 16  # 16 entries; the pixel values index up to 4095
    for colour in ("Red", "Green", "Blue"):
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
    return _file_with_body(tmp / "p.dcm", _dataset_bytes(ds))


def _uid_escape(tmp: Path) -> Path:
    ds = _good()
    ds.StudyInstanceUID = "../../../etc"
    return _file_with_body(tmp / "u.dcm", _dataset_bytes(ds))


CASES: dict[str, Callable[[Path], Path]] = {
    "truncated data set": _truncated,
    "element length far beyond the end": _length_beyond_end,
    "element length just beyond the end": _length_just_beyond_end,
    "2000 nested sequences": _deeply_nested,
    "bytes that are not DICOM": _not_dicom,
    "UID that climbs out of the spool": _uid_escape,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_instance_is_refused_quarantined_and_server_goes_on(
    tmp_path: Path,
    start_server,
    case: str,  # type: ignore[no-untyped-def]
) -> None:
    cfg = make_config(tmp_path)
    server = start_server(cfg)
    path = CASES[case](tmp_path)
    status = send_raw(server.scp.port, path.read_bytes(), CR, SOP_UID)
    assert status is not None, f"{case}: no C-STORE response"
    assert status.Status != 0x0000, f"{case}: accepted"
    assert status.Status >> 12 in (0xA, 0xC), f"{case}: status 0x{status.Status:04X}"
    reasons = [
        json.loads(p.read_text())["reason"]
        for p in (cfg.storage.data_dir / "quarantine").glob("*.json")
    ]
    assert len(reasons) == 1 and reasons[0]
    assert not any(
        p.name.endswith(".dcm")
        for p in (cfg.storage.data_dir / "spool").rglob("*")
        if p.is_file() and "etc" in str(p)
    )
    good = synthetic_cxr(42, rows=256, columns=256)[0]
    (ok,) = c_store(server.scp.port, [good])
    assert ok.Status == 0x0000  # the next instance is served as usual


def test_an_image_unusable_only_once_decoded_fails_visibly_after_success(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    """A header that passes admission but pixels that cannot be used (palette colour with LUT
    indexes out of range): stored and acknowledged (decoding follows Success), then, at analysis,
    a failed study naming why and the instance in quarantine; the node goes on."""
    cfg = make_config(tmp_path)
    server = start_server(cfg)
    path = _palette_out_of_range(tmp_path)
    status = send_raw(server.scp.port, path.read_bytes(), CR, SOP_UID)
    assert status is not None and status.Status == 0x0000
    study = server.state.study_of(SOP_UID)
    assert study is not None
    wait_until(lambda: (server.state.study(study) or ("",))[0] == "failed", 30, "the failure")
    _, reason, _ = server.state.study(study)
    assert "could not be analysed" in reason and "greyscale" in reason, reason
    (entry,) = [
        json.loads(p.read_text()) for p in (cfg.storage.data_dir / "quarantine").glob("*.json")
    ]
    assert entry["stage"] == "analysis" and "greyscale" in entry["reason"]
    good = synthetic_cxr(43, rows=256, columns=256)[0]
    (ok,) = c_store(server.scp.port, [good])
    assert ok.Status == 0x0000


def test_association_with_only_unsupported_sop_classes_is_turned_down(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(make_config(tmp_path))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.31")  # Modality Worklist FIND: not offered
    assoc = ae.associate("127.0.0.1", server.scp.port, ae_title="NIDAAN")
    try:
        accepted = [cx for cx in assoc.accepted_contexts] if assoc.is_established else []
        assert accepted == []
    finally:
        if assoc.is_established:
            assoc.release()
    ct = pydicom.dcmread(sample_file("CT_small.dcm"))
    assert ct.SOPClassUID == CTImageStorage
