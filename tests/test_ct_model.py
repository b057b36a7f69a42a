"""The second demo model, ``ct_nodule``, and several models per study: routing by the sidecars,
each applicable model runs on its images, and their findings land in one report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nidaan.core.config import InferenceConfig
from nidaan.core.findings import ImageAnalysis
from nidaan.pacs_bridge.reports import build_report, report_uids
from nidaan.server.backends import create_backend
from nidaan.server.pipeline import Pipeline

from factory import save, synthetic_ct_series, synthetic_cxr
from srutil import dciodvfy_errors, evidence, graphics, texts

NODULE_SLICES = (1, 3)


@pytest.fixture(scope="module")
def pipeline(repository) -> Pipeline:  # type: ignore[no-untyped-def]
    return Pipeline(repository, create_backend(InferenceConfig(), repository))


def _contains(box, mask: np.ndarray) -> bool:  # type: ignore[no-untyped-def]
    ys, xs = mask.nonzero()
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    return box.x_min <= cx <= box.x_max and box.y_min <= cy <= box.y_max


@pytest.mark.parametrize("seed", [0, 1])
def test_ct_slices_with_a_planted_nodule_are_flagged_and_localised(
    pipeline: Pipeline, seed: int
) -> None:
    series, masks = synthetic_ct_series(seed, NODULE_SLICES, slices=4, size=512)
    analyses = pipeline.analyse(series)
    assert [a.algorithm.name for a in analyses] == [
        "Nidaan demo chest CT slice nodule detector (synthetic-trained)"
    ] * 4
    for k, a in enumerate(analyses):
        (finding,) = a.findings
        assert a.source.SOPInstanceUID == series[k].SOPInstanceUID
        assert finding.present == (k in NODULE_SLICES), f"slice {k}: p={finding.probability:.3f}"
        if k in NODULE_SLICES:
            assert finding.region is not None and _contains(finding.region, masks[k])
            assert finding.region.x_max <= 512 and finding.region.y_max <= 512


def test_each_image_goes_to_the_models_whose_sidecar_accepts_it(pipeline: Pipeline) -> None:
    cr, _ = synthetic_cxr(5, rows=300, columns=300)
    (ct,), _ = synthetic_ct_series(5, slices=1, size=128)
    assert [m.name for m in pipeline.models_for(cr)] == ["cxr_screen"]
    assert [m.name for m in pipeline.models_for(ct)] == ["ct_nodule"]
    ct.BodyPartExamined = "HEAD"  # a head CT is not for a chest model
    assert pipeline.models_for(ct) == []
    assert pipeline.models_for(cr, frozenset({"ct_nodule"})) == []  # a routing rule's choice


def test_a_study_with_radiograph_and_ct_gets_one_report_with_both_models(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    cr, cr_masks = synthetic_cxr(3, nodule=True, rows=1000, columns=900)
    series, ct_masks = synthetic_ct_series(
        0, NODULE_SLICES, slices=4, size=512, study_uid=cr.StudyInstanceUID, patient=cr
    )
    analyses: list[ImageAnalysis] = pipeline.analyse([cr, *series])
    assert sorted({a.algorithm.name for a in analyses}) == [
        "Nidaan demo chest CT slice nodule detector (synthetic-trained)",
        "Nidaan demo chest radiograph screen (synthetic-trained)",
    ]
    assert len(analyses) == 5
    series_uid, sop_uid = report_uids(str(cr.StudyInstanceUID), "mixed")
    sr = build_report(
        analyses,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        device_observer_uid="2.25.99",
    )
    path = save(sr, tmp_path / "mixed.dcm")
    assert dciodvfy_errors(path) == []
    assert evidence(sr) == {str(cr.SOPInstanceUID)} | {str(s.SOPInstanceUID) for s in series}
    words = " ".join(texts(sr))
    assert "chest CT slice nodule detector" in words and "chest radiograph screen" in words
    # Regions: one around the radiograph's nodule and one around each CT slice's nodule.
    boxes = [g for g in graphics(sr) if len(g) >= 8]
    planted = [cr_masks["nodule"]] + [ct_masks[k] for k in NODULE_SLICES]
    for mask in planted:
        ys, xs = mask.nonzero()
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        assert any(
            min(g[0::2]) <= cx <= max(g[0::2]) and min(g[1::2]) <= cy <= max(g[1::2]) for g in boxes
        ), f"no region around ({cx:.0f}, {cy:.0f})"
