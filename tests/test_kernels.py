"""The CPU kernels against the NumPy reference, and the heatmap-to-region mapping."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nidaan.kernels import InputLayout, PixelTransform, Placement, peak_region, preprocess, regions
from nidaan.kernels.geometry import taps
from nidaan.kernels.reference import display, preprocess_one
from nidaan.kernels.transform import LookupTable

#: Kernels compute in float32 (as on the GPU); the reference in float64. Normalised outputs agree
#: to 1e-4 (display values to 2.5e-5 with std 0.25).
ATOL = 1e-4
LAYOUT = InputLayout(64, 64, "letterbox", pad_value=0.0, mean=0.5, std=0.25)


def _check(
    src: np.ndarray, t: PixelTransform, layout: InputLayout = LAYOUT, atol: float = ATOL
) -> np.ndarray:
    batch, placements = preprocess([src], [t], layout)
    ref = preprocess_one(
        src, t, placements[0], layout.pad_value, layout.mean, layout.std, layout.windows
    )
    np.testing.assert_allclose(batch[0], ref, atol=atol)
    return batch[0, 0]


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (3, 2), (64, 64), (65, 63), (200, 50), (31, 500), (129, 127)]
)
@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_cpu_matches_reference_for_odd_sizes(shape: tuple[int, int], mode: str) -> None:
    rng = np.random.default_rng(sum(shape))
    src = rng.integers(0, 4096, shape).astype(np.uint16)
    t = PixelTransform(window_centre=1800.0, window_width=2500.0)
    _check(src, t, InputLayout(64, 64, mode, 0.0, 0.5, 0.25))


@pytest.mark.parametrize(
    "t",
    [
        PixelTransform(),  # no window in the header: the image's own range
        PixelTransform(window_centre=100.0, window_width=1.0),  # width 1 is a threshold
        PixelTransform(slope=2.5, intercept=-1024.0, window_centre=40.0, window_width=400.0),
        PixelTransform(slope=-1.0, intercept=4095.0),  # negative slope, own range
        PixelTransform(slope=1e-3, intercept=1e4, window_centre=10001.0, window_width=3.0),
        PixelTransform(window_centre=2048.0, window_width=4096.0, invert=True),
        PixelTransform(window_centre=1000.0, window_width=800.0, voi_function="SIGMOID"),
        PixelTransform(window_centre=1000.0, window_width=800.0, voi_function="LINEAR_EXACT"),
    ],
)
def test_pixel_transforms_match_reference(t: PixelTransform) -> None:
    src = np.random.default_rng(1).integers(0, 4096, (97, 131)).astype(np.uint16)
    _check(src, t)


def test_signed_and_big_endian_input() -> None:
    rng = np.random.default_rng(2)
    signed = rng.integers(-2000, 2000, (50, 70)).astype(np.int16)
    t = PixelTransform(slope=1.0, intercept=0.0, window_centre=0.0, window_width=1000.0)
    out = _check(signed, t)
    big = signed.astype(">i2")
    batch, _ = preprocess([big], [t], LAYOUT)
    np.testing.assert_array_equal(batch[0, 0], out)


def test_monochrome1_is_the_inverse_of_monochrome2() -> None:
    src = np.random.default_rng(3).integers(0, 4096, (80, 80)).astype(np.uint16)
    a = _check(src, PixelTransform(window_centre=2048.0, window_width=4096.0))
    b = _check(src, PixelTransform(window_centre=2048.0, window_width=4096.0, invert=True))
    # display d and 1 - d normalise to (d - m)/s and (1 - d - m)/s: they sum to (1 - 2m)/s = 0.
    np.testing.assert_allclose(a + b, 0.0, atol=1e-5)


def test_letterbox_pads_with_the_pad_value_and_keeps_aspect() -> None:
    src = np.full((10, 40), 4095, np.uint16)
    out = _check(src, PixelTransform(window_centre=2048.0, window_width=4096.0))
    p = Placement.fit(10, 40, 64, 64, "letterbox")
    assert (p.height, p.width, p.offset_y, p.offset_x) == (16, 64, 24, 0)
    assert np.all(out[: p.offset_y] == pytest.approx((0.0 - 0.5) / 0.25))
    assert np.all(out[p.offset_y : p.offset_y + p.height] == pytest.approx((1.0 - 0.5) / 0.25))


def test_area_average_preserves_the_mean_when_shrinking() -> None:
    src = np.random.default_rng(4).integers(0, 4096, (1000, 1000)).astype(np.uint16)
    t = PixelTransform(window_centre=2048.0, window_width=4097.0)
    out = _check(src, t, InputLayout(64, 64, "stretch", 0.0, 0.0, 1.0))
    assert out.mean() == pytest.approx(display(src, t).mean(), abs=1e-4)


@given(n_src=st.integers(1, 3000), n_out=st.integers(1, 600))
@settings(max_examples=200, deadline=None)
def test_taps_are_normalised_and_in_bounds(n_src: int, n_out: int) -> None:
    start, count, weights = taps(n_src, n_out)
    assert np.all(count >= 1)
    assert np.all(start >= 0) and np.all(start + count <= n_src)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-9)


@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    centre=st.floats(-5000, 5000),
    # Not 1: a window of width 1 is a step (PS3.3 C.11.2.1.2), which a value a float32 ulp
    # from its edge falls on either side of; no float32 kernel can match a float64 reference.
    width=st.floats(2, 10000),
    slope=st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3),
    intercept=st.floats(-3000, 3000),
    invert=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_cpu_matches_reference_property(
    h: int,
    w: int,
    centre: float,
    width: float,
    slope: float,
    intercept: float,
    invert: bool,
    seed: int,
) -> None:
    src = np.random.default_rng(seed).integers(-32768, 32767, (h, w)).astype(np.int16)
    t = PixelTransform(slope, intercept, centre, width, "LINEAR", invert)
    layout = InputLayout(32, 48, "letterbox", 0.0, 0.5, 0.25)
    # The kernel computes in float32 by design: a rescaled value v is off by up to about
    # |v| x 2^-23, which the window's slope 1 / (width - 1) and the normalisation's 1 / std
    # magnify. A narrow window over values of 10^5 (slope 4 on int16) is that ill-conditioned
    # (a hypothesis case: width 1, values near -938, one output 0.53 off).
    magnitude = abs(slope) * 32768 + abs(intercept) + abs(centre)
    atol = ATOL + 4 * 2**-23 * magnitude / (width - 1) / layout.std
    _check(src, t, layout, atol)


def test_peak_region_maps_back_to_source_pixels() -> None:
    # A 2000 x 1000 (rows x columns) image letterboxed into 256 x 256: width 128, offset 64.
    p = Placement.fit(2000, 1000, 256, 256, "letterbox")
    assert (p.offset_x, p.width) == (64, 128)
    heat = np.zeros((32, 32))
    heat[10, 12] = 1.0  # cell = 8 x 8 input pixels: x 96..104, y 80..88
    heat[10, 13] = 0.6
    heat[20, 20] = 0.9  # a second blob, not connected to the peak: ignored
    box = peak_region(heat, p, fraction=0.5)
    assert box is not None
    scale = 2000 / 256
    assert box == pytest.approx(((96 - 64) * scale, 80 * scale, (112 - 64) * scale, 88 * scale))


def test_outlines_of_a_letterboxed_non_square_image_are_exact_source_points() -> None:
    # 2000 rows x 1000 columns letterboxed into 256 x 256: scale 0.128, the image is input
    # columns 64..192 (offset 64, width 128), all rows. A heatmap cell is 8 x 8 input pixels,
    # 62.5 x 62.5 source pixels; input (X, Y) is source ((X - 64) * 7.8125, Y * 7.8125).
    p = Placement.fit(2000, 1000, 256, 256, "letterbox")
    assert (p.offset_y, p.offset_x, p.height, p.width) == (0, 64, 256, 128)
    heat = np.zeros((32, 32))
    # An L of three cells: input x 96..112 on row 10 (y 80..88), x 96..104 on row 11 (y 88..96).
    heat[10, 12], heat[10, 13], heat[11, 12] = 1.0, 0.8, 0.7
    heat[20, 7], heat[20, 8] = 0.9, 0.6  # input x 56..72, y 160..168: across the left padding
    heat[5, 2] = 0.95  # input x 16..24: wholly in the padding, dropped
    ell, edge = regions(heat, p, threshold=0.5)
    # The L's convex hull (its inner corner (104, 88) is inside): a diagonal edge from (112, 88)
    # to (104, 96), counter-clockwise from the top left, closed.
    assert ell.outline == (
        (250.0, 625.0),
        (375.0, 625.0),
        (375.0, 687.5),
        (312.5, 750.0),
        (250.0, 750.0),
        (250.0, 625.0),
    )
    assert ell.box == (250.0, 625.0, 375.0, 750.0) and (ell.peak, ell.cells) == (1.0, 3)
    # The padding's part is cut at the image's left edge (x 0), not mapped to negative columns.
    assert edge.outline == (
        (0.0, 1250.0),
        (62.5, 1250.0),
        (62.5, 1312.5),
        (0.0, 1312.5),
        (0.0, 1250.0),
    )


def test_peak_region_in_the_padding_is_none() -> None:
    p = Placement.fit(2000, 1000, 256, 256, "letterbox")
    heat = np.zeros((32, 32))
    heat[5, 2] = 1.0  # columns 16..24: wholly in the left padding (0..64)
    assert peak_region(heat, p) is None


def test_garbage_above_bits_stored_is_ignored() -> None:
    clean = np.random.default_rng(5).integers(0, 4096, (40, 50)).astype(np.uint16)
    dirty = clean | (np.random.default_rng(6).integers(0, 16, clean.shape).astype(np.uint16) << 12)
    t = PixelTransform(window_centre=2048.0, window_width=4096.0, bits_stored=12, signed=False)
    np.testing.assert_array_equal(_check(dirty, t), _check(clean, t))


def test_signed_12_bit_in_16_bit_words_is_sign_extended() -> None:
    values = np.random.default_rng(7).integers(-2048, 2048, (30, 30))
    words = (values & 0xFFF).astype(np.uint16)  # as stored: 12-bit two's complement
    t = PixelTransform(window_centre=0.0, window_width=4096.0, bits_stored=12, signed=True)
    ref = _check(values.astype(np.int16), t)
    np.testing.assert_allclose(_check(words, t), ref, atol=ATOL)


def test_pixel_padding_value_shows_as_the_pad_value() -> None:
    src = np.full((32, 32), 3000, np.uint16)
    src[:, :16] = 0  # padding outside the collimated area
    t = PixelTransform(window_centre=2048.0, window_width=4096.0, padding=(0, 0), invert=True)
    out = _check(src, t, InputLayout(32, 32, "stretch", pad_value=0.0, mean=0.0, std=1.0))
    assert np.all(out[:, :16] == 0.0)  # black, not the white an inverted 0 would give


def test_modality_and_voi_lut_sequences() -> None:
    src = np.random.default_rng(8).integers(0, 1024, (50, 60)).astype(np.uint16)
    mlut = LookupTable(first_mapped=10, data=np.linspace(-500, 1500, 900), bits=16)
    vlut = LookupTable(first_mapped=-400, data=np.sqrt(np.linspace(0, 65535**2, 1700)), bits=16)
    _check(src, PixelTransform(modality_lut=mlut, window_centre=500.0, window_width=800.0))
    _check(src, PixelTransform(modality_lut=mlut, voi_lut=vlut, invert=True))
    _check(src, PixelTransform(slope=2.0, intercept=-300.0, voi_lut=vlut))


def test_several_windows_become_channels() -> None:
    ct = np.random.default_rng(9).integers(-1024, 2000, (70, 70)).astype(np.int16)
    windows = ((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0))  # lung, mediastinum, bone
    layout = InputLayout(32, 32, "letterbox", 0.0, 0.5, 0.25, windows=windows)
    t = PixelTransform(slope=1.0, intercept=0.0)
    _check(ct, t, layout)
    batch, _ = preprocess([ct], [t], layout)
    assert batch.shape == (1, 3, 32, 32)
    assert not np.allclose(batch[0, 0], batch[0, 1])


def test_float16_output_matches_float32() -> None:
    src = np.random.default_rng(10).integers(0, 4096, (100, 90)).astype(np.uint16)
    t = PixelTransform(window_centre=2000.0, window_width=3000.0)
    f32, _ = preprocess([src], [t], LAYOUT)
    layout16 = InputLayout(64, 64, "letterbox", 0.0, 0.5, 0.25, dtype="float16")
    f16, _ = preprocess([src], [t], layout16)
    assert f16.dtype == np.float16
    np.testing.assert_allclose(f16.astype(np.float32), f32, atol=2e-3)


def test_batch_of_different_sizes_fills_a_preallocated_buffer() -> None:
    rng = np.random.default_rng(11)
    images = [rng.integers(0, 4096, s).astype(np.uint16) for s in ((300, 200), (64, 64), (5, 900))]
    t = PixelTransform(window_centre=2048.0, window_width=4096.0)
    buffer = np.full(LAYOUT.shape(4), np.nan, np.float32)
    out, placements = preprocess(images, [t] * 3, LAYOUT, out=buffer)
    assert out is buffer and np.isnan(buffer[3]).all() and not np.isnan(buffer[:3]).any()
    for n, (img, p) in enumerate(zip(images, placements, strict=True)):
        np.testing.assert_allclose(buffer[n], preprocess_one(img, t, p, 0.0, 0.5, 0.25), atol=ATOL)


def test_regions_are_connected_components_above_threshold_in_source_pixels() -> None:
    p = Placement.fit(1000, 1000, 256, 256, "stretch")  # 32 x 32 cells of 31.25 source pixels
    heat = np.zeros((32, 32))
    heat[2:4, 2:5] = 0.8  # a 2 x 3 blob
    heat[20, 20] = 0.95  # a single strong cell
    heat[20, 22] = 0.6  # not 4-connected to it
    heat[30, 30] = 0.3  # below threshold
    found = regions(heat, p, threshold=0.5)
    assert [r.cells for r in found] == [1, 6, 1]
    strong, blob, _ = found
    assert strong.peak == 0.95
    cell = 1000 / 32
    assert blob.box == pytest.approx((2 * cell, 2 * cell, 5 * cell, 4 * cell))
    xs = [x for x, _ in blob.outline]
    assert blob.outline[0] == blob.outline[-1] and min(xs) == pytest.approx(2 * cell)
    assert regions(heat, p, threshold=0.99) == []


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_fast_unsigned_path_for_every_unsigned_type(dtype: type) -> None:
    info = np.iinfo(dtype)
    high = min(int(info.max), 70000)
    src = np.random.default_rng(12).integers(0, high, (96, 80)).astype(dtype)
    t = PixelTransform(window_centre=high / 2, window_width=float(high), signed=False)
    _check(src, t, InputLayout(24, 20, "stretch", 0.0, 0.5, 0.25))  # 4x: the fast horizontal pass
    _check(src, t, InputLayout(30, 25, "letterbox", 0.0, 0.5, 0.25))  # fractional taps


# --- defects of the first kernels (issue 9), each against values worked out by hand ------------


def _one_row(src: np.ndarray, t: PixelTransform) -> np.ndarray:
    """Display values of an image kept at its size (stretch, mean 0, std 1, no resampling); the
    row itself for a one-row image."""
    layout = InputLayout(src.shape[0], src.shape[1], "stretch", 0.0, 0.0, 1.0)
    out = _check(src, t, layout)
    return out[0] if src.shape[0] == 1 else out


def test_uint32_values_at_and_above_2_31_are_exact() -> None:
    # A stored value above 2**31 - 1 once wrapped negative (cast to int32): [0, .5, 0, 0].
    src = np.array([[0, 2**31 - 1, 2**31, 2**32 - 1]], np.uint32)
    t = PixelTransform(window_centre=2.0**31, window_width=2.0**32)
    np.testing.assert_allclose(_one_row(src, t), [0.0, 0.5, 0.5, 1.0], atol=1e-6)
    # The general kernel (padding forces it) and the automatic window take the same values.
    padded = PixelTransform(window_centre=2.0**31, window_width=2.0**32, padding=(7, 7))
    np.testing.assert_allclose(_one_row(src, padded), [0.0, 0.5, 0.5, 1.0], atol=1e-6)
    auto = _one_row(src, PixelTransform(padding=(7, 7)))
    np.testing.assert_allclose(auto, [0.0, 0.5, 0.5, 1.0], atol=1e-6)


def test_padding_is_left_out_of_the_automatic_window() -> None:
    # PS3.3 C.7.5.1.1.2: padding is not image data. A CT with 30% padding at -3024 and no
    # window: its real pixels span the whole display range, not [0.503, 1].
    rng = np.random.default_rng(5)
    real = rng.integers(-1000, 2000, (40, 40))
    src = np.where(rng.random((40, 40)) < 0.3, -3024, real).astype(np.int16)
    src[0, 0], src[0, 1] = -1000, 1999  # the real range's ends are present
    t = PixelTransform(slope=1.0, intercept=0.0, padding=(-3024, -3024))
    out = _one_row(src, t)
    data = out[src != -3024]
    assert data.min() < 1e-3 and data.max() > 1.0 - 1e-3
    assert np.all(out[src == -3024] == 0.0)  # padding shows as the pad value


def test_narrow_linear_exact_window_far_from_zero() -> None:
    # Width 3 around 60000: (v - c) / w + 0.5 for v = 59998 .. 60002 (exact in float64).
    src = np.arange(59998, 60003, dtype=np.uint16).reshape(1, 5)
    t = PixelTransform(window_centre=60000.0, window_width=3.0, voi_function="LINEAR_EXACT")
    expected = np.clip((np.arange(59998, 60003) - 60000.0) / 3.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(_one_row(src, t), expected, atol=1e-4)
    # Through the general kernel (signed pixels) too.
    signed = PixelTransform(window_centre=30000.0, window_width=3.0, voi_function="LINEAR_EXACT")
    s16 = np.arange(29998, 30003, dtype=np.int16).reshape(1, 5)
    expected = np.clip((np.arange(29998, 30003) - 30000.0) / 3.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(_one_row(s16, signed), expected, atol=1e-4)
