"""The trained parts added around the towers: logit affine, text head, low-rank image codebook."""

from __future__ import annotations

import pytest
import torch

from lexvla.config import apply_overrides
from lexvla.errors import LexVLAError
from lexvla.layers.lexical import LogitAffine, lexical_activation, lexical_max_pool
from lexvla.models.lexvla import LexVLA
from lexvla.models.text import TextHead
from lexvla.presets import get_preset

HEADS = [
    "model.lexical.logit_affine=true",
    "model.lexical.logit_offset_init=-3.0",
    "model.text.use_lora=false",
    "model.text.head=mlp",
    "model.lexical.image_codebook_rank=4",
]


def _model(*overrides: str) -> LexVLA:
    return LexVLA(apply_overrides(get_preset("tiny"), list(overrides)).model)


def test_logit_affine_is_monotone_so_it_commutes_with_the_max_pool():
    affine = LogitAffine(scale=2.5, offset=-1.0)
    hidden, codebook = torch.randn(3, 7, 5), torch.randn(11, 5)
    pooled_then_mapped = affine(lexical_max_pool(hidden, codebook, impl="naive"))
    mapped_then_pooled = affine(hidden @ codebook.t()).max(dim=1).values
    torch.testing.assert_close(pooled_then_mapped, mapped_then_pooled)
    torch.testing.assert_close(LogitAffine()(codebook), codebook)  # identity at scale 1, offset 0


def test_untrained_text_head_is_the_identity():
    head = TextHead(6, mlp_ratio=2.0)
    states = torch.randn(4, 6)
    torch.testing.assert_close(head(states), states)


def test_heads_at_init_shift_the_logits_only_by_the_offset():
    plain, heads = _model("model.text.use_lora=false"), _model(*HEADS)
    states = torch.randn(2, plain.text.codebook.shape[1])
    torch.testing.assert_close(heads.text.logits(states), plain.text.logits(states) - 3.0)
    torch.testing.assert_close(heads.vision.codebook_weight(), plain.vision.codebook_weight())


def test_low_rank_codebook_trains_only_its_factors_and_round_trips(tmp_path):
    model = _model(*HEADS)
    names = set(model.trainable_parameters())
    assert {"vision.codebook_u", "vision.codebook_w"} <= names and "vision.codebook" not in names
    assert {"text.head.up.weight", "vision.affine.offset", "text.affine.log_scale"} <= names
    V, D = model.text.codebook.shape
    assert model.num_trainable()["image_codebook"] == V * 4 + 4 * D
    features = torch.randn(2, 16, model.vision.backbone.config.hidden_size)
    weights = model(image_features=features, text_features=torch.randn(2, D))
    (weights["image_weights"].sum() + weights["text_weights"].sum()).backward()
    assert model.vision.codebook_u.grad is not None and model.text.head.down.weight.grad is not None
    with torch.no_grad():
        model.vision.codebook_u.add_(0.1)
        model.vision.affine.offset.add_(0.5)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LexVLA.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision(features)[0], model.vision(features)[0])
        states = torch.randn(3, D)
        torch.testing.assert_close(loaded.text(states), model.text(states))


def test_random_patches_keep_a_subset_of_each_images_own_patches():
    from lexvla.models.lexvla import random_patches

    features = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    torch.manual_seed(0)
    kept = random_patches(features, 0.5)
    assert kept.shape == (2, 5, 3)
    for image in range(2):
        rows = {tuple(r) for r in features[image].tolist()}
        chosen = [tuple(r) for r in kept[image].tolist()]
        assert set(chosen) <= rows and len(set(chosen)) == 5  # distinct patches of this image
    assert random_patches(features, 0.01).shape == (2, 1, 3)


def test_input_words_add_exactly_the_captions_own_words():
    model = _model("model.text.use_lora=false", "model.text.input_words_weight=2.0").eval()
    captions = ["a dog runs on the grass", "two dogs"]
    states = torch.randn(2, model.text.codebook.shape[1])
    with torch.no_grad():
        plain = lexical_activation(model.text.logits(states))  # (B, V), the LLM's prediction alone
        added = model.text.activations(states, captions) - plain  # (B, V)
    vocab = model.vocab
    for row, words in enumerate([["dog", "runs", "grass"], ["two", "dogs"]]):
        expected = torch.zeros(vocab.size)
        expected[[d for w in words for d in vocab.word_dims(w)]] = 2.0
        assert expected.sum() > 0, "the tiny vocabulary should know some of these words"
        torch.testing.assert_close(added[row], expected)
    for stop in ("a", "on", "the"):  # stop words are never added
        assert not vocab.word_dims(stop) or added[0, vocab.word_dims(stop)].abs().max() == 0
    encoded = model.encode_text(captions).text_weights  # the same sum, from the captions alone
    with torch.no_grad():
        features = model.text.forward_features(captions)
        by_hand = torch.nn.functional.normalize(
            lexical_activation(model.text.logits(features)) + added, dim=-1
        )
    torch.testing.assert_close(encoded, by_hand, atol=1e-5, rtol=1e-4)


def test_input_words_need_the_captions_of_cached_features():
    model = _model("model.text.use_lora=false", "model.text.input_words_weight=1.0")
    states = torch.randn(2, model.text.codebook.shape[1])
    with pytest.raises(LexVLAError, match="input_words_weight=1.0.*pass the 2 captions"):
        model.text.activations(states)
    with pytest.raises(LexVLAError, match="encoder='bow'"):
        _model(
            "model.text.use_lora=false",
            "model.text.encoder=bow",
            "model.text.input_words_weight=1.0",
        )
