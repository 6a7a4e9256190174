"""The bag-of-words text side (`model.text.encoder="bow"`) and the patch-level linear probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lexvla import create_model
from lexvla.config import apply_overrides
from lexvla.errors import LexVLAError
from lexvla.eval.probe import fit_linear_probe, patch_labels, probe_patch_labels
from lexvla.models.lexvla import LexVLA
from lexvla.presets import get_preset
from lexvla.vocab import fold_word


@pytest.fixture(scope="module")
def bow_model() -> LexVLA:
    cfg = apply_overrides(
        get_preset("tiny"), ["model.text.encoder=bow", "model.text.use_lora=false"]
    )
    return LexVLA(cfg.model).eval()


def test_bow_vector_matches_hand_computed(bow_model):
    # "a" (one letter), "," and the stop words "and", "on", "the" are not lexical words; "red"
    # counts once; a word counts for every vocabulary word of its folded form (circle, circles).
    caption = "A red circle and a red square, on the left"
    content = {"red", "circle", "square", "left"}
    dims = [i for i, w in enumerate(bow_model.vocab.words) if fold_word(w) in content]
    assert {fold_word(bow_model.vocab.words[i]) for i in dims} == content
    expected = torch.zeros(bow_model.vocab_size)
    expected[dims] = 1 / math.sqrt(len(dims))
    with torch.no_grad():
        got = bow_model.encode_text([caption, "the LEFT"]).text_weights
    torch.testing.assert_close(got[0], expected)
    second = {bow_model.vocab.words[i] for i in torch.nonzero(got[1]).flatten().tolist()}
    assert {fold_word(w) for w in second} == {"left"}  # lower-cased before lookup


def test_bow_ignores_the_llm_and_differs_from_it(bow_model):
    llm_model = create_model("tiny").eval()
    with torch.no_grad():
        bow = bow_model.encode_text(["a red circle"]).text_weights
        llm = llm_model.encode_text(["a red circle"]).text_weights
    assert int((bow != 0).sum()) == 2 and int((llm != 0).sum()) == llm_model.vocab_size


def test_bow_config_errors():
    cfg = get_preset("tiny")
    with pytest.raises(LexVLAError, match="use_lora=false"):
        LexVLA(apply_overrides(cfg, ["model.text.encoder=bow"]).model)
    with pytest.raises(LexVLAError, match="encoder"):
        LexVLA(apply_overrides(cfg, ["model.text.encoder=words"]).model)


def test_patch_labels_majority_and_ignore():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 2  # top-left cell: all class 2
    mask[:2, 2:] = 255  # top-right cell: all ignore
    mask[2:, 2:] = [[1, 1], [1, 0]]  # bottom-right: 3 of 4 pixels class 1
    assert patch_labels(mask, 2, num_classes=3).tolist() == [2, 255, 0, 1]


def test_linear_probe_separates_separable_patches():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (6, 16), generator=gen)  # (N, P)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    features = centres[labels] + 0.3 * torch.randn(6, 16, 2, generator=gen)  # (N, P, 2)
    probe = fit_linear_probe(features, labels, 3, steps=200)
    assert torch.equal(probe.predict(features), labels)
    masks = [np.kron(row.reshape(4, 4).numpy(), np.ones((2, 2), dtype=np.int64)) for row in labels]
    assert torch.equal(probe_patch_labels(features, masks, 3), labels)
