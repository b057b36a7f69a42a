"""The pixel transform of one image, read from its DICOM header."""

from __future__ import annotations

from dataclasses import dataclass

from .pixel_math import VOI_LINEAR, VOI_LINEAR_EXACT, VOI_SIGMOID

_VOI_FUNCTIONS = {"LINEAR": VOI_LINEAR, "LINEAR_EXACT": VOI_LINEAR_EXACT, "SIGMOID": VOI_SIGMOID}


@dataclass(frozen=True)
class PixelTransform:
    """Stored value -> display value: rescale, VOI window, MONOCHROME1 inversion.

    ``window_centre``/``window_width`` are None when the header has no VOI window; the kernels then
    window the image's own modality-value range (min to max).
    """

    slope: float = 1.0
    intercept: float = 0.0
    window_centre: float | None = None
    window_width: float | None = None
    voi_function: str = "LINEAR"
    invert: bool = False

    def __post_init__(self) -> None:
        if self.voi_function not in _VOI_FUNCTIONS:
            raise ValueError(f"unsupported VOI LUT Function {self.voi_function!r}")
        if (self.window_centre is None) != (self.window_width is None):
            raise ValueError("a VOI window needs both a centre and a width")
        if (
            self.window_width is not None
            and self.window_width < 1
            and self.voi_function == "LINEAR"
        ):
            raise ValueError(f"window width {self.window_width} < 1 (PS3.3 C.11.2.1.2.1)")
        if self.window_width is not None and self.window_width <= 0:
            raise ValueError(f"window width {self.window_width} must be positive")

    @property
    def voi_code(self) -> int:
        """The VOI function as the number the kernels take."""
        return _VOI_FUNCTIONS[self.voi_function]
