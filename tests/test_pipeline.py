"""The analysis pipeline on synthetic radiographs with planted lesions (real DICOM headers)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

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


def test_inspected_images_are_not_decoded_again(pipeline: Pipeline) -> None:
    ds, _ = synthetic_cxr(501, nodule=True)
    assert pipeline.inspect(ds) is True
    header = copy.deepcopy(ds)
    del header.PixelData  # the worker passes headers; pixels are read only when not cached
    loads: list[str] = []

    def load(h):  # type: ignore[no-untyped-def]
        loads.append(h.SOPInstanceUID)
        return ds

    first = pipeline.analyse([header], load_pixels=load)
    assert loads == []  # the tensor prepared on arrival was used
    second = pipeline.analyse([header], load_pixels=load)
    assert loads == [ds.SOPInstanceUID]  # consumed: now read from the spool
    assert first[0].findings == second[0].findings


def test_a_cached_instance_runs_only_the_models_the_analysis_asks_for(
    pipeline: Pipeline,
) -> None:
    """The DICOM route caches an arriving radiograph's tensors for cxr_screen; an analysis of the
    same instance that asks for other models (another route, another routing rule) must not run
    cxr_screen from that cache."""
    ds, _ = synthetic_cxr(601, nodule=True)
    assert pipeline.inspect(ds, frozenset({"cxr_screen"})) is True
    assert pipeline.analyse([ds], allowed=lambda _: frozenset({"ct_nodule"})) == []
    # And the other way round: cached for no model, analysed for cxr_screen.
    assert pipeline.inspect(ds, frozenset()) is False
    (analysis,) = pipeline.analyse([ds], allowed=lambda _: frozenset({"cxr_screen"}))
    assert analysis.algorithm.name == pipeline.models_for(ds)[0].algorithm.name


def test_a_request_s_own_tensors_are_used_and_the_arrival_cache_left_alone(
    pipeline: Pipeline,
) -> None:
    ds, _ = synthetic_cxr(602)
    assert pipeline.inspect(ds) is True
    cached = pipeline.cached_bytes
    mine = {str(ds.SOPInstanceUID): pipeline.prepare(ds)}
    (analysis,) = pipeline.analyse([ds], prepared=mine)
    assert pipeline.cached_bytes == cached  # the DICOM route's entry is still waiting
    assert [f.label for f in analysis.findings] == ["nodule", "tb"]
