"""The default recipe on real photos: a short `small-offline` run on coco-mini, with and without its
sparsity means (the logit offset that starts every logit at -5, the overuse penalty on the activations).

Same seed, data order and steps. Without them a trained vector keeps thousands of active words (the
centred codebooks put half the logits above zero); the recipe's run must leave several times fewer on
the held-out images and their captions (at the default threshold), and well under a fifth of the
vocabulary. (A 60-step run is too short to see the penalty alone at work: the active words first rise
while the contrastive loss spreads the vectors, and fall later — docs/results.md.)
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


def test_the_recipes_sparsity_means_lower_active_words(coco_mini, small_offline_model, tmp_path):
    recipe = _run(coco_mini, tmp_path, "penalty")
    without = _run(
        coco_mini,
        tmp_path,
        "none",
        "loss.penalty_weight=0",
        "model.lexical.logit_offset_init=0",
    )
    vocab = small_offline_model.vocab_size
    for side in ("image", "text"):
        active = recipe["active_words"][side]
        assert 0 < active < 0.2 * vocab, side
        assert 3 * active < without["active_words"][side], (side, active, without["active_words"])
