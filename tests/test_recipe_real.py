"""The default recipe on real photos: a short `small-offline` run on coco-mini, the penalty on and off.

Same seed, data order and steps; only `loss.penalty_weight` differs. The recipe's overuse penalty on the
activations must leave fewer active words (at the default threshold) on the held-out images and their
captions than the run without it, and the run must keep the vectors far below the dense default of the
old recipe (about half the vocabulary).
"""

from __future__ import annotations

import json

import pytest

from lexvla.train.loop import fit
from lexvla.train.setup import experiment_config

pytestmark = [pytest.mark.assets, pytest.mark.slow]
STEPS = 60


def _run(coco_mini, tmp_path, name, *overrides):
    cfg = experiment_config(
        "small-offline",
        data=str(coco_mini / "annotations" / "captions_train2017.json"),
        images=coco_mini / "train2017",
        overrides=[
            f"train.steps={STEPS}",
            "train.save_every=0",
            "train.eval_every=0",
            "train.log_every=10",
            "train.warmup_steps=10",
            "loss.penalty_warmup_steps=10",
            *overrides,
        ],
    )
    fit(cfg, tmp_path / name, progress=False)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    return summary["eval"]


def test_the_recipes_penalty_lowers_active_words(coco_mini, small_offline_model, tmp_path):
    with_penalty = _run(coco_mini, tmp_path, "penalty")
    without = _run(coco_mini, tmp_path, "none", "loss.penalty_weight=0")
    vocab = small_offline_model.vocab_size
    for side in ("image", "text"):
        active = with_penalty["active_words"][side]
        assert active < without["active_words"][side], side
        assert active < 0.2 * vocab, side
