"""Sparsity curve: one encoding, monotone active words, skipped k > V, quadratic axis, plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.eval.retrieval import Encodings
from lexvla.eval.sparsity import (
    plot_sparsity_curve,
    point_labels,
    quadratic_sparsity,
    sparsity_curve,
    sparsity_curve_from_encodings,
    sparsity_table,
)


def _encodings(n_images=8, captions=2, vocab=300, seed=0) -> Encodings:
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.rand(n_images, vocab, generator=gen) ** 4, dim=-1)
    owner = torch.arange(n_images).repeat_interleave(captions)
    texts = torch.nn.functional.normalize(
        images[owner] + 0.3 * torch.rand(len(owner), vocab, generator=gen), dim=-1
    )
    return Encodings(images, texts, owner)


def test_curve_points_monotone_and_skipped():
    enc = _encodings()
    points = ("threshold", 1000, 256, 128, 64, 16, 4, "dense")
    curve = sparsity_curve_from_encodings(enc, points)
    assert curve["skipped"] == [1000]
    labels = [p["point"] for p in curve["points"]]
    assert labels == ["threshold", 256, 128, 64, 16, 4, "dense"]
    topk = [p for p in curve["points"] if isinstance(p["point"], int)]
    for p in topk:
        assert p["active_words"]["image"] == p["point"] == p["active_words"]["text"]
    words = [p["active_words"]["image"] for p in topk]
    assert words == sorted(words, reverse=True)
    energy = [p["energy_kept"]["image"] for p in topk]
    assert energy == sorted(energy, reverse=True)
    dense = curve["points"][-1]
    assert dense["quadratic_sparsity"]["mean"] == 0.0 and dense["energy_kept"][
        "text"
    ] == pytest.approx(1.0)
    assert dense["image_to_text/R@1"] == dense["cosine"]["image_to_text/R@1"]  # normalised: same
    assert quadratic_sparsity(75, 300) == pytest.approx(0.5625)
    assert "top-64" in sparsity_table(curve) and "1000" in sparsity_table(curve)


def test_plot_is_not_blank(tmp_path):
    curve = sparsity_curve_from_encodings(_encodings(), ("threshold", 128, 32, 8, "dense"))
    path = plot_sparsity_curve(curve, tmp_path / "curve.png")
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.std() > 5


def test_point_labels_merge_crowded_points_and_keep_the_threshold():
    def point(name, words):
        return {"point": name, "active_words": {"mean": words}}

    # x positions as in a real curve: dense at 0, a spread point, then a crowd near 1.
    points = [point("dense", 0), point(8192, 8192), point("threshold", 220), point(1024, 1024),
              point(512, 512), point(300, 300), point(64, 64)]  # fmt: skip
    xs = [0.0, 0.38, 0.97, 0.90, 0.95, 0.97, 0.99]
    order = sorted(range(len(xs)), key=xs.__getitem__)
    xs, points = [xs[i] for i in order], [points[i] for i in order]
    ys = [90.0, 91.0, 92.0, 93.0, 94.0, 95.0, 96.0]
    labels = point_labels(xs, ys, points)
    tags = [tag for _, _, tag, _ in labels]
    assert tags == ["dense", "8192", "thr (220)", "1024–64"]  # 0.90 → 0.99 in steps < 0.06: one run
    crowd = labels[3]
    assert crowd[0] == pytest.approx((0.90 + 0.95 + 0.97 + 0.99) / 4) and crowd[1] == 96.0
    assert labels[2][3] is True and sum(below for *_, below in labels) == 1
    drawn = sorted(x for x, _, _, below in labels if not below)
    assert all(b - a >= 0.06 for a, b in zip(drawn, drawn[1:]))  # no two labels above share a spot


def test_tiny_model_curve_encodes_once(tiny_model, tmp_path, monkeypatch):
    images = [Image.new("RGB", (30, 20), (50 * i, 80, 200 - 40 * i)) for i in range(4)]
    pairs = [(im, [f"photo {i}", f"image {i}"]) for i, im in enumerate(images)]
    calls = []
    original = tiny_model.encode_image

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "encode_image", counting)
    curve = sparsity_curve(
        tiny_model, pairs, batch_size=8, progress=False, plot_path=tmp_path / "c.png"
    )
    assert len(calls) == 1
    vocab = tiny_model.vocab_size
    assert curve["vocab_size"] == vocab
    assert curve["skipped"] == [k for k in (13000, 8192, 4096) if k > vocab]
    assert (tmp_path / "c.png").is_file()
