"""Evaluation and explanations end to end with the real `small-offline` model on coco-mini.

Marked `assets`: they need the offline models (`lexvla assets prepare`) and ../shared/data/coco-mini,
and skip with the reason otherwise. Kept to 16 images (one encoding shared through the cache) so the
whole file runs in a few minutes on 2 CPU cores. The model's heads are untrained: the numbers are a
baseline (printed with `-s`), not a quality bar.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.assets

LIMIT = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("encodings")


def test_retrieval_and_sparsity_curve(small_offline_model, coco_mini, cache_dir, tmp_path):
    from lexvla.eval.retrieval import retrieval_table, run_retrieval
    from lexvla.eval.sparsity import run_sparsity_curve, sparsity_table

    captions = coco_mini / "annotations" / "captions_train2017.json"
    result = run_retrieval(
        small_offline_model,
        captions,
        limit=LIMIT,
        cache_dir=cache_dir,
        out=tmp_path / "retrieval.json",
        progress=False,
    )
    print("\n" + retrieval_table(result))
    report = json.loads((tmp_path / "retrieval.json").read_text())
    assert report["num_images"] == LIMIT and report["num_texts"] == 5 * LIMIT
    assert 0.0 <= report["text_to_image/R@10"] <= 100.0
    assert set(report["cosine"]) == {k for k in report if "/R@" in k}
    assert len(report["model"]["fingerprint"]) == 16 and report["data"]["limit"] == LIMIT

    curve = run_sparsity_curve(
        small_offline_model,
        captions,
        limit=LIMIT,
        operating_points=("threshold", 4096, 512, 70, "dense"),
        cache_dir=cache_dir,
        plot=tmp_path / "curve.png",
        progress=False,
    )
    print(sparsity_table(curve))
    words = [p["active_words"]["image"] for p in curve["points"][1:4]]
    assert words == [4096, 512, 70]
    threshold_point = curve["points"][0]
    assert threshold_point["image_to_text/R@1"] == pytest.approx(result["image_to_text/R@1"])
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_patchdis_on_coco_instances(small_offline_model, coco_mini, tmp_path):
    pytest.importorskip("lexvla.data.masks")
    from lexvla.eval.patchdis import patchdis_table, run_patchdis

    result = run_patchdis(
        small_offline_model,
        coco_mini / "annotations" / "instances_train2017.json",
        limit=LIMIT // 2,
        thresholds=(0.0, 0.15, 0.2, 0.25),
        overlays=tmp_path / "overlays",
        out=tmp_path / "patchdis.json",
        progress=False,
    )
    print("\n" + patchdis_table(result))
    assert result["num_images"] == LIMIT // 2 and result["grid"] == 16
    assert 0.0 <= result["mIoU"] <= 1.0
    assert len(result["per_class_iou"]) == 81 and len(result["overlays"]) == LIMIT // 2
    report = json.loads((tmp_path / "patchdis.json").read_text())
    assert report["settings"]["rule"] == result["rule"]


def test_explain_real_image(small_offline_model, coco_mini, tmp_path):
    from lexvla.interpret.explain import image_report

    image = sorted((coco_mini / "train2017").glob("*.jpg"))[0]
    out = image_report(small_offline_model, image, "a dog catches a frisbee in the park", tmp_path)
    assert sum(c for _, c in out["contributions"]) == pytest.approx(out["score"], abs=1e-5)
    print("\n", out["score"], out["contributions"][:5], out["image_words"][:8])
    page = (tmp_path / "index.html").read_text()
    assert "http://" not in page and 'src="file' not in page
