"""The dense baseline (linear projections of frozen features, InfoNCE) learns paired features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lexvla.train.baseline import DenseBaseline, dense_retrieval, fit_dense_baseline
from lexvla.train.batches import Batch
from lexvla.train.setup import experiment_config


class _PairedFeatures:
    """Batches of 16 of 64 pairs whose image and text features share a hidden code (plus noise)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        codes = torch.randn(64, 8, generator=g)
        self.images = (codes @ torch.randn(8, 12, generator=g))[:, None, :].repeat(1, 4, 1)
        self.images += 0.1 * torch.randn(64, 4, 12, generator=g)  # (N, P, Dv)
        self.texts = codes @ torch.randn(8, 10, generator=g)  # (N, D)

    def batch(self, step: int) -> Batch:
        rows = torch.arange(16) + 16 * (step % 4)
        keys = [str(i) for i in rows.tolist()]
        return Batch(None, keys, keys, self.images[rows], self.texts[rows])


def test_dense_baseline_encodes_mean_pooled_projections():
    model = DenseBaseline(6, 5, dim=4)
    patches, text = torch.randn(3, 7, 6), torch.randn(3, 5)
    expected = F.normalize(model.image_proj(patches.mean(1)), dim=-1)
    torch.testing.assert_close(model.encode_image(patches), expected)
    torch.testing.assert_close(model.encode_text(text).norm(dim=-1), torch.ones(3))


def test_dense_baseline_learns_the_pairs():
    data = _PairedFeatures()
    cfg = experiment_config("tiny", overrides=["train.steps=200", "train.lr=0.01"])
    model = fit_dense_baseline(cfg, data)
    before = dense_retrieval(DenseBaseline(12, 10), data.images, data.texts, torch.arange(64))[
        "image_to_text/R@1"
    ]
    after = dense_retrieval(model, data.images, data.texts, torch.arange(64))["image_to_text/R@1"]
    assert after > 90.0 and after > before + 50.0, (before, after)
