"""The analysis pipeline on synthetic radiographs with planted lesions (real DICOM headers)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from nidaan.core.errors import InputError
from nidaan.server.inference import OnnxRuntimeBackend
from nidaan.server.pipeline import Pipeline

from factory import sample_file, synthetic_cxr


@pytest.fixture(scope="module")
def pipeline(repository) -> Pipeline:  # type: ignore[no-untyped-def]
    return Pipeline(repository, OnnxRuntimeBackend())


def _finding(pipeline: Pipeline, ds, label: str):  # type: ignore[no-untyped-def]
    (analysis,) = pipeline.analyse([ds])
    return next(f for f in analysis.findings if f.label == label)


@pytest.mark.parametrize("seed", [101, 102, 103])
def test_planted_nodule_scores_above_threshold_and_is_localised(
    pipeline: Pipeline, seed: int
) -> None:
    ds, masks = synthetic_cxr(seed, nodule=True, rows=1100, columns=950)
    f = _finding(pipeline, ds, "nodule")
    assert f.present, f"p={f.probability:.3f} < threshold {f.threshold}"
    assert f.region is not None
    ys, xs = masks["nodule"].nonzero()
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    r = f.region
    assert r.x_min <= cx <= r.x_max and r.y_min <= cy <= r.y_max
    assert r.x_max <= 950 and r.y_max <= 1100  # in source pixels, inside the image


@pytest.mark.parametrize("seed", [201, 202, 203])
def test_normal_radiograph_scores_below_threshold(pipeline: Pipeline, seed: int) -> None:
    ds, _ = synthetic_cxr(seed, rows=1100, columns=950)
    f = _finding(pipeline, ds, "nodule")
    assert not f.present, f"p={f.probability:.3f} >= threshold {f.threshold}"
    assert f.region is None


def test_tb_pattern_is_detected(pipeline: Pipeline) -> None:
    ds, _ = synthetic_cxr(301, tb=True)
    assert _finding(pipeline, ds, "tb").present
    normal, _ = synthetic_cxr(302)
    assert not _finding(pipeline, normal, "tb").present


def test_images_of_one_study_are_batched_and_non_matching_ones_skipped(
    pipeline: Pipeline,
) -> None:
    import pydicom

    a, _ = synthetic_cxr(401, nodule=True)
    b, _ = synthetic_cxr(402)
    mr = pydicom.dcmread(sample_file("MR_small.dcm"))  # no model accepts MR
    results = pipeline.analyse([a, mr, b])
    assert [r.source.SOPInstanceUID for r in results] == [a.SOPInstanceUID, b.SOPInstanceUID]
    single = pipeline.analyse([b])[0]
    batched = results[1]
    np.testing.assert_allclose(
        [f.probability for f in single.findings],
        [f.probability for f in batched.findings],
        atol=1e-5,
    )


def test_headers_are_analysed_with_pixels_loaded_once_each_in_the_study_s_order(
    pipeline: Pipeline,
) -> None:
    """The DICOM route passes headers; each image's pixels are read once (from the spool), the
    images are prepared on several threads at once, and results keep the study's order."""
    images = [synthetic_cxr(501 + i, nodule=i % 2 == 0)[0] for i in range(5)]
    by_uid = {ds.SOPInstanceUID: ds for ds in images}
    headers = []
    for ds in images:
        header = copy.deepcopy(ds)
        del header.PixelData
        headers.append(header)
    loads: list[str] = []

    def load(h):  # type: ignore[no-untyped-def]
        loads.append(h.SOPInstanceUID)
        return by_uid[h.SOPInstanceUID]

    results = pipeline.analyse(headers, load_pixels=load)
    assert sorted(loads) == sorted(by_uid)  # each once
    assert [r.source.SOPInstanceUID for r in results] == [ds.SOPInstanceUID for ds in images]
    one_by_one = [pipeline.analyse([ds])[0] for ds in images]
    for together, alone in zip(results, one_by_one, strict=True):
        np.testing.assert_allclose(
            [f.probability for f in together.findings],
            [f.probability for f in alone.findings],
            atol=1e-5,
        )


def test_an_undecodable_image_fails_alone_with_on_error_and_raises_without(
    pipeline: Pipeline,
) -> None:
    good, _ = synthetic_cxr(611, nodule=True)
    bad, _ = synthetic_cxr(612)
    bad.PixelData = bad.PixelData[:1000]  # truncated native pixel data
    seen: list[tuple[str, str]] = []
    results = pipeline.analyse(
        [bad, good], on_error=lambda ds, exc: seen.append((ds.SOPInstanceUID, str(exc)))
    )
    assert [r.source.SOPInstanceUID for r in results] == [good.SOPInstanceUID]
    assert [uid for uid, _ in seen] == [bad.SOPInstanceUID]
    assert seen[0][1]  # a reason
    with pytest.raises(InputError):
        pipeline.analyse([bad, good])


def test_a_routing_rule_s_models_are_the_only_ones_run(pipeline: Pipeline) -> None:
    ds, _ = synthetic_cxr(601, nodule=True)
    assert pipeline.analyse([ds], allowed=lambda _: frozenset({"ct_nodule"})) == []
    (analysis,) = pipeline.analyse([ds], allowed=lambda _: frozenset({"cxr_screen"}))
    assert analysis.algorithm.name == pipeline.models_for(ds)[0].algorithm.name


def test_a_request_s_own_tensors_are_used_without_loading_pixels(pipeline: Pipeline) -> None:
    ds, _ = synthetic_cxr(602)
    header = copy.deepcopy(ds)
    del header.PixelData
    mine = {str(ds.SOPInstanceUID): pipeline.prepare(ds)}

    def load(h):  # type: ignore[no-untyped-def]
        raise AssertionError("pixels loaded although the caller prepared the tensors")

    (analysis,) = pipeline.analyse([header], prepared=mine, load_pixels=load)
    assert [f.label for f in analysis.findings] == ["nodule", "tb"]
