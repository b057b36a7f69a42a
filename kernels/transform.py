"""The pixel transform of one image, read from its DICOM header (PS3.3 C.7.6.3, C.11)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .pixel_math import VOI_LINEAR, VOI_LINEAR_EXACT, VOI_SIGMOID

_VOI_FUNCTIONS = {"LINEAR": VOI_LINEAR, "LINEAR_EXACT": VOI_LINEAR_EXACT, "SIGMOID": VOI_SIGMOID}


@dataclass(frozen=True)
class LookupTable:
    """A Modality or VOI LUT Sequence item: LUT Descriptor first mapped value, data, bits.

    Stored/modality values below ``first_mapped`` take the first entry, above the range the last
    (PS3.3 C.11.1.1.1, C.11.2.1.1). A VOI LUT's output is scaled to [0, 1] by ``2**bits - 1``.
    """

    first_mapped: int
    data: np.ndarray
    bits: int

    def __post_init__(self) -> None:
        if self.data.ndim != 1 or self.data.size == 0:
            raise ValueError("a lookup table needs a non-empty 1-D data array")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"LUT entries of {self.bits} bits are not supported (1-16)")


@dataclass(frozen=True)
class PixelTransform:
    """Stored value -> display value: bits, padding, Modality LUT, VOI LUT, MONOCHROME1 inversion.

    ``window_centre``/``window_width`` are None when the header has no VOI window (nor a VOI LUT
    Sequence); the kernels then window the image's own modality-value range (min to max).
    """

    slope: float = 1.0
    intercept: float = 0.0
    window_centre: float | None = None
    window_width: float | None = None
    voi_function: str = "LINEAR"
    invert: bool = False
    #: Bits Stored and Pixel Representation; None takes them from the pixel array's dtype.
    bits_stored: int | None = None
    signed: bool | None = None
    #: Pixel Padding Value and Pixel Padding Range Limit (stored values), both inclusive.
    padding: tuple[int, int] | None = None
    modality_lut: LookupTable | None = None
    voi_lut: LookupTable | None = None

    def __post_init__(self) -> None:
        if self.voi_function not in _VOI_FUNCTIONS:
            raise ValueError(f"unsupported VOI LUT Function {self.voi_function!r}")
        if (self.window_centre is None) != (self.window_width is None):
            raise ValueError("a VOI window needs both a centre and a width")
        if self.window_width is not None and self.window_width <= 0:
            raise ValueError(f"window width {self.window_width} must be positive")
        if self.bits_stored is not None and not 1 <= self.bits_stored <= 32:
            raise ValueError(f"Bits Stored {self.bits_stored} is outside 1-32")
        if self.padding is not None and self.padding[0] > self.padding[1]:
            raise ValueError(f"padding range {self.padding} is empty")

    @property
    def voi_code(self) -> int:
        """The VOI function as the number the kernels take."""
        return _VOI_FUNCTIONS[self.voi_function]

    @property
    def needs_table(self) -> bool:
        """True when a LUT Sequence makes the transform a table rather than rescale + window."""
        return self.modality_lut is not None or self.voi_lut is not None

    def for_array(self, dtype: np.dtype) -> PixelTransform:
        """This transform with Bits Stored and signedness filled in from a pixel array's dtype."""
        if self.bits_stored is not None and self.signed is not None:
            return self
        return dataclasses.replace(
            self,
            bits_stored=self.bits_stored or min(dtype.itemsize * 8, 32),
            signed=dtype.kind == "i" if self.signed is None else self.signed,
        )

    @property
    def value_range(self) -> tuple[int, int]:
        """Smallest and largest stored value Bits Stored and Pixel Representation allow."""
        bits = self.bits_stored or 16
        if self.signed:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    @property
    def mask(self) -> int:
        """Bits Stored mask for the kernels (garbage above it is ignored), as an unsigned value."""
        bits = self.bits_stored or 16
        return (1 << bits) - 1

    @property
    def sign_bit(self) -> int:
        """The sign bit to sign-extend from, or 0 for unsigned pixels."""
        bits = self.bits_stored or 16
        return 1 << (bits - 1) if self.signed and bits < 32 else 0

    def with_window(self, centre: float, width: float) -> PixelTransform:
        """The same transform with another VOI window (for multi-window channels)."""
        return dataclasses.replace(self, window_centre=centre, window_width=width, voi_lut=None)
