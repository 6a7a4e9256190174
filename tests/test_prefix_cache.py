"""Prefix-cached text encoding equals the uncached path (padding, gradients, weight updates)."""

from __future__ import annotations

import pytest
import torch

from lexvla import create_model
from lexvla.config import FEW_SHOT_PROMPT

CAPTIONS = [
    "A dog catches a frisbee in the park.",
    "two red buses",
    "a man riding a wave on top of a surfboard while people watch from the beach",
    "cat",
]


def _both_paths(model, captions):
    model.text.cfg.prefix_cache = True
    cached = model.text.forward_features(captions)
    model.text.cfg.prefix_cache = False
    full = model.text.forward_features(captions)
    model.text.cfg.prefix_cache = True
    return cached, full


@pytest.mark.parametrize("prompt", ["zero-shot", "few-shot"])
def test_cached_equals_uncached_with_padding(prompt):
    overrides = [] if prompt == "zero-shot" else [f"text.prompt={FEW_SHOT_PROMPT}"]
    model = create_model("tiny", overrides=overrides).eval()
    prefix = model.text._prefix_ids()
    assert prefix is not None and len(prefix) > 3
    assert model.text.tokenize(CAPTIONS).attention_mask.sum(1).unique().numel() > 1  # really padded
    with torch.no_grad():
        cached, full = _both_paths(model, CAPTIONS)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_prefix_cache_follows_weight_updates_and_gradients(fresh_tiny_model):
    model = fresh_tiny_model.eval()
    with torch.no_grad():
        before = model.text.forward_features(CAPTIONS[:2])
        for name, param in model.text.llm.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)  # an "optimizer step" on LoRA
        cached, full = _both_paths(model, CAPTIONS[:2])
    assert not torch.allclose(before, full)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    # With gradients: the prefix is recomputed in the graph, so LoRA gets the same gradients.
    grads = []
    for use_cache in (True, False):
        model.zero_grad()
        model.text.cfg.prefix_cache = use_cache
        model.text(model.text.forward_features(CAPTIONS)).sum().backward()
        grads.append(
            {n: p.grad.clone() for n, p in model.text.llm.named_parameters() if p.requires_grad}
        )
    model.text.cfg.prefix_cache = True
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.assets
@pytest.mark.parametrize("prompt", ["zero-shot", "few-shot"])
def test_cached_equals_uncached_on_smollm2(small_offline_model, prompt):
    model = small_offline_model
    original = model.text.cfg.prompt
    if prompt == "few-shot":
        model.text.cfg.prompt = FEW_SHOT_PROMPT
        model.text._prefix_token_ids = None
    try:
        with torch.no_grad():
            cached, full = _both_paths(model, CAPTIONS)
            cached_w, full_w = model.text(cached, CAPTIONS), model.text(full, CAPTIONS)
    finally:
        model.text.cfg.prompt = original
        model.text._prefix_token_ids = None
    torch.testing.assert_close(cached_w, full_w, rtol=1e-4, atol=1e-4)


def test_grad_checkpointing_falls_back_to_the_uncached_forward():
    # transformers runs checkpointed blocks without a KV cache: the prefix cache must step aside
    # (it crashed in `_prefix_kv`, and a dropped prefix would silently change the features).
    model = create_model("tiny", overrides=["text.lora_dropout=0"]).train()
    model.set_grad_checkpointing(True)
    grads, features = [], []
    for use_cache in (True, False):
        model.zero_grad()
        model.text.cfg.prefix_cache = use_cache
        out = model.text.forward_features(CAPTIONS)
        model.text(out).sum().backward()
        features.append(out.detach())
        grads.append(
            {n: p.grad.clone() for n, p in model.text.llm.named_parameters() if p.requires_grad}
        )
    assert grads[0]
    torch.testing.assert_close(features[0], features[1], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    model.set_grad_checkpointing(False)
    with torch.no_grad():  # no checkpointing without gradients: the cached path runs again
        model.text.cfg.prefix_cache = True
        cached = model.text.forward_features(CAPTIONS)
    torch.testing.assert_close(cached, features[1], rtol=1e-5, atol=1e-5)
