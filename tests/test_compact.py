"""`compact_model`: the image codebook as its start plus a truncated-SVD change, saved in float16."""

from __future__ import annotations

import pytest
import torch

from lexvla.config import apply_overrides
from lexvla.errors import LexVLAError
from lexvla.models.compact import compact_model, low_rank
from lexvla.models.lexvla import LexVLA
from lexvla.presets import get_preset

HEADS = ["model.lexical.logit_affine=true", "model.text.use_lora=false", "model.text.head=mlp"]


def _trained_model(change_rank: int) -> LexVLA:
    """A tiny model whose codebook moved by an exact rank-`change_rank` change, other parts perturbed."""
    torch.manual_seed(0)
    model = LexVLA(apply_overrides(get_preset("tiny"), HEADS).model).eval()
    V, D = model.vision.codebook.shape
    with torch.no_grad():
        model.vision.codebook.add_(0.3 * torch.randn(V, change_rank) @ torch.randn(change_rank, D))
        for name, param in model.trainable_parameters().items():
            if name != "vision.codebook":
                param.add_(0.05 * torch.randn_like(param))
    return model


def test_low_rank_is_the_truncated_svd():
    delta = torch.randn(30, 8)
    u, w = low_rank(delta, 3)
    assert u.shape == (30, 3) and w.shape == (3, 8)
    singular = torch.linalg.svdvals(delta)
    # Eckart-Young: the error of the best rank-3 approximation is the norm of the other singular values.
    torch.testing.assert_close((delta - u @ w).norm(), singular[3:].norm(), rtol=1e-5, atol=1e-5)
    u_full, w_full = low_rank(delta, 8)
    torch.testing.assert_close(u_full @ w_full, delta, rtol=1e-5, atol=1e-5)


def test_compact_model_encodes_like_the_full_one_and_round_trips_in_float16(tmp_path):
    model = _trained_model(change_rank=3)
    compact, report = compact_model(model, rank=3)
    assert report["relative_error"] < 1e-5 and report["relative_change"] > 0
    names = set(compact.trainable_parameters())
    assert {"vision.codebook_u", "vision.codebook_w"} <= names and "vision.codebook" not in names
    torch.testing.assert_close(
        compact.vision.codebook_weight(), model.vision.codebook, rtol=1e-5, atol=1e-5
    )
    features = torch.randn(2, 16, model.vision.backbone.config.hidden_size)
    states = torch.randn(3, model.text.codebook.shape[1])
    with torch.no_grad():
        full = model(image_features=features, text_features=states)
        small = compact(image_features=features, text_features=states)
    for key in ("image_weights", "text_weights"):
        torch.testing.assert_close(small[key], full[key], rtol=1e-4, atol=1e-5)

    folder = compact.save_pretrained(tmp_path / "head", dtype=torch.float16)
    loaded = LexVLA.from_pretrained(folder).eval()
    with torch.no_grad():
        reloaded = loaded(image_features=features, text_features=states)
    for key in ("image_weights", "text_weights"):  # float16 storage: close, not equal
        torch.testing.assert_close(reloaded[key], full[key], rtol=2e-2, atol=2e-3)


def test_a_lower_rank_keeps_the_largest_part_of_the_change():
    model = _trained_model(change_rank=6)
    _, report_2 = compact_model(model, rank=2)
    _, report_6 = compact_model(model, rank=6)
    assert 0 < report_6["relative_error"] < 1e-5 < report_2["relative_error"] < 1


def test_compacting_a_compact_model_is_refused():
    compact, _ = compact_model(_trained_model(change_rank=2), rank=2)
    with pytest.raises(LexVLAError, match="already low-rank"):
        compact_model(compact, rank=2)
