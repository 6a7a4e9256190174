"""LoRA on the text LLM through PEFT (the only module that imports peft)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def apply_lora(
    model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: Sequence[str]
) -> nn.Module:
    """Wrap `model` with LoRA adapters on the named linear layers; base weights are frozen.

    LoRA's B matrices start at zero, so the wrapped model computes exactly what the base model does
    until training moves them.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
    return get_peft_model(model, config)
