"""`model.vision.inference_dtype`: bf16 autocast for the backbone and adapter when encoding images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lexvla.errors import LexVLAError
from lexvla.models.lexvla import LexVLA
from lexvla.presets import get_preset


def _model(inference_dtype: str):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, vision=dataclasses.replace(cfg.model.vision, inference_dtype=inference_dtype)
        ),
    )
    return LexVLA(cfg.model).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))


def test_float32_is_the_reference_and_bf16_stays_close(pixels):
    exact, reduced = _model("float32"), _model("bfloat16")
    with torch.no_grad():
        reference = exact.encode_image(pixels).image_weights  # (B, V)
        fast = reduced.encode_image(pixels).image_weights
        features = exact.encode_image_features(pixels)  # (B, P, Dv), float32
    assert fast.dtype == torch.float32 and not torch.equal(fast, reference)  # bf16 did run
    assert torch.allclose(fast.norm(dim=-1), torch.ones(len(fast)), atol=1e-5)
    assert (fast - reference).abs().max() < 0.02
    # The pool ran in float32 on the autocast adapter output: recomputing it exactly gives the same.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = reduced.vision.forward_adapter(features)  # bf16 under autocast
    assert hidden.dtype == torch.bfloat16
    with torch.no_grad():
        exact_pool = reduced.vision.pooled_logits(hidden.float())
        under_autocast = reduced.vision.pooled_logits(hidden)
    torch.testing.assert_close(under_autocast, exact_pool, rtol=0, atol=0)


def test_training_ignores_the_inference_dtype(pixels):
    exact, reduced = _model("float32"), _model("bfloat16")
    exact.train(), reduced.train()
    a = exact(pixel_values=pixels)["image_activations"]
    b = reduced(pixel_values=pixels)["image_activations"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # gradients on: no autocast


def test_auto_is_float32_where_bf16_is_not_native(pixels, monkeypatch):
    import lexvla.layers.lexical as lexical

    monkeypatch.setattr(lexical, "native_bf16_matmul", lambda device: False)
    exact, auto = _model("float32"), _model("auto")
    with torch.no_grad():
        torch.testing.assert_close(
            auto.encode_image(pixels).image_weights,
            exact.encode_image(pixels).image_weights,
            rtol=0,
            atol=0,
        )
    monkeypatch.setattr(lexical, "native_bf16_matmul", lambda device: True)
    with torch.no_grad():
        assert not torch.equal(
            auto.encode_image(pixels).image_weights, exact.encode_image(pixels).image_weights
        )


def test_an_unknown_inference_dtype_is_refused():
    with pytest.raises(LexVLAError, match="model.vision.inference_dtype"):
        _model("int4")


def test_encode_corpus_takes_the_image_dtype(tmp_path):
    """The same corpus in float32 and bf16: same documents, each image's words nearly the same."""
    from helpers.search import make_images
    from lexvla.index import iter_shards
    from lexvla.search import encode_corpus

    make_images(tmp_path / "images", 6)
    model = _model("float32")
    encode_corpus(model, tmp_path / "images", tmp_path / "f32", batch_size=4, progress=False)
    encode_corpus(
        model,
        tmp_path / "images",
        tmp_path / "bf16",
        batch_size=4,
        progress=False,
        image_dtype="bfloat16",
    )
    assert model.cfg.vision.inference_dtype == model.vision.cfg.inference_dtype == "bfloat16"
    (exact,), (fast,) = list(iter_shards(tmp_path / "f32")), list(iter_shards(tmp_path / "bf16"))
    assert exact.metadata == fast.metadata and len(exact.metadata) == 6
    assert not np.array_equal(exact.values, fast.values)  # bf16 did run
    for row in range(6):
        a = set(exact.indices[exact.indptr[row] : exact.indptr[row + 1]].tolist())
        b = set(fast.indices[fast.indptr[row] : fast.indptr[row + 1]].tolist())
        assert len(a & b) >= 0.9 * len(a)
    with pytest.raises(LexVLAError, match="model.vision.inference_dtype"):
        model.set_image_inference_dtype("fp8")
