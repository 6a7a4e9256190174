"""The main job end to end, with a tiny training budget: report with non-empty figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.assets, pytest.mark.slow]


def test_demo_writes_a_report_with_figures(tmp_path, coco_mini, small_offline_model):
    from lexvla.demo import run_demo

    report = run_demo(data_dir=coco_mini, out_dir=tmp_path, steps=2)
    html = report.read_text()
    assert "Retrieval on held-out images" in html and "PatchDis" in html and "word by word" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    results = json.loads((tmp_path / "report.json").read_text())
    assert {"retrieval", "retrieval_untrained", "patchdis", "searches", "sparsity_curve"} <= set(
        results
    )
    assert results["retrieval"]["num_images"] == 16
    assert len(results["searches"]) == 3 and all(s["hits"] for s in results["searches"])
    for png in [tmp_path / "sparsity.png", *tmp_path.glob("inside/*/*.png")]:
        pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
        assert pixels.std() > 5, f"{png} looks blank"
    assert len(list(tmp_path.glob("inside/*/*.png"))) >= 6
