"""Decoding: a DICOM instance to stored pixel values and the transform that displays them.

pydicom decodes native and RLE pixel data itself; the pylibjpeg plugins (libjpeg, openjpeg, rle)
add JPEG baseline/extended/lossless and JPEG 2000. Only single-frame greyscale images are
analysed today; anything else raises :class:`UnsupportedError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from nidaan.core.errors import DecodeError, InputError, UnsupportedError
from nidaan.kernels import PixelTransform
from nidaan.kernels.transform import LookupTable

from .decode_pool import is_compressed

if TYPE_CHECKING:
    from .decode_pool import DecodePool

_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class SourceImage:
    """One decoded frame: stored values (2-D) and how to display them."""

    pixels: np.ndarray
    transform: PixelTransform

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])


def is_image(ds: Dataset) -> bool:
    """Whether the instance carries pixel data (SR, presentation states and KOs do not)."""
    return any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _first(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _lookup_table(item: Dataset, what: str, signed: bool) -> LookupTable:
    """A LUT Sequence item (PS3.3 C.11.1.1.1, C.11.2.1.1) as the kernels' LookupTable."""
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        raw = item.LUTData
        data = np.asarray(raw if isinstance(raw, list | MultiValue) else [raw], dtype=np.float64)
        if isinstance(raw, bytes):
            data = np.frombuffer(raw, dtype="<u2" if bits > 8 else "u1").astype(np.float64)
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnsupportedError(f"{what} LUT Sequence is malformed: {exc}") from exc
    entries = entries or 65536  # 0 means 2**16 entries (C.11.1.1.1)
    if signed and first >= 32768:  # US or SS by Pixel Representation (C.11.1.1.1)
        first -= 65536
    if data.size < entries:
        raise UnsupportedError(f"{what} LUT has {data.size} of its {entries} entries")
    try:
        return LookupTable(first, data[:entries], bits)
    except ValueError as exc:
        raise UnsupportedError(f"{what} LUT: {exc}") from exc


def pixel_transform(ds: Dataset) -> PixelTransform:
    """Read Bits Stored, padding, the Modality LUT and the VOI LUT from the header (PS3.3 C.11)."""
    try:
        slope = _first(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = _first(ds.get("RescaleIntercept", 0.0) or 0.0)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        modality_lut = None
        if ds.get("ModalityLUTSequence"):
            modality_lut = _lookup_table(ds.ModalityLUTSequence[0], "Modality", signed)
        centre = width = None
        if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            if width <= 0:  # a broken window: fall back to the image's own range
                centre = width = None
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if width is not None and width < 1 and function == "LINEAR":
            centre = width = None
        voi_lut = None
        if centre is None and ds.get("VOILUTSequence"):
            voi_lut = _lookup_table(ds.VOILUTSequence[0], "VOI", signed)
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        padding = None
        if ds.get("PixelPaddingValue") is not None:
            lo = int(ds.PixelPaddingValue)
            hi = int(ds.get("PixelPaddingRangeLimit", lo))
            padding = (min(lo, hi), max(lo, hi))
        return PixelTransform(
            slope=slope,
            intercept=intercept,
            window_centre=centre,
            window_width=width,
            voi_function=function
            if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID")
            else "LINEAR",
            invert=ds.PhotometricInterpretation == "MONOCHROME1",
            bits_stored=bits,
            signed=signed,
            padding=padding,
            modality_lut=modality_lut,
            voi_lut=voi_lut,
        )
    except (TypeError, ValueError) as exc:
        raise UnsupportedError(f"cannot interpret the pixel transform attributes: {exc}") from exc


def decode(ds: Dataset, pool: DecodePool | None = None) -> SourceImage:
    """Decode the first frame of a greyscale image; raise an :class:`InputError` naming why not.

    With a ``pool``, compressed pixel data is decoded in its worker processes (the codecs hold
    the GIL); native pixel data is always read here.
    """
    if not is_image(ds):
        raise UnsupportedError("the instance has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _GREYSCALE:
        raise UnsupportedError(f"photometric interpretation {photometric!r} is not greyscale")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedError("only one sample per pixel is supported")
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 1 or columns < 1:
        raise DecodeError(f"image has {rows} rows and {columns} columns")
    transform = pixel_transform(ds)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if pool is not None and is_compressed(ds):
            arr = pool.first_frame(ds, frames)
        else:
            arr = _first_frame(ds, frames)
    except InputError:
        raise  # the pool's own verdict (a worker crashed, a time-out) says why already
    except NotImplementedError as exc:
        raise DecodeError(f"no decoder for transfer syntax {ts}: {exc}") from exc
    except Exception as exc:  # decoders raise many types for corrupt data
        raise DecodeError(
            f"pixel data ({ts}) cannot be decoded: {type(exc).__name__}: {exc}"
        ) from exc
    if arr.ndim != 2 or arr.shape != (rows, columns):
        raise DecodeError(f"decoded pixels have shape {arr.shape}, header says {rows}x{columns}")
    return SourceImage(pixels=arr, transform=transform)


def _first_frame(ds: Dataset, frames: int) -> np.ndarray:
    """The first frame's stored words, as the kernels read them.

    Only the first frame is decoded (cheaper for multi-frame objects). Native pixel data is a
    read-only view, not a copy, and the bits above Bits Stored are left as they are: the kernels
    mask them and sign-extend signed values themselves (``pixel_math.stored_value``), so pydicom's
    own pass over every pixel to do the same is skipped.
    """
    from pydicom.pixels import pixel_array

    return pixel_array(
        ds, index=0 if frames > 1 else None, correct_unused_bits=False, view_only=True
    )
