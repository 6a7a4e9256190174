"""The LexVLA model on the `tiny` preset: shapes, invariants, gradients, save/load, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lexvla import LexVLA, create_model
from lexvla.errors import LexVLAError

CAPTIONS = ["A dog catches a frisbee in the park.", "two red buses on a city street"]


def _image(mode: str = "RGB", size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
    return rgb.convert(mode)


def test_tiny_builds_deterministically():
    a, b = create_model("tiny"), create_model("tiny")
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_encode_shapes_and_invariants(tiny_model):
    with torch.no_grad():
        image = tiny_model.encode_image([_image(), _image()], return_patches=True)
        text = tiny_model.encode_text(CAPTIONS)
    V = tiny_model.vocab_size
    P = (tiny_model.cfg.vision.image_size // 14) ** 2
    assert image.image_weights.shape == (2, V) and text.text_weights.shape == (2, V)
    assert image.patch_weights.shape == (2, P, V)
    for weights in (image.image_weights, text.text_weights, image.patch_weights):
        assert (weights > 0).all()
        torch.testing.assert_close(weights.norm(dim=-1), torch.ones(weights.shape[:-1]))


def test_image_weights_are_the_max_pool_of_patch_logits(tiny_model):
    with torch.no_grad():
        features = tiny_model.encode_image_features([_image()])
        hidden = tiny_model.vision.forward_adapter(features)
        expected = torch.nn.functional.normalize(
            torch.nn.functional.elu((hidden @ tiny_model.vision.codebook.t()).max(1).values) + 1,
            dim=-1,
        )
        got = tiny_model.encode_image(None, features=features).image_weights
    torch.testing.assert_close(got, expected)


def test_codebooks_start_from_centred_lm_head_rows(tiny_model):
    head = tiny_model.text.llm.get_base_model().get_output_embeddings().weight.detach()
    rows = head[list(tiny_model.vocab.token_ids)]
    centred = rows - rows.mean(0, keepdim=True)
    torch.testing.assert_close(tiny_model.text.codebook, centred)
    torch.testing.assert_close(tiny_model.vision.codebook, centred)  # untrained: equal at init
    assert not tiny_model.text.codebook.requires_grad and tiny_model.vision.codebook.requires_grad


def test_uncentred_codebooks_are_a_switch():
    model = create_model("tiny", overrides=["lexical.center_codebooks=false"])
    head = model.text.llm.get_base_model().get_output_embeddings().weight.detach()
    torch.testing.assert_close(model.text.codebook, head[list(model.vocab.token_ids)])


def test_only_adapter_image_codebook_lora_and_scale_get_gradients(fresh_tiny_model):
    model = fresh_tiny_model.train()
    pixels = model.preprocess([_image(), _image("L")])
    out = model(pixel_values=pixels, texts=CAPTIONS)
    loss = (
        (out["logit_scale"] * out["image_weights"] @ out["text_weights"].t()).logsumexp(-1).mean()
    )
    loss.backward()
    trainable = model.trainable_parameters()
    assert {n for n in trainable if "lora_" in n}, "LoRA parameters must be trainable"
    for name, param in model.named_parameters():
        if name in trainable:
            if "lora_A" in name:
                continue  # zero by construction at step 0 (B = 0)
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    counts = model.num_trainable()
    assert "other" not in counts and counts["total"] == sum(p.numel() for p in trainable.values())


def test_save_and_load_reproduce_outputs_bit_for_bit(tmp_path, fresh_tiny_model):
    model = fresh_tiny_model
    with torch.no_grad():  # simulate training: move every trained tensor
        for param in model.trainable_parameters().values():
            param.add_(torch.randn_like(param) * 0.01)
    model.eval()
    path = model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "README.md",
    }
    loaded = LexVLA.from_pretrained(path).eval()
    with torch.no_grad():
        pixels = model.preprocess([_image()])
        assert torch.equal(
            model.encode_image(pixels).image_weights, loaded.encode_image(pixels).image_weights
        )
        assert torch.equal(
            model.encode_text(CAPTIONS).text_weights, loaded.encode_text(CAPTIONS).text_weights
        )
    assert torch.equal(create_model(path).scale(), model.scale())


def test_checkpoint_of_another_architecture_is_refused(tmp_path, fresh_tiny_model):
    path = fresh_tiny_model.save_pretrained(tmp_path / "ckpt")
    other = create_model("tiny", overrides=["vision.adapter_mlp_ratio=2.0"])
    from lexvla.models.serialization import load_trained_weights

    with pytest.raises(LexVLAError, match="shape"):
        load_trained_weights(other.trainable_parameters(), path / "model.safetensors")
    no_lora = create_model("tiny", overrides=["text.use_lora=false"])
    with pytest.raises(LexVLAError, match="another architecture"):
        load_trained_weights(no_lora.trainable_parameters(), path / "model.safetensors")
    (path / "model.safetensors").write_bytes(b"\x80\x04garbage pickle")
    with pytest.raises(LexVLAError, match="safetensors"):
        LexVLA.from_pretrained(path)
    with pytest.raises(LexVLAError, match="not a LexVLA checkpoint"):
        LexVLA.from_pretrained(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1"])
def test_non_rgb_images_are_converted(tiny_model, mode):
    with torch.no_grad():
        weights = tiny_model.encode_image([_image(mode)]).image_weights
    assert weights.shape == (1, tiny_model.vocab_size) and torch.isfinite(weights).all()


def test_bad_images_give_clear_errors(tiny_model, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    buf = io.BytesIO()
    _image().save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for path, match in [
        (tmp_path / "missing.jpg", "not found"),
        (empty, "empty"),
        (text, "cannot decode"),
        (truncated, "cannot decode"),
    ]:
        with pytest.raises(LexVLAError, match=match):
            tiny_model.encode_image([path])


def test_captions_empty_is_an_error_long_is_truncated(tiny_model):
    with pytest.raises(LexVLAError, match="caption 1 is empty"):
        tiny_model.encode_text(["a dog", "   \t "])
    long = " ".join(["dog"] * 5000)
    prompt_ids = tiny_model.text.tokenize([long]).input_ids
    short_ids = tiny_model.text.tokenize(["dog"]).input_ids
    max_tokens = tiny_model.cfg.text.max_caption_tokens
    assert prompt_ids.shape[1] == short_ids.shape[1] - 1 + max_tokens
    with torch.no_grad():
        assert torch.isfinite(tiny_model.encode_text([long, "x\x00y\u200b 猫"]).text_weights).all()


def test_padding_does_not_change_a_caption_encoding(tiny_model):
    with torch.no_grad():
        alone = tiny_model.encode_text(["a dog"]).text_weights
        batched = tiny_model.encode_text(
            ["a dog", "a very long caption about many red buses and cats"]
        )
    torch.testing.assert_close(batched.text_weights[0], alone[0], rtol=1e-5, atol=1e-6)


def test_unknown_model_reference():
    with pytest.raises(LexVLAError, match="unknown model"):
        create_model("no-such-preset")


def test_top_words_and_sparse_form(tiny_model):
    with torch.no_grad():
        weights = tiny_model.encode_text(CAPTIONS).text_weights
    words = tiny_model.top_words(weights, 5)
    assert len(words) == 2 and len(words[0]) == 5
    assert words[0][0][1] == pytest.approx(weights[0].max().item())
    sparse = tiny_model.to_sparse(weights, mode="topk")
    assert (
        sparse.indptr.diff() == tiny_model.cfg.lexical.top_k
    ).all() or tiny_model.vocab_size < 512


def test_top_words_can_merge_continuation_pieces(tiny_model):
    from lexvla.vocab import LexicalVocabulary

    vocab = LexicalVocabulary(
        (1, 2, 3, 4, 5), ("dogs", "##dog", "cat", "dog", "boxes"), "pieces", 6
    )
    groups, words = vocab.word_groups()
    # forms of one word merge and show as the word; "boxes" has no "box" in the vocabulary
    assert groups == [0, 0, 1, 0, 2] and words == ["dog", "cat", "boxes"]
    weights = torch.rand(2, tiny_model.vocab_size)
    merged = tiny_model.top_words(weights, 3, merge_pieces=True)
    groups, words = tiny_model.vocab.word_groups()
    for row, top in zip(weights, merged):  # naive reference: sum each word's forms, sort
        totals: dict[str, float] = {}
        for index, value in enumerate(row.tolist()):
            totals[words[groups[index]]] = totals.get(words[groups[index]], 0.0) + value
        expected = sorted(totals.items(), key=lambda kv: -kv[1])[:3]
        assert [w for w, _ in top] == [w for w, _ in expected]
        assert [v for _, v in top] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_forward_activations_normalise_to_the_weights(tiny_model):
    """The training forward's activations are elu+1 values (> 0) whose L2 normalisation is exactly
    the weights, and the weights equal those of encode_image / encode_text."""
    with torch.no_grad():
        pixels = tiny_model.preprocess([_image(), _image("L")])
        out = tiny_model(pixel_values=pixels, texts=CAPTIONS[:2])
        encoded_image = tiny_model.encode_image(pixels).image_weights
        encoded_text = tiny_model.encode_text(CAPTIONS[:2]).text_weights
    for side, encoded in (("image", encoded_image), ("text", encoded_text)):
        activations = out[f"{side}_activations"]
        assert bool((activations > 0).all())
        torch.testing.assert_close(F.normalize(activations, dim=-1), out[f"{side}_weights"])
        torch.testing.assert_close(out[f"{side}_weights"], encoded, atol=1e-5, rtol=1e-4)
