"""The `paper` preset builds on the meta device without a hub and has the paper's trainable sizes."""

from __future__ import annotations

import pytest
import torch

from lexvla import create_model


@pytest.mark.assets
def test_paper_preset_on_meta_device(llama2_tokenizer_path):
    model = create_model("paper", device="meta")
    assert model.vocab_size == 17182
    counts = model.num_trainable()
    assert counts["image_codebook"] == 17182 * 4096  # ≈ 70.4M
    assert counts["lora"] == 32 * 4 * 20 * (4096 + 4096)  # r=20 on q,k,v,o of 32 layers ≈ 21.0M
    assert 16.5e6 < counts["adapter"] < 17.5e6  # ≈ 17M in the paper
    assert 107e6 < counts["total"] < 109e6  # ≈ 108M in the paper
    assert model.text.codebook.device == torch.device("meta")
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert 6.9e9 < frozen - 17182 * 4096 < 7.1e9  # Llama-2-7B + DINOv2-L (+ frozen text codebook)
