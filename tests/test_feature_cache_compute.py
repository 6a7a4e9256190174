"""`train.feature_cache_compute`: the frozen towers' precision while the trainer caches their features."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lexvla.config import TrainConfig
from lexvla.data.datasets import create_dataset
from lexvla.errors import LexVLAError
from lexvla.models.lexvla import LexVLA
from lexvla.presets import get_preset
from lexvla.train.features import image_feature_table, text_feature_table


@pytest.fixture(scope="module")
def dataset():
    return create_dataset("synthetic:6")


@pytest.fixture
def frozen_model():
    """`tiny` with a frozen LLM (no LoRA): the towers whose features the trainer caches."""
    cfg = get_preset("tiny").model
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, use_lora=False))
    model = LexVLA(cfg).train()
    assert model.text._packable  # the packed path is what "bfloat16" runs for the text
    return model


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_tables_stay_close_to_float32_and_are_kept_apart(frozen_model, dataset, tmp_path):
    model = frozen_model
    exact_images = image_feature_table(
        model, dataset, tmp_path, dtype=torch.float32, progress=False
    )
    exact_texts, offsets = text_feature_table(model, dataset, tmp_path, progress=False)
    fast_images = image_feature_table(
        model, dataset, tmp_path, dtype=torch.float32, compute="bfloat16", progress=False
    )
    fast_texts, fast_offsets = text_feature_table(
        model, dataset, tmp_path, compute="bfloat16", progress=False
    )
    # bf16 did run (a table of its own, not the float32 one read back) and stays close.
    assert not torch.equal(fast_images.features, exact_images.features)
    assert not torch.equal(fast_texts.features, exact_texts.features)
    assert _relative_error(fast_images.features, exact_images.features) < 0.03
    assert _relative_error(fast_texts.features, exact_texts.features) < 0.03
    assert torch.equal(fast_offsets, offsets)
    assert len(list(tmp_path.iterdir())) == 4  # image and text tables, once per precision
    # The text tower is back as it was: training mode, its own setting, no packed copy left.
    assert model.text.training and model.text.cfg.inference_weights == "float32"
    assert model.text._packed == {}


def test_float32_keeps_the_tables_made_before_the_option(frozen_model, dataset, tmp_path):
    model = frozen_model
    text_feature_table(model, dataset, tmp_path, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    text_feature_table(model, dataset, tmp_path, compute="float32", progress=False)
    assert {p.name for p in tmp_path.iterdir()} == names  # same key: read, not recomputed


def test_auto_is_float32_where_bf16_is_not_native(frozen_model, dataset, tmp_path, monkeypatch):
    import lexvla.layers.lexical as lexical

    monkeypatch.setattr(lexical, "native_bf16_matmul", lambda device: False)
    model = frozen_model
    exact = image_feature_table(model, dataset, tmp_path / "a", dtype=torch.float32, progress=False)
    auto = image_feature_table(
        model, dataset, tmp_path / "b", dtype=torch.float32, compute="auto", progress=False
    )
    torch.testing.assert_close(auto.features, exact.features, rtol=0, atol=0)
    # "auto" without native bf16 is float32 itself: it shares the float32 tables.
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        p.name for p in (tmp_path / "b").iterdir()
    }


def test_an_unknown_compute_is_refused(frozen_model, dataset, tmp_path):
    with pytest.raises(LexVLAError, match="train.feature_cache_compute"):
        TrainConfig(feature_cache_compute="int8")
    with pytest.raises(LexVLAError, match="feature cache compute 'int8'"):
        text_feature_table(frozen_model, dataset, tmp_path, compute="int8", progress=False)


def test_caption_rows_stay_in_dataset_order_when_batched_by_length(frozen_model, dataset, tmp_path):
    """The table encodes captions in batches of near-equal prompt length (less padding); row i is
    still caption i: equal to that caption encoded alone."""
    model = frozen_model
    table, offsets = text_feature_table(model, dataset, tmp_path, batch_size=2, progress=False)
    captions = [c for i in range(len(dataset)) for c in dataset[i].captions]
    lengths = model.text.prompt_lengths(captions)
    assert lengths != sorted(lengths)  # dataset order is not length order: the sort does something
    assert len(table.features) == len(captions) == int(offsets[-1])
    with torch.no_grad():
        alone = torch.cat([model.text.forward_features([c]) for c in captions])
    torch.testing.assert_close(table.features, alone, rtol=1e-4, atol=1e-5)
