"""Retrieval and segmentation metrics: pure functions on score matrices and label maps.

Retrieval (Recall@K, the image-text retrieval protocol of Karpathy & Fei-Fei 2015 used by CLIP, VDR and
LexVLA on Flickr30K / COCO): each image has one or more captions.

- text → image: a text query is correct at K when its own image is among the K best images.
- image → text: an image query is correct at K when *any* of its captions is among the K best texts.

**Ties are pessimistic**: a candidate with exactly the correct item's score counts as ranked ahead of
it. So a degenerate model that gives every pair the same score gets R@K = 0 (not a lucky 100), and the
result never depends on the order of the candidates. The rank of the correct item is

    text t with image g:          rank = #{images i ≠ g : s[i, t] >= s[g, t]}
    image i with captions C_i:    rank = #{texts t ∉ C_i : s[i, t] >= max_{c ∈ C_i} s[i, c]}

and the query is correct at K when `rank < K`. Images without any caption are not image queries.
NaN scores are not supported (a NaN positive never counts as retrieved).

Segmentation (PatchDis, docs/method.md): a confusion matrix accumulated over a dataset, IoU per class
`TP / (TP + FP + FN)` and mIoU over the classes that occur (in the ground truth or the prediction).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lexvla.config import RECALL_KS

logger = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray


def _as_tensor(x: ArrayLike | Sequence[int]) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def text_to_image_ranks(
    scores: ArrayLike, text_to_image: ArrayLike, chunk_size: int = 1024
) -> Tensor:
    """Pessimistic 0-based rank of each text's image among all images.

    Args:
        scores: (N_images, N_texts) similarity of every image with every text.
        text_to_image: (N_texts,) index of each text's image.
        chunk_size: texts processed at once; temporaries are (N_images, chunk_size).

    Returns:
        (N_texts,) int64 ranks.
    """
    scores = _as_tensor(scores)
    owner = _as_tensor(text_to_image).long().to(scores.device)
    n_texts = scores.shape[1]
    ranks = torch.empty(n_texts, dtype=torch.long)
    for start in range(0, n_texts, chunk_size):
        block = scores[:, start : start + chunk_size]  # (N_i, c)
        cols = torch.arange(block.shape[1], device=block.device)
        positive = block[owner[start : start + chunk_size], cols]  # (c,)
        ahead = (block >= positive[None, :]).sum(dim=0) - 1  # (c,): minus the image itself
        ranks[start : start + block.shape[1]] = ahead.cpu()
    return ranks


def image_to_text_ranks(
    scores: ArrayLike, text_to_image: ArrayLike, chunk_size: int = 1024
) -> Tensor:
    """Pessimistic 0-based rank of each image's best-ranked caption among all texts.

    Args:
        scores: (N_images, N_texts) similarity of every image with every text.
        text_to_image: (N_texts,) index of each text's image.
        chunk_size: images processed at once; temporaries are (chunk_size, N_texts).

    Returns:
        (N_images,) int64 ranks; -1 for images without any caption.
    """
    scores = _as_tensor(scores)
    owner = _as_tensor(text_to_image).long().to(scores.device)
    n_images = scores.shape[0]
    ranks = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk_size):
        block = scores[start : start + chunk_size]  # (c, N_t)
        image_ids = torch.arange(start, start + block.shape[0], device=block.device)
        is_caption = owner[None, :] == image_ids[:, None]  # (c, N_t)
        low = torch.full_like(block, -math.inf)
        best = torch.where(is_caption, block, low).max(dim=1).values  # (c,)
        ahead = ((block >= best[:, None]) & ~is_caption).sum(dim=1)  # (c,)
        ahead[~is_caption.any(dim=1)] = -1
        ranks[start : start + block.shape[0]] = ahead.cpu()
    return ranks


def retrieval_recall(
    scores: ArrayLike,
    text_to_image: ArrayLike,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K in both directions, in percent, with pessimistic ties (see the module docstring).

    Args:
        scores: (N_images, N_texts) similarities (higher is better).
        text_to_image: (N_texts,) index of each text's image; an image may have several texts.
        ks: the K values.
        chunk_size: rows/columns processed at once, to bound memory on large evaluations.

    Returns:
        `{"image_to_text/R@K": %, ..., "text_to_image/R@K": %, ...}` for every K in `ks`.
    """
    scores = _as_tensor(scores)
    owner = _as_tensor(text_to_image)
    if scores.dim() != 2 or owner.shape != (scores.shape[1],):
        raise ValueError(
            f"expected scores (N_images, N_texts) and text_to_image (N_texts,), got "
            f"{tuple(scores.shape)} and {tuple(owner.shape)}"
        )
    if owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= scores.shape[0]):
        raise ValueError("text_to_image holds an image index outside [0, N_images)")
    i2t = image_to_text_ranks(scores, owner, chunk_size)
    i2t = i2t[i2t >= 0]
    if len(i2t) < scores.shape[0]:
        logger.warning("%d images have no caption: not used as queries", scores.shape[0] - len(i2t))
    t2i = text_to_image_ranks(scores, owner, chunk_size)
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            hits = (ranks < k).double().mean().item() if len(ranks) else math.nan
            out[f"{name}/R@{k}"] = 100.0 * hits
    return out


def confusion_matrix(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Pixel confusion matrix: `conf[g, p]` = number of pixels of true class g predicted as p.

    Args:
        pred: predicted class per pixel, any shape, values in [0, num_classes).
        target: ground-truth class per pixel, same shape; `ignore_index` pixels (VOC's 255 "void"
            boundaries) are left out.
        num_classes: C, including the background class if the dataset has one.
        ignore_index: label of pixels to skip.

    Returns:
        (C, C) int64 matrix; rows are ground truth, columns predictions. Sum them over images to
        get dataset-level IoU.
    """
    pred, target = _as_tensor(pred).long(), _as_tensor(target).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"pred holds a class outside [0, {num_classes})")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target holds a class outside [0, {num_classes}) other than {ignore_index}"
        )
    flat = target * num_classes + pred
    counts = torch.bincount(flat.cpu(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(conf: ArrayLike) -> Tensor:
    """IoU of each class, `TP / (TP + FP + FN)` from a (C, C) confusion matrix -> (C,) float64.

    NaN for a class absent from both ground truth and prediction (0 / 0).
    """
    conf = _as_tensor(conf).double()
    tp = conf.diagonal()
    union = conf.sum(dim=0) + conf.sum(dim=1) - tp  # predicted + true - overlap
    iou = torch.full_like(tp, math.nan)
    present = union > 0
    iou[present] = tp[present] / union[present]
    return iou


def mean_iou(conf: ArrayLike) -> float:
    """Mean IoU over the classes that occur in the ground truth or the prediction (PASCAL VOC mIoU).

    A class absent from both has no defined IoU and is excluded; a class that is predicted but never
    true (or true but never predicted) counts with IoU 0. NaN when no pixel was counted.
    """
    iou = iou_per_class(conf)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if present.any() else math.nan
