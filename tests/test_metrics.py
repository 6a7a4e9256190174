"""Retrieval recall and segmentation IoU against python-loop references and hand-computed masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lexvla.eval.metrics import (
    confusion_matrix,
    image_to_text_ranks,
    iou_per_class,
    mean_iou,
    retrieval_recall,
    text_to_image_ranks,
)


def _naive_recall(scores: list[list[float]], owner: list[int], ks) -> dict[str, float]:
    """Sort candidates by score; on ties the correct item goes last (pessimistic)."""
    n_images, n_texts = len(scores), len(owner)
    out = {}
    i2t_ranks = []
    for i in range(n_images):
        if i not in owner:
            continue
        order = sorted(range(n_texts), key=lambda t, i=i: (-scores[i][t], owner[t] == i))
        i2t_ranks.append(next(pos for pos, t in enumerate(order) if owner[t] == i))
    t2i_ranks = []
    for t in range(n_texts):
        order = sorted(range(n_images), key=lambda i, t=t: (-scores[i][t], i == owner[t]))
        t2i_ranks.append(order.index(owner[t]))
    for name, ranks in (("image_to_text", i2t_ranks), ("text_to_image", t2i_ranks)):
        for k in ks:
            out[f"{name}/R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    return out


def _random_case(n_images: int, captions: int, seed: int, levels: int | None = None):
    """Scores (n_images, n_texts) and text owners; `levels` quantises scores to force many ties."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_images), captions)
    rng.shuffle(owner)
    scores = rng.normal(size=(n_images, len(owner)))
    scores += 1.5 * (np.arange(n_images)[:, None] == owner[None, :])  # positives score higher
    if levels is not None:
        scores = np.round(scores * levels) / levels
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(owner)


@pytest.mark.parametrize(
    ("n_images", "captions", "levels", "chunk"),
    [(12, 1, None, 5), (10, 5, None, 7), (9, 3, 1, 4), (15, 2, 2, 1000), (6, 4, 0, 3)],
)
def test_recall_matches_loop_reference(n_images, captions, levels, chunk):
    # levels=0 makes every score 0: all ties, so pessimistic R@K is 0 unless K > all negatives.
    quantise = levels or None
    scores, owner = _random_case(n_images, captions, seed=n_images + captions, levels=quantise)
    if levels == 0:
        scores = torch.zeros_like(scores)
    ks = (1, 5, 10)
    got = retrieval_recall(scores, owner, ks, chunk_size=chunk)
    want = _naive_recall(scores.tolist(), owner.tolist(), ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_chunking_does_not_change_ranks():
    scores, owner = _random_case(40, 5, seed=7, levels=3)
    for chunk in (1, 3, 64, 10_000):
        assert torch.equal(
            text_to_image_ranks(scores, owner, chunk), text_to_image_ranks(scores, owner)
        )
        assert torch.equal(
            image_to_text_ranks(scores, owner, chunk), image_to_text_ranks(scores, owner)
        )


def test_hand_computed_example():
    # 2 images; texts 0,1 belong to image 0, text 2 to image 1.
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.3]])
    owner = torch.tensor([0, 0, 1])
    # image 0: best caption 0.9, no negative ahead -> rank 0. image 1: caption 0.3 ties with text 1
    # (a negative) -> pessimistic rank 1. text 0: 0.9 vs 0.2 -> 0; text 1: 0.1 vs 0.3 -> 1;
    # text 2: 0.3 vs 0.5 -> 1.
    assert image_to_text_ranks(scores, owner).tolist() == [0, 1]
    assert text_to_image_ranks(scores, owner).tolist() == [0, 1, 1]
    got = retrieval_recall(scores, owner, ks=(1, 2))
    assert got == {
        "image_to_text/R@1": 50.0,
        "image_to_text/R@2": 100.0,
        "text_to_image/R@1": pytest.approx(100 / 3),
        "text_to_image/R@2": 100.0,
    }


def test_images_without_captions_are_not_queries():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    owner = torch.tensor([0, 1])  # image 2 has no caption
    assert image_to_text_ranks(scores, owner).tolist() == [0, 0, -1]
    assert retrieval_recall(scores, owner, ks=(1,))["image_to_text/R@1"] == 100.0


def test_numpy_inputs_and_bad_shapes():
    scores, owner = _random_case(5, 2, seed=1)
    assert retrieval_recall(scores.numpy(), owner.numpy()) == retrieval_recall(scores, owner)
    with pytest.raises(ValueError, match="N_texts"):
        retrieval_recall(scores, owner[:-1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(scores, torch.full_like(owner, 5))


def _naive_confusion(pred, target, c, ignore):
    conf = [[0] * c for _ in range(c)]
    for p, g in zip(np.ravel(pred), np.ravel(target)):
        if g != ignore:
            conf[g][p] += 1
    return conf


def test_confusion_matrix_matches_loop():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(7, 9))
    target[rng.random((7, 9)) < 0.2] = 255
    pred = rng.integers(0, 4, size=(7, 9))
    conf = confusion_matrix(torch.tensor(pred), torch.tensor(target), 4)
    assert conf.tolist() == _naive_confusion(pred, target, 4, 255)
    assert conf.sum() == (target != 255).sum()


def test_iou_and_miou_hand_computed():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 3], [2, 2, 3, 3]])
    conf = confusion_matrix(pred, target, num_classes=5)
    # class 0: TP 3, FP 1 (pixel (1,2)), FN 1 (pixel (0,1)) -> 3/5
    # class 1: TP 2, FP 1 (pixel (0,1)), FN 1 (pixel (1,2)) -> 2/4
    # class 2: TP 2, FN 2 -> 2/4; class 3: predicted twice (void pixel ignored), never true -> 0/2
    # class 4: absent from both -> NaN, excluded from the mean
    iou = iou_per_class(conf)
    torch.testing.assert_close(iou[:4], torch.tensor([0.6, 0.5, 0.5, 0.0], dtype=torch.float64))
    assert math.isnan(iou[4])
    assert mean_iou(conf) == pytest.approx((0.6 + 0.5 + 0.5 + 0.0) / 4)


def test_miou_perfect_and_empty():
    mask = torch.tensor([[1, 1], [0, 2]])
    assert mean_iou(confusion_matrix(mask, mask, 3)) == 1.0
    assert math.isnan(mean_iou(torch.zeros(3, 3, dtype=torch.long)))


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
