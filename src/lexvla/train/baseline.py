"""The dense baseline: what the same frozen features, data and steps give without the vocabulary.

A lexical model squeezes image and text through one word vocabulary so that a person can read every
score. The price of that bottleneck is measured against the plain alternative trained on exactly the same
inputs: CLIP-style linear projections of the frozen features (mean-pooled DINOv2 patch tokens; the
LLM's last-prompt-position state) into a shared 512-d space, L2-normalised, trained with the same
symmetric InfoNCE (learnt temperature), batches, steps, optimiser and schedule as the lexical run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lexvla.config import ExperimentConfig
from lexvla.eval.retrieval import Encodings, retrieval_metrics
from lexvla.losses import info_nce
from lexvla.train.batches import BatchSource
from lexvla.train.optim import create_optimizer, create_scheduler


class DenseBaseline(nn.Module):
    """Linear projections of frozen image and text features into one dense space.

    Args:
        image_width: width of the frozen image patch features (Dv).
        text_width: width of the frozen text features (D).
        dim: the shared space (512, CLIP ViT-B's width).
        logit_scale_init: initial inverse temperature (CLIP's 1/0.07).
    """

    def __init__(
        self, image_width: int, text_width: int, dim: int = 512, logit_scale_init: float = 1 / 0.07
    ) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_width, dim)
        self.text_proj = nn.Linear(text_width, dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(logit_scale_init)))

    def encode_image(self, features: Tensor) -> Tensor:
        """(B, P, Dv) frozen patch features -> (B, dim) unit vectors (mean over patches)."""
        return F.normalize(self.image_proj(features.float().mean(dim=1)), dim=-1)

    def encode_text(self, features: Tensor) -> Tensor:
        """(B, D) frozen text features -> (B, dim) unit vectors."""
        return F.normalize(self.text_proj(features.float()), dim=-1)


def fit_dense_baseline(
    cfg: ExperimentConfig, batches: BatchSource, *, max_scale: float = 100.0
) -> DenseBaseline:
    """Train the baseline on the batches a lexical run with `cfg` sees (`batches` must serve
    precomputed image and text features: :meth:`BatchSource.use_tables`)."""
    first = batches.batch(0)
    if first.image_features is None or first.text_features is None:
        raise ValueError("the dense baseline trains on precomputed features: call use_tables first")
    torch.manual_seed(cfg.train.seed)
    model = DenseBaseline(first.image_features.shape[-1], first.text_features.shape[-1])
    params = dict(model.named_parameters())
    optimizer = create_optimizer(params, cfg.train)
    scheduler = create_scheduler(optimizer, cfg.train)
    for step in range(cfg.train.steps):
        batch = first if step == 0 else batches.batch(step)
        scale = model.logit_scale.exp()
        loss = info_nce(
            model.encode_image(batch.image_features),
            model.encode_text(batch.text_features),
            scale,
            max_scale,
        )
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@torch.no_grad()
def dense_retrieval(
    model: DenseBaseline, image_features: Tensor, text_features: Tensor, text_to_image: Tensor
) -> dict[str, Any]:
    """Recall@1/5/10 of the baseline on frozen validation features (dense, no sparsification)."""
    images = torch.cat(
        [model.encode_image(image_features[i : i + 64]) for i in range(0, len(image_features), 64)]
    )
    texts = model.encode_text(text_features)
    return retrieval_metrics(Encodings(images, texts, text_to_image), "dense")
