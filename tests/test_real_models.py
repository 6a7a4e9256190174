"""Real offline models (DINOv2-S/14 + SmolLM2-135M) through the LexVLA model, untrained heads."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.assets


def test_text_branch_ranks_dog_in_the_top_5(small_offline_model):
    with torch.no_grad():
        weights = small_offline_model.encode_text(
            ["A dog catches a frisbee in the park."]
        ).text_weights
    top = [word for word, _ in small_offline_model.top_words(weights, 5, merge_pieces=True)[0]]
    assert "dog" in top, top


def test_text_branch_reads_a_bus_caption(small_offline_model):
    with torch.no_grad():
        weights = small_offline_model.encode_text(
            ["A red double-decker bus driving down a city street."]
        )
    top = [
        w for w, _ in small_offline_model.top_words(weights.text_weights, 10, merge_pieces=True)[0]
    ]
    assert {"bus", "red", "double"} <= set(top), top


def test_real_image_encoding_shapes_and_sparsity(small_offline_model, coco_mini):
    images = sorted((coco_mini / "train2017").glob("*.jpg"))[:2]
    with torch.no_grad():
        out = small_offline_model.encode_image(images, return_patches=True)
    V = small_offline_model.vocab_size
    assert V == 21223  # the "words" vocabulary of SmolLM2
    assert out.image_weights.shape == (2, V) and out.patch_weights.shape == (2, 256, V)
    assert torch.isfinite(out.image_weights).all() and (out.image_weights > 0).all()
    active = (small_offline_model.sparsify(out.image_weights) > 0).sum(-1)
    assert (active > 0).all() and (active < V).all()
