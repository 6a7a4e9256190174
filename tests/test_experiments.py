"""The experiment runner (smoke version) and docs/results.md against the committed experiment JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from experiments.aggregate import stat  # noqa: E402
from scripts import make_results_doc  # noqa: E402

EXPERIMENTS = ("exp1_penalty", "exp2_sparsity", "exp3_bow", "exp4_patchdis", "timings")


def test_stat_mean_and_sample_std():
    s = stat([1.0, 2.0, 6.0])
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(2.6457513, rel=1e-6)
    assert stat([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1, "values": [5.0]}
    assert stat([])["mean"] is None


def test_results_doc_matches_committed_json():
    """docs/results.md is exactly what the generator makes from experiments/results/*.json."""
    expected = make_results_doc.render()
    assert (REPO_ROOT / "docs" / "results.md").read_text(encoding="utf-8") == expected


@pytest.mark.slow
def test_runner_smoke(tmp_path):
    """`run.py --smoke`: every arm trains a few steps on tiny towers; every table is produced."""
    from experiments import run

    out, work = tmp_path / "results", tmp_path / "work"
    assert run.main(["--smoke", "--out", str(out), "--work", str(work)]) == 0
    records = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert {r["arm"] for r in records.values()} == {"overuse", "flops", "bow", "coco-overuse"}
    for record in records.values():
        assert record["timing"]["train_s"] > 0 and record["train"]["last"]["step"] == 3
        points = {p["point"] for p in record["eval"]["curve"]["points"]}
        assert {"threshold", "dense", 32} <= points
    for name in EXPERIMENTS:
        assert (out / f"{name}.json").is_file()
    exp4 = json.loads((out / "exp4_patchdis.json").read_text())
    rows = exp4["sets"]["synthetic"]
    assert 0.0 <= rows["dense linear probe (upper reference)"]["mIoU"]["mean"] <= 1.0
    text = make_results_doc.render(out, tmp_path / "no-notes.md")
    assert "## 4. Patch-level interpretability" in text and "syn-bow-s0" in text
