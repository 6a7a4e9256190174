"""A briefly trained `tiny` model and its optimiser state, for the checkpoint and full-disk tests."""

from __future__ import annotations

import torch

from lexvla import LexVLA
from lexvla.train.optim import create_optimizer, create_scheduler
from lexvla.train.setup import experiment_config


def trained_tiny(
    steps: int = 2,
) -> tuple[LexVLA, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A `tiny` model, its AdamW and schedule after `steps` updates with random gradients."""
    cfg = experiment_config("tiny", overrides=["train.steps=10"])
    torch.manual_seed(0)
    model = LexVLA(cfg.model)
    optimizer = create_optimizer(model.trainable_parameters(), cfg.train)
    scheduler = create_scheduler(optimizer, cfg.train)
    for _ in range(steps):
        for p in model.trainable_parameters().values():
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def optimizer_state(model: LexVLA, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Copies of the optimiser state, named `<parameter>::<state key>`."""
    return {f"{name}::{key}": value.clone() for name, p in model.trainable_parameters().items()
            for key, value in optimizer.state.get(p, {}).items()}  # fmt: skip
