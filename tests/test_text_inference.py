"""The packed inference path of the text tower equals the transformers forward (padding, prefix,
weight updates), and steps aside where it does not apply (training, gradients, LoRA)."""

from __future__ import annotations

import json

import pytest
import torch

from lexvla import create_model
from lexvla.config import FEW_SHOT_PROMPT
from lexvla.models.text_inference import PackedLinear

CAPTIONS = [
    "A dog catches a frisbee in the park.",
    "two red buses",
    "a man riding a wave on top of a surfboard while people watch from the beach",
    "cat",
]


def _features(model, captions, weights: str) -> torch.Tensor:
    model.text.cfg.inference_weights = weights
    try:
        with torch.no_grad():
            return model.text.forward_features(captions)
    finally:
        model.text.cfg.inference_weights = "float32"


@pytest.fixture
def frozen_tiny():
    """The tiny model without LoRA (a plain Llama decoder: the packed path applies)."""
    return create_model("tiny", overrides=["text.use_lora=false"]).eval()


def test_packed_linear_is_the_linear_map():
    weight, bias, x = torch.randn(40, 24), torch.randn(40), torch.randn(3, 5, 24)
    reference = x @ weight.T + bias
    torch.testing.assert_close(PackedLinear(weight, bias, torch.float32)(x), reference)
    bf16 = PackedLinear(weight, bias, torch.bfloat16)(x)
    assert bf16.dtype == torch.float32 and bf16.shape == reference.shape
    torch.testing.assert_close(bf16, reference, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("prompt", ["zero-shot", "few-shot"])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_packed_float32_equals_the_transformers_forward(prompt, prefix_cache):
    overrides = ["text.use_lora=false", f"text.prefix_cache={str(prefix_cache).lower()}"]
    if prompt == "few-shot":
        overrides.append(f"text.prompt={FEW_SHOT_PROMPT}")
    model = create_model("tiny", overrides=overrides).eval()
    assert model.text.tokenize(CAPTIONS).attention_mask.sum(1).unique().numel() > 1  # padded
    reference = _features(model, CAPTIONS, "transformers")
    packed = _features(model, CAPTIONS, "float32")
    assert model.text._packed  # the packed path really ran
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    # one caption alone gives its row of the batch
    torch.testing.assert_close(_features(model, CAPTIONS[2:3], "float32"), packed[2:3])


def test_packed_bfloat16_is_close_to_float32(frozen_tiny):
    reference = _features(frozen_tiny, CAPTIONS, "transformers")
    bf16 = _features(frozen_tiny, CAPTIONS, "bfloat16")
    assert torch.bfloat16 in {p.dtype for p in frozen_tiny.text._packed.values()}
    assert not torch.equal(bf16, reference)
    cosine = torch.nn.functional.cosine_similarity(bf16, reference, dim=-1)
    assert float(cosine.min()) > 0.99


def test_packed_weights_follow_weight_updates(frozen_tiny):
    before = _features(frozen_tiny, CAPTIONS[:2], "float32")
    _features(frozen_tiny, CAPTIONS[:2], "bfloat16")
    assert len(frozen_tiny.text._packed) == 2  # one copy per dtype: switching paths does not repack
    with torch.no_grad():
        frozen_tiny.text.llm.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    after = _features(frozen_tiny, CAPTIONS[:2], "float32")
    assert not torch.allclose(before, after)
    assert len(frozen_tiny.text._packed) == 1  # the copies of the old weights are gone
    torch.testing.assert_close(after, _features(frozen_tiny, CAPTIONS[:2], "transformers"))


def test_a_fused_optimizer_step_between_two_validations_is_seen():
    """Fused AdamW updates parameters without bumping their version counters, so the packed head
    products made at one validation must not survive into the next (they did: the trainer's later
    validations scored captions with the text head of its first one)."""
    model = create_model("tiny", overrides=["text.use_lora=false", "text.head=mlp"]).eval()
    features = torch.randn(3, model.text.codebook.shape[1])  # (B, D) last-position states
    with torch.no_grad():
        model.text.logits(features)  # packs the head and codebook products
    model.train()
    head = list(model.text.head.parameters())
    versions = [p._version for p in head]
    for p in head:
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(head, lr=0.1, fused=True).step()
    assert [p._version for p in head] == versions  # what makes the version key blind here
    model.eval()
    with torch.no_grad():
        served = model.text.logits(features)  # (B, V)
        with torch.enable_grad():
            reference = model.text.logits(features).detach()
    torch.testing.assert_close(served, reference, rtol=1e-5, atol=1e-5)


def test_training_gradients_and_lora_use_the_transformers_forward(frozen_tiny, tiny_model):
    text = frozen_tiny.text
    assert text._inference_path()
    text.train()
    assert not text._inference_path()  # training mode: the reference path
    text.eval()
    assert not tiny_model.text._packable  # LoRA-wrapped projections are not packed
    lora = create_model("tiny").eval()
    out = lora.text.forward_features(CAPTIONS[:2])  # gradients to LoRA: the reference path
    assert out.requires_grad and not lora.text._packed


# ------------------------------------------------------------------------------ the real model
def _captions(coco_mini, n: int) -> list[str]:
    path = coco_mini / "annotations" / "captions_train2017.json"
    annotations = sorted(json.loads(path.read_text())["annotations"], key=lambda a: a["id"])
    return [a["caption"].strip() for a in annotations[:n]]


def _same_top_words(a: torch.Tensor, b: torch.Tensor, k: int = 20) -> torch.Tensor:
    """(B,) whether each row's k heaviest words are the same set in a and b."""
    return torch.tensor(
        [set(x.tolist()) == set(y.tolist()) for x, y in zip(a.topk(k).indices, b.topk(k).indices)]
    )


@pytest.mark.assets
def test_packed_paths_on_smollm2(small_offline_model, coco_mini):
    model, captions = small_offline_model, _captions(coco_mini, 50)

    def weights(choice: str) -> torch.Tensor:
        model.text.cfg.inference_weights = choice
        try:
            with torch.no_grad():
                return model.encode_text(captions).text_weights  # one padded batch
        finally:
            model.text.cfg.inference_weights = "float32"

    reference, fp32, bf16 = weights("transformers"), weights("float32"), weights("bfloat16")
    # float32: the same vectors within float rounding, so the same top-20 words for every caption
    torch.testing.assert_close(fp32, reference, rtol=0, atol=1e-6)
    assert bool(_same_top_words(fp32, reference).all())
    # bfloat16: every weight within 1e-2 (in fact ~1e-3); near-tied top words may swap places
    assert float((bf16 - reference).abs().max()) < 1e-2
    overlap = [
        len(set(x.tolist()) & set(y.tolist())) / 20
        for x, y in zip(bf16.topk(20).indices, reference.topk(20).indices)
    ]
    assert sum(overlap) / len(overlap) > 0.95


def test_packed_decoder_without_onednn_runs_plain_products(monkeypatch):
    """Off oneDNN (a GPU, or a CPU build without it) the blocks run `F.linear` with the activation,
    gating and residual sums as separate operations: the same features as the transformers forward."""
    model = create_model("tiny", overrides=["text.use_lora=false"]).eval()
    reference = _features(model, CAPTIONS, "transformers")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    plain = _features(model, CAPTIONS, "float32")
    decoder = model.text._packed[(torch.float32, torch.device("cpu"))]
    assert not decoder.blocks[0].products.fused  # the plain products really ran
    torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-5)
