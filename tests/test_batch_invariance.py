"""A caption encoded alone gets exactly the bits it gets inside any batch (float32 inference path):
what lets `lexvla serve` batch concurrent queries and still answer each one as if it came alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lexvla import create_model
from lexvla.layers.invariant import rowwise, tiled_linear
from lexvla.layers.lexical import lexical_activation
from lexvla.models.text_inference import InferenceProducts

CAPTIONS = [
    "A dog catches a frisbee in the park.",
    "two red buses",
    "a man riding a wave on top of a surfboard while people watch from the beach at sunset",
    "cat",
    "a plate of food on a table",
]


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_tiled_linear_is_the_linear_map(rows):
    weight, bias = torch.randn(70, 24), torch.randn(70)
    x = torch.randn(rows, 24)
    torch.testing.assert_close(tiled_linear(x, weight, bias, tile=16), x @ weight.T + bias)
    assert tiled_linear(torch.randn(2, rows, 24), weight).shape == (2, rows, 70)


def test_tiled_linear_rows_do_not_depend_on_their_batch():
    weight = (
        torch.randn(2049, 576) * 0.05
    )  # a wide codebook-like product, where BLAS picks by shape
    row = torch.randn(1, 576)
    alone = tiled_linear(row, weight)
    for batch in (2, 5, 16, 33):
        x = torch.randn(batch, 576)
        x[batch // 2] = row
        assert torch.equal(tiled_linear(x, weight)[batch // 2], alone[0])
    with pytest.raises(ValueError, match="tile"):
        tiled_linear(row, weight, tile=0)


def test_inference_products_are_the_linear_map_row_independent_and_follow_weight_updates():
    products = InferenceProducts()
    weight, bias = torch.randn(2049, 64) * 0.1, torch.randn(2049)
    x = torch.randn(9, 64)
    torch.testing.assert_close(products(x, weight, bias), F.linear(x, weight, bias))
    batched = products(x, weight, bias)
    assert all(torch.equal(products(x[i : i + 1], weight, bias)[0], batched[i]) for i in range(9))
    with torch.no_grad():
        weight.mul_(2.0)  # an in-place update (optimizer step, load_state_dict) repacks
    torch.testing.assert_close(products(x, weight, bias), F.linear(x, weight, bias))
    products.clear()
    torch.testing.assert_close(products(x, weight), F.linear(x, weight))


def test_rowwise_is_the_function_and_row_independent():
    logits = torch.randn(6, 21223) * 3  # an odd width: the last words fall in the scalar tail
    torch.testing.assert_close(rowwise(lexical_activation, logits), lexical_activation(logits))
    alone = rowwise(lexical_activation, logits[5:6])
    assert torch.equal(rowwise(lexical_activation, logits)[5], alone[0])
    assert torch.equal(rowwise(F.gelu, logits[:1]), F.gelu(logits[:1]))


def _alone_and_batched(model, captions):
    with torch.no_grad():
        alone = torch.cat([model.encode_text([c]).text_weights for c in captions])
        pairs = torch.cat(
            [
                model.encode_text(captions[i : i + 2]).text_weights
                for i in range(0, len(captions), 2)
            ]
        )
        batched = model.encode_text(captions).text_weights
    return alone, pairs, batched


@pytest.mark.parametrize("threads", [1, 2])
def test_tiny_text_encoding_is_batch_invariant(threads):
    model = create_model("tiny", overrides=["text.use_lora=false", "text.head=mlp"]).eval()
    with torch.no_grad():  # a trained-looking head, so its products matter
        for p in model.text.head.parameters():
            p.normal_(0, 0.05)
    assert model.text.tokenize(CAPTIONS).attention_mask.sum(1).unique().numel() > 2  # padded
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone, pairs, batched = _alone_and_batched(model, CAPTIONS)
    finally:
        torch.set_num_threads(previous)
    assert model.text._packed  # the packed path ran
    assert torch.equal(alone, batched) and torch.equal(alone, pairs)


@pytest.mark.assets
def test_smollm2_text_encoding_is_batch_invariant(small_offline_model, coco_mini):
    path = coco_mini / "annotations" / "captions_train2017.json"
    annotations = sorted(json.loads(path.read_text())["annotations"], key=lambda a: a["id"])
    captions = [a["caption"].strip() for a in annotations[:24]] + ["dog", "a red bus"]
    alone, pairs, batched = _alone_and_batched(small_offline_model, captions)
    assert torch.equal(alone, batched), int((alone != batched).any(1).sum())
    assert torch.equal(alone, pairs)
