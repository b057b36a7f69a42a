"""Decoding real encodings made by real tools (dcmtk's dcmcjpeg/dcmcrle, pydicom-data's J2K)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from nidaan.core.errors import DecodeError, UnsupportedError
from nidaan.kernels import InputLayout, preprocess
from nidaan.server.decode import decode, pixel_transform

from factory import sample_file, save, synthetic_cxr
from peers import need


def _compress(tool: str, args: list[str], src: Path, dst: Path) -> pydicom.Dataset:
    run = subprocess.run([need(tool), *args, str(src), str(dst)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return pydicom.dcmread(dst)


@pytest.fixture(scope="module")
def eight_bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds, _ = synthetic_cxr(5, rows=300, columns=260)
    pixels = (np.frombuffer(ds.PixelData, np.uint16).reshape(300, 260) >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return save(ds, tmp_path_factory.mktemp("dec") / "u8.dcm")


@pytest.mark.parametrize(
    ("tool", "args", "syntax", "lossless"),
    [
        ("dcmcjpeg", ["+eb"], "1.2.840.10008.1.2.4.50", False),  # JPEG baseline
        ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57", True),  # JPEG lossless
        ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70", True),  # JPEG lossless SV1
        ("dcmcrle", [], "1.2.840.10008.1.2.5", True),  # RLE lossless
    ],
)
def test_compressed_8_bit_decodes_like_the_original(
    eight_bit: Path, tmp_path: Path, tool: str, args: list[str], syntax: str, lossless: bool
) -> None:
    original = decode(pydicom.dcmread(eight_bit)).pixels
    ds = _compress(tool, args, eight_bit, tmp_path / "c.dcm")
    assert ds.file_meta.TransferSyntaxUID == syntax
    pixels = decode(ds).pixels
    if lossless:
        np.testing.assert_array_equal(pixels, original)
    else:
        # Lossy at dcmcjpeg's default quality on a noisy image: close, not equal.
        assert np.abs(pixels.astype(int) - original).mean() < 0.03 * 255
        assert np.corrcoef(pixels.ravel(), original.ravel())[0, 1] > 0.98


def test_jpeg_lossless_12_bit(tmp_path: Path) -> None:
    ds, _ = synthetic_cxr(6, rows=256, columns=200)
    src = save(ds, tmp_path / "u12.dcm")
    comp = _compress("dcmcjpeg", ["+e1"], src, tmp_path / "c.dcm")
    np.testing.assert_array_equal(decode(comp).pixels, decode(pydicom.dcmread(src)).pixels)


def test_jpeg2000_lossless_radiograph_equals_uncompressed() -> None:
    a = decode(pydicom.dcmread(sample_file("RG1_UNCR.dcm")))
    b = decode(pydicom.dcmread(sample_file("RG1_J2KR.dcm")))
    assert a.pixels.shape == (1955, 1841)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.transform.invert  # MONOCHROME1
    assert (a.transform.window_centre, a.transform.window_width) == (15000.0, 30000.0)


def test_monochrome1_and_monochrome2_of_the_same_image_give_the_same_tensor() -> None:
    m2, _ = synthetic_cxr(8, rows=400, columns=300)
    m1, _ = synthetic_cxr(8, rows=400, columns=300, monochrome1=True)
    layout = InputLayout(128, 128, "letterbox", 0.0, 0.5, 0.25)
    images = [decode(m2), decode(m1)]
    batch, _ = preprocess([i.pixels for i in images], [i.transform for i in images], layout)
    np.testing.assert_allclose(batch[0], batch[1], atol=1e-4)


def test_rescale_and_missing_window_are_read_from_the_header() -> None:
    ct = pydicom.dcmread(sample_file("CT_small.dcm"))
    t = pixel_transform(ct)
    assert (t.slope, t.intercept) == (1.0, -1024.0)
    assert t.window_centre is None  # the kernels then window the image's own range


def test_corrupt_and_unsupported_pixel_data_raise_clear_errors() -> None:
    ds = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = ds.PixelData[:1000]  # truncated native pixel data
    with pytest.raises(DecodeError, match="cannot be decoded"):
        decode(ds)
    rgb = pydicom.dcmread(sample_file("SC_rgb.dcm"))
    with pytest.raises(UnsupportedError, match="not greyscale"):
        decode(rgb)
    sr = pydicom.dcmread(sample_file("test-SR.dcm"))
    with pytest.raises(UnsupportedError, match="no pixel data"):
        decode(sr)


def _identity_layout(ds: pydicom.Dataset, **kw: object) -> InputLayout:
    return InputLayout(int(ds.Rows), int(ds.Columns), "stretch", 0.0, 0.0, 1.0, **kw)  # type: ignore[arg-type]


def test_voi_lut_sequence_agrees_with_pydicom() -> None:
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(sample_file("vlut_04.dcm"))
    image = decode(ds)
    assert image.transform.voi_lut is not None
    batch, _ = preprocess([image.pixels], [image.transform], _identity_layout(ds))
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    expected = apply_voi_lut(ds.pixel_array, ds, index=0, prefer_lut=True) / (2**bits - 1)
    np.testing.assert_allclose(batch[0, 0], expected, atol=1e-6)


def test_modality_lut_sequence_agrees_with_pydicom() -> None:
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(sample_file("mlut_18.dcm"))
    image = decode(ds)
    assert image.transform.modality_lut is not None
    centre, width = 30000.0, 40000.0
    layout = _identity_layout(ds, windows=((centre, width),))
    batch, _ = preprocess([image.pixels], [image.transform], layout)
    m = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = np.clip((m - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(batch[0, 0], expected, atol=1e-5)
