"""PatchDis: how well single patches' lexical vectors name what they show, as segmentation mIoU.

Protocol (docs/method.md, project defaults marked there):

1. Each class name goes through the **text** branch as the caption of the prompt ("dining table").
2. Each image is resized whole to the square input (`crop=False`, so every pixel maps to a patch) and
   encoded at patch level by the **vision** branch: (P, V), P = g × g patches.
3. Both sides are sparsified like retrieval (by default the model's threshold `1/sqrt(V)`); the score of
   a patch and a class is their dot product.
4. Every patch gets its best class; **background rule** (project default, not in the paper):
   `"relative"` (default): a patch is background (label 0) when its best score is below `threshold`
   times the best patch-class score of its own image (default 0.5: half as good a match as the image's
   best). Scores of sparse models differ in scale from image to image and from model to model; a rule
   relative to each image's own scale compares models fairly. `"absolute"`: background when the best
   score is below `threshold` itself (scores of sparsified, L2-normalised non-negative vectors lie in
   [0, 1]; default 0.1). The sweep (`thresholds=[…]`) reports mIoU per threshold; choosing the
   threshold on the evaluated images themselves is an oracle.
5. The g × g label grid is upsampled to the ORIGINAL mask's resolution by nearest neighbour on pixel
   centres (pixel y of H takes grid row `floor((y + ½)·g / H)`), then compared with the ground truth:
   confusion matrix over the whole dataset, IoU per class and mIoU (`lexvla.eval.metrics`).

Labels: masks hold 0 = background, 1..C = `class_names[1..C]`, 255 = ignore (VOC "void"), so
`class_names[0]` is the background's name and is never encoded. mIoU averages the classes present in the
ground truth or the prediction, background included (PASCAL VOC convention); `mIoU/foreground` leaves
background out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lexvla.data.transforms import grid_side
from lexvla.errors import LexVLAError
from lexvla.eval.metrics import confusion_matrix, iou_per_class, mean_iou
from lexvla.eval.results import format_table
from lexvla.eval.retrieval import (
    OperatingPoint,
    describe_point,
    model_operating_point,
    sparsify_weights,
)

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA

logger = logging.getLogger(__name__)

BACKGROUND_RULES = ("relative", "absolute")
DEFAULT_THRESHOLDS = {"relative": 0.5, "absolute": 0.1}
DEFAULT_THRESHOLD = DEFAULT_THRESHOLDS["absolute"]
IGNORE_INDEX = 255


@dataclass
class SegmentationSample:
    """One image and its semantic mask (H, W): 0 background, 1..C classes, 255 ignore."""

    key: str
    image: Any  # PIL image or path
    mask: np.ndarray  # (H, W) integer labels at the image's original resolution


def background_rule(threshold: float, rule: str = "absolute") -> str:
    """The background rule as printed with every PatchDis number."""
    if rule == "relative":
        return (
            f"background when a patch's best class score (dot product) < {threshold:g} x the best "
            "patch-class score of its image"
        )
    return f"background when a patch's best class score (dot product) < {threshold:g}"


# ------------------------------------------------------------------------------ core (tensors)
def patchdis_scores(patch_weights: Tensor, class_weights: Tensor) -> Tensor:
    """Dot product of every patch with every class: (B, P, V), (C, V) -> (B, P, C)."""
    return patch_weights.float() @ class_weights.float().t()


def patchdis_predict(patch_weights: Tensor, class_weights: Tensor, threshold: float) -> Tensor:
    """Best class per patch with the background rule.

    Args:
        patch_weights: (B, P, V) patch lexical vectors (already sparsified).
        class_weights: (C, V) class-name lexical vectors, row c for label c + 1.
        threshold: a patch whose best score is below it is background.

    Returns:
        (B, P) int64 labels: 0 = background, c + 1 = class row c (ties: the lowest class).
    """
    return labels_from_scores(patchdis_scores(patch_weights, class_weights), threshold)


def labels_from_scores(scores: Tensor, threshold: float, rule: str = "absolute") -> Tensor:
    """(B, P, C) patch-class scores -> (B, P) labels with the background rule (0 = background).

    `rule="relative"`: the cut is `threshold` times each image's best patch-class score.
    """
    if rule not in BACKGROUND_RULES:
        raise LexVLAError(f"unknown background rule {rule!r}: use one of {BACKGROUND_RULES}")
    best, index = scores.max(dim=-1)  # (B, P), (B, P)
    cut = torch.full_like(best, threshold)
    if rule == "relative":
        cut = threshold * best.max(dim=-1, keepdim=True).values  # (B, 1)
    return torch.where(best < cut, torch.zeros_like(index), index + 1)


def upsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of a label grid to (H, W) on pixel centres.

    Args:
        labels: (g_h, g_w) grid, or (P,) for a square grid.
        size: (H, W) of the original mask.

    Returns:
        (H, W) labels; pixel (y, x) takes grid cell (floor((y+½)·g_h/H), floor((x+½)·g_w/W)).
    """
    if labels.dim() == 1:
        side = grid_side(labels.numel())
        labels = labels.reshape(side, side)
    (gh, gw), (h, w) = labels.shape, size
    rows = ((2 * torch.arange(h) + 1) * gh) // (2 * h)  # (H,)
    cols = ((2 * torch.arange(w) + 1) * gw) // (2 * w)  # (W,)
    return labels[rows.to(labels.device)[:, None], cols.to(labels.device)[None, :]]


def patchdis_confusion(
    labels: Tensor, masks: Sequence[np.ndarray | Tensor], num_classes: int
) -> Tensor:
    """Confusion matrix (C+1, C+1) of (B, P) patch labels against B masks at their own resolution."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for grid, mask in zip(labels, masks):
        mask = torch.as_tensor(np.asarray(mask)).long()
        pred = upsample_labels(grid.cpu(), (mask.shape[0], mask.shape[1]))
        conf += confusion_matrix(pred, mask, num_classes, ignore_index=IGNORE_INDEX)
    return conf


def summarize_confusion(
    conf: Tensor, class_names: Sequence[str], threshold: float, background: str = "absolute"
) -> dict[str, Any]:
    """mIoU (background included), foreground mIoU, pixel accuracy and IoU per class name."""
    iou = iou_per_class(conf)
    total = int(conf.sum())
    return {
        "mIoU": mean_iou(conf),
        "mIoU/foreground": _mean_present(iou[1:]),
        "pixel_accuracy": float(conf.diagonal().sum()) / total if total else math.nan,
        "per_class_iou": {
            name: (None if math.isnan(v) else v) for name, v in zip(class_names, iou.tolist())
        },
        "threshold": threshold,
        "background": background,
        "rule": background_rule(threshold, background),
        "pixels": total,
    }


def _mean_present(iou: Tensor) -> float:
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if present.any() else math.nan


# ------------------------------------------------------------------------------ samples
def _as_sample(item: Any, index: int) -> SegmentationSample:
    if isinstance(item, SegmentationSample):
        return item
    if hasattr(item, "mask"):  # a dataset sample; `.image` is not decoded here when `.path` exists
        key = getattr(item, "key", None) or str(getattr(item, "path", None) or index)
        path = getattr(item, "path", None) or None
        image = path if path is not None and Path(str(path)).is_file() else item.image
        return SegmentationSample(str(key), image, np.asarray(item.mask))
    if isinstance(item, Sequence) and len(item) in (2, 3) and not isinstance(item, str):
        image, mask = item[0], item[1]
        key = (
            item[2]
            if len(item) == 3
            else (str(image) if isinstance(image, str | Path) else str(index))
        )
        return SegmentationSample(str(key), image, np.asarray(mask))
    raise LexVLAError(
        f"PatchDis item {index} is a {type(item).__name__}: give samples with .image and .mask, "
        "or (image, mask) pairs"
    )


def _check_mask(sample: SegmentationSample, num_classes: int) -> None:
    mask = sample.mask
    if mask.ndim != 2:
        raise LexVLAError(f"mask of {sample.key} has shape {mask.shape}: expected (H, W) labels")
    bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(num_classes), IGNORE_INDEX])
    if bad.size:
        raise LexVLAError(
            f"mask of {sample.key} holds labels {bad[:5].tolist()} outside 0..{num_classes - 1} "
            f"and {IGNORE_INDEX}: give one class name per label (class_names[0] = background)"
        )


# ------------------------------------------------------------------------------ model level
@torch.no_grad()  # not inference_mode: model caches must stay usable in training
def encode_class_names(model: Any, class_names: Sequence[str], batch_size: int = 32) -> Tensor:
    """Each foreground class name as the caption in the text prompt: names[1:] -> (C, V) dense."""
    names = list(class_names[1:])
    if not names:
        raise LexVLAError("PatchDis needs at least one class besides background")
    chunks = [
        model.encode_text(names[i : i + batch_size]).text_weights.float().cpu()
        for i in range(0, len(names), batch_size)
    ]
    return torch.cat(chunks)


def evaluate_patchdis(
    model: Any,
    samples: Iterable[Any],
    class_names: Sequence[str],
    *,
    threshold: float | None = None,
    thresholds: Sequence[float] = (),
    sparsify: OperatingPoint | None = None,
    batch_size: int = 4,
    out_dir: str | Path | None = None,
    progress: bool = True,
    limit: int | None = None,
    background: str = "relative",
) -> dict[str, Any]:
    """PatchDis mIoU of `model` on images with semantic masks (protocol in the module docstring).

    Args:
        model: a LexVLA model (`encode_image(..., return_patches=True, crop=False)`, `encode_text`).
        samples: items with `.image` and `.mask` ((H, W) labels), or (image, mask) pairs.
        class_names: the name of every mask label; `class_names[0]` is background (not encoded).
        threshold: background rule threshold; None = the rule's default (:data:`DEFAULT_THRESHOLDS`).
        thresholds: extra thresholds to sweep in the same pass (reported under `"sweep"`).
        sparsify: operating point of both sides (as retrieval); None = the model's default.
        batch_size: images encoded at once ((B, P, V) floats are held: keep it small).
        out_dir: write one overlay PNG per image there (prediction | ground truth).
        progress: show a progress bar.
        limit: evaluate only the first `limit` samples.
        background: the background rule, "relative" (to each image's best score) or "absolute".

    Returns:
        `{"mIoU", "mIoU/foreground", "pixel_accuracy", "per_class_iou": {name: IoU}, "threshold",
        "rule", "num_images", "grid", "sparsify", "sweep": [{"threshold", "mIoU", ...}], "overlays"}`.
    """
    from tqdm.auto import tqdm

    if background not in BACKGROUND_RULES:
        raise LexVLAError(f"unknown background rule {background!r}: use one of {BACKGROUND_RULES}")
    threshold = DEFAULT_THRESHOLDS[background] if threshold is None else float(threshold)
    point, sparse_threshold = model_operating_point(model, sparsify)
    class_weights = sparsify_weights(
        encode_class_names(model, class_names), point, sparse_threshold
    )
    all_thresholds = list(dict.fromkeys([threshold, *map(float, thresholds)]))
    n = len(class_names)
    confs = {t: torch.zeros(n, n, dtype=torch.long) for t in all_thresholds}
    items = [_as_sample(item, i) for i, item in enumerate(_take(samples, limit))]
    overlays: list[str] = []
    grid = 0
    for start in tqdm(
        range(0, len(items), batch_size), desc="PatchDis", disable=not progress, leave=False
    ):
        batch = items[start : start + batch_size]
        for sample in batch:
            _check_mask(sample, n)
        scores = _batch_scores(model, batch, class_weights, point, sparse_threshold)  # (B, P, C)
        grid = grid_side(scores.shape[1])
        for t in all_thresholds:
            labels = labels_from_scores(scores, t, background)  # (B, P)
            confs[t] += patchdis_confusion(labels, [s.mask for s in batch], n)
            if out_dir is not None and t == threshold:
                overlays += [
                    str(write_overlay(s, g, class_names, out_dir)) for s, g in zip(batch, labels)
                ]
    result = summarize_confusion(confs[threshold], class_names, threshold, background)
    result.update(
        num_images=len(items),
        grid=grid,
        sparsify=describe_point(point, sparse_threshold, class_weights.shape[-1]),
        sweep=[{"threshold": t, **_sweep_entry(confs[t])} for t in all_thresholds],
    )
    if out_dir is not None:
        result["overlays"] = overlays
    return result


def _take(samples: Iterable[Any], limit: int | None) -> Iterable[Any]:
    for i, item in enumerate(samples):
        if limit is not None and i >= limit:
            return
        yield item


@torch.no_grad()  # not inference_mode: model caches must stay usable in training
def _batch_scores(
    model: Any,
    batch: Sequence[SegmentationSample],
    class_weights: Tensor,
    point: OperatingPoint,
    sparse_threshold: float,
) -> Tensor:
    """Patch-class scores of a batch of images: (B, P, C)."""
    enc = model.encode_image([s.image for s in batch], return_patches=True, crop=False)
    patches = sparsify_weights(
        enc.patch_weights.float().cpu(), point, sparse_threshold
    )  # (B, P, V)
    return patchdis_scores(patches, class_weights)


def _sweep_entry(conf: Tensor) -> dict[str, float]:
    iou = iou_per_class(conf)
    return {"mIoU": mean_iou(conf), "mIoU/foreground": _mean_present(iou[1:])}


def patchdis_table(result: dict[str, Any], top: int = 10) -> str:
    """A printable summary: the rule, mIoU, and the best and worst classes."""
    present = [(k, v) for k, v in result["per_class_iou"].items() if v is not None]
    present.sort(key=lambda kv: -kv[1])
    shown = present[:top] + (present[-top:] if len(present) > 2 * top else present[top:])
    table = format_table([[name, 100.0 * v] for name, v in shown], ["class", "IoU %"])
    lines = [
        f"PatchDis on {result['num_images']} images ({result['grid']}x{result['grid']} patches; "
        f"vectors sparsified at {result['sparsify']}); {result['rule']}",
        f"mIoU {100 * result['mIoU']:.2f}%  foreground mIoU {100 * result['mIoU/foreground']:.2f}%  "
        f"pixel accuracy {100 * result['pixel_accuracy']:.2f}%",
        table,
    ]
    if len(result.get("sweep", [])) > 1:
        sweep = ", ".join(f"{s['threshold']:g}: {100 * s['mIoU']:.2f}" for s in result["sweep"])
        lines.append(f"mIoU % by threshold: {sweep}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ overlays
def palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map: (num_classes, 3) uint8, label 0 black."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for label in range(num_classes):
        value, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[label] = (r, g, b)
    return colours


def colourize(
    labels: np.ndarray, image: Image.Image, num_classes: int, alpha: float = 0.55
) -> Image.Image:
    """Blend a label map (H, W) over an RGB image of the same size; ignore pixels stay as the image."""
    colours = palette(max(num_classes, IGNORE_INDEX + 1))
    colours[IGNORE_INDEX] = (255, 255, 255)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = colours[labels].astype(np.float32)
    weight = np.where(labels[..., None] == IGNORE_INDEX, 0.0, alpha)
    return Image.fromarray((base * (1 - weight) + tint * weight).astype(np.uint8))


def write_overlay(
    sample: SegmentationSample, labels: Tensor, class_names: Sequence[str], out_dir: str | Path
) -> Path:
    """Save `<key>.png`: predicted labels (left) and ground truth (right) over the image, with a legend."""
    from PIL import ImageDraw

    from lexvla.data.transforms import load_image

    mask = np.asarray(sample.mask).astype(np.int64)
    image = load_image(sample.image).resize((mask.shape[1], mask.shape[0]))
    pred = upsample_labels(labels.cpu(), mask.shape).numpy()
    n = len(class_names)
    left, right = colourize(pred, image, n), colourize(mask, image, n)
    shown = [
        int(v) for v in np.unique(np.concatenate([pred.ravel(), mask.ravel()])) if v != IGNORE_INDEX
    ]
    width = 2 * mask.shape[1] + 8
    per_row = max(1, width // 150)  # legend in columns of 150 px
    legend_h = 14 * (-(-len(shown) // per_row) + 1) + 6
    canvas = Image.new("RGB", (width, mask.shape[0] + legend_h), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (mask.shape[1] + 8, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, mask.shape[0] + 3), "prediction (left) | ground truth (right)", fill="black")
    colours = palette(n)
    for position, label in enumerate(shown):
        x, y = 4 + 150 * (position % per_row), mask.shape[0] + 17 + 14 * (position // per_row)
        draw.rectangle((x, y + 1, x + 10, y + 11), fill=tuple(int(c) for c in colours[label]))
        draw.text((x + 16, y), class_names[label] if label < n else str(label), fill="black")
    path = Path(out_dir) / f"{_safe_name(sample.key)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _safe_name(key: str) -> str:
    stem = Path(key).stem if ("/" in key or "." in key) else key
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "image"


# ------------------------------------------------------------------------------ CLI entry points
def load_patchdis_data(
    data: str | Path, *, images: str | Path | None = None, split: str = "val"
) -> tuple[Any, list[str]]:
    """Images with semantic masks and their class names, from a path.

    Args:
        data: COCO `instances_*.json`, a PASCAL VOC folder (holding `SegmentationClass/`), or
            `synthetic[:N]` (the procedural dataset's shape masks).
        images: image folder of the COCO file (default: beside `annotations/`).
        split: VOC image list `ImageSets/Segmentation/<split>.txt`.

    Returns:
        (dataset of samples with `.image`/`.path` and `.mask`, class names with [0] = "background").
    """
    from lexvla.data import masks

    text = str(data)
    if text == "synthetic" or text.startswith("synthetic:"):
        from lexvla.data.datasets import synthetic_size
        from lexvla.data.synthetic import SyntheticDataset

        dataset: Any = SyntheticDataset(synthetic_size(text, 64))
    elif Path(text).is_dir():
        dataset = masks.VocMasks(text, split=split)
    elif Path(text).suffix.lower() == ".json":
        dataset = masks.CocoInstanceMasks(text, images)
    else:
        raise LexVLAError(
            f"PatchDis data {text!r}: give COCO instances_*.json, a VOC folder with "
            "SegmentationClass/, or synthetic:N"
        )
    return dataset, list(dataset.class_names)


def run_patchdis(
    model: LexVLA,
    data: str | Path,
    *,
    images: str | Path | None = None,
    split: str = "val",
    limit: int | None = None,
    threshold: float | None = None,
    thresholds: Sequence[float] = (),
    sparsify: OperatingPoint | None = None,
    batch_size: int = 4,
    overlays: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    background: str = "relative",
    model_ref: str | None = None,
) -> dict[str, Any]:
    """`lexvla eval patchdis`: evaluate `model` on mask data, write overlays and the JSON report.

    `overlays` is the folder for the per-image PNGs; `model_ref` the model's name for the report.
    Print the result with :func:`patchdis_table`.
    """
    from lexvla.eval.runs import write_result

    dataset, class_names = load_patchdis_data(data, images=images, split=split)
    result = evaluate_patchdis(
        model,
        dataset,
        class_names,
        threshold=threshold,
        thresholds=thresholds,
        sparsify=sparsify,
        batch_size=batch_size,
        out_dir=overlays,
        progress=progress,
        limit=limit,
        background=background,
    )
    data_info = {"path": str(data), "images": str(images) if images else None, "limit": limit}
    settings = {
        "threshold": result["threshold"],
        "rule": result["rule"],
        "sparsify": result["sparsify"],
        "crop": False,
        "upsampling": "nearest on pixel centres",
        "batch_size": batch_size,
    }
    data_info["classes"] = len(class_names)
    write_result(out, result, model, model_ref=model_ref, data=data_info, settings=settings)
    return result
