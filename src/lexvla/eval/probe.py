"""A dense-feature linear probe at patch level: the upper reference for PatchDis (tensors in and out).

PatchDis asks a model's *lexical* patch vectors to name what each patch shows, with no training on
masks. A linear classifier trained on the frozen backbone's patch features with mask supervision
shows how much of the segmentation the features hold at all: a reference from above, not a rival
method. Its predictions are (B, P) patch labels, scored exactly like PatchDis
(:func:`lexvla.eval.patchdis.patchdis_confusion`).

Patch labels for training: each patch takes the majority label of the mask pixels it covers (the image
resized whole to the square input, as PatchDis does); a patch whose pixels are mostly "ignore" (255) is
left out of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lexvla.data.transforms import grid_side
from lexvla.errors import LexVLAError

IGNORE_INDEX = 255


def patch_labels(mask: np.ndarray | Tensor, grid: int, num_classes: int) -> Tensor:
    """Majority label of each cell of a g × g grid over an (H, W) mask -> (g*g,) int64.

    Pixels labelled 255 do not vote; a cell where they are the majority gets 255.
    """
    labels = torch.as_tensor(np.asarray(mask)).long()  # (H, W)
    ignore = labels == IGNORE_INDEX
    one_hot = F.one_hot(labels.masked_fill(ignore, num_classes), num_classes + 1)  # (H, W, C+1)
    shares = F.adaptive_avg_pool2d(one_hot.permute(2, 0, 1).float()[None], grid)[0]  # (C+1, g, g)
    best = shares.argmax(0).flatten()  # (g*g,)
    return torch.where(best == num_classes, torch.full_like(best, IGNORE_INDEX), best)


@dataclass
class LinearProbe:
    """`labels = argmax(features · weight + bias)` over (C) classes, with feature standardisation."""

    weight: Tensor  # (D, C)
    bias: Tensor  # (C,)
    mean: Tensor  # (D,)
    std: Tensor  # (D,)

    def scores(self, features: Tensor) -> Tensor:
        """(..., D) patch features -> (..., C) class logits."""
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, features: Tensor) -> Tensor:
        """(B, P, D) patch features -> (B, P) int64 labels."""
        return self.scores(features).argmax(-1)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LinearProbe:
    """Full-batch softmax regression of patch labels on patch features.

    Args:
        features: (N, P, D) frozen patch features.
        labels: (N, P) int labels in 0..C-1, or 255 to leave a patch out.
        num_classes: C, background included.
        steps: Adam steps over the whole set (the problem is small and convex).
        lr: Adam learning rate.
        weight_decay: L2 penalty on the weights.
        seed: initialisation seed.
    """
    x = features.reshape(-1, features.shape[-1]).float()  # (N*P, D)
    y = labels.reshape(-1).long()  # (N*P,)
    keep = y != IGNORE_INDEX
    if not bool(keep.any()):
        raise LexVLAError("linear probe: every patch label is 'ignore' (255): check the masks")
    x, y = x[keep], y[keep]
    if int(y.max()) >= num_classes:
        raise LexVLAError(f"linear probe: label {int(y.max())} >= num_classes={num_classes}")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(x.shape[1], num_classes, generator=generator)).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def probe_patch_labels(
    features: Tensor, masks: Sequence[np.ndarray | Tensor], num_classes: int
) -> Tensor:
    """Training labels of a batch: (N, P, D) features and N masks -> (N, P) majority labels."""
    try:
        grid = grid_side(features.shape[1])
    except ValueError as err:
        raise LexVLAError(str(err)) from None
    return torch.stack([patch_labels(m, grid, num_classes) for m in masks])
