"""Evaluation of one model for the experiments: retrieval/sparsity curve, false discoveries, PatchDis.

Thin glue over `lexvla.eval`: frozen features are computed once per input and shared by every model
of the same towers (`FeatureStore`), then each model's trained heads run on them. Everything returned is
plain JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lexvla.eval.discovery import false_discoveries
from lexvla.eval.patchdis import (
    DEFAULT_THRESHOLDS,
    labels_from_scores,
    patchdis_confusion,
    summarize_confusion,
)
from lexvla.eval.probe import fit_linear_probe, probe_patch_labels
from lexvla.eval.retrieval import Encodings, RetrievalData, sparsify_weights
from lexvla.eval.sparsity import sparsity_curve_from_encodings
from lexvla.interpret.lexicon import merge_pieces
from lexvla.layers.lexical import default_threshold
from lexvla.models.lexvla import LexVLA
from lexvla.train.features import ImageFeatureCache, TextFeatureCache, module_fingerprint
from lexvla.train.state import feature_cache_root

# Operating points of the sparsity curve: the model's threshold, the whole vocabulary, top-k down to 32.
CURVE_POINTS: tuple[str | int, ...] = (
    "threshold", "dense", 16384, 8192, 4096, 2048, 1024, 512, 300, 128, 70, 32,
)  # fmt: skip
MATCHED_K = (32, 128)  # top-k image words at which the penalty arms are compared (matched sparsity)
PATCHDIS_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3)  # background-rule sweep (0.1 = project default)
# The relative rule's sweep: fractions of each image's best score (0.5 = project default).
PATCHDIS_RELATIVE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
TINY = 1e-30  # "active" = non-zero, for vectors already sparsified by top-k
CLOUD_WORDS = 60


@dataclass
class EvalSet:
    """Held-out captioned images (retrieval, discoveries) and segmentation samples (PatchDis)."""

    name: str
    retrieval: RetrievalData
    truth_per_image: list[list[str]]  # captions (+ exact words when known) of each image
    seg_images: list[Any]  # images (PIL or paths) with masks
    seg_masks: list[Any]  # (H, W) label arrays
    class_names: list[str]  # [0] = background
    probe_images: list[Any]  # training images with masks for the linear probe
    probe_masks: list[Any]


class FeatureStore:
    """Frozen-tower features shared across models: images by (backbone, pixels), texts by LLM."""

    def __init__(self, on_disk: bool) -> None:
        self.on_disk = on_disk
        self.images: dict[str, ImageFeatureCache] = {}
        self.texts: dict[str, TextFeatureCache] = {}

    def image_cache(self, model: LexVLA) -> ImageFeatureCache:
        vision = model.cfg.vision
        preprocessing = [vision.image_size, vision.resize_size, vision.mean, vision.std]
        key = _fingerprint(model.vision.backbone, preprocessing)
        if key not in self.images:
            root = feature_cache_root(Path(".")) if self.on_disk else None
            self.images[key] = ImageFeatureCache(root, key)
        return self.images[key]

    def text_cache(self, model: LexVLA) -> TextFeatureCache:
        key = _fingerprint(model.text.llm, [model.cfg.text.prompt])
        return self.texts.setdefault(key, TextFeatureCache())

    @torch.no_grad()
    def image_features(
        self, model: LexVLA, images: Sequence[Any], *, crop: bool, batch: int = 32
    ) -> Tensor:
        """(N, P, Dv) frozen backbone features of N images."""
        cache = self.image_cache(model)
        compute = model.vision.forward_features
        chunks = [
            cache.get(model.preprocess(list(images[i : i + batch]), crop=crop), compute)
            for i in range(0, len(images), batch)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def text_weights(self, model: LexVLA, captions: Sequence[str], batch: int = 64) -> Tensor:
        """(N, V) dense text vectors (LLM features cached; "bow" bags computed directly)."""
        out = []
        for i in range(0, len(captions), batch):
            chunk = list(captions[i : i + batch])
            if model.cfg.text.encoder == "bow":
                features = model.text.bag_of_words(chunk)
            else:
                features = self.text_cache(model).get(chunk, model.text.forward_features)
            out.append(model.text(features, chunk).float().cpu())
        return torch.cat(out)


def _fingerprint(module: torch.nn.Module, extra: object) -> str:
    """`module_fingerprint`, memoised on the (frozen) module: it reads every weight."""
    memo = module.__dict__.setdefault("_experiment_fingerprints", {})
    key = repr(extra)
    if key not in memo:
        memo[key] = module_fingerprint(module, extra)
    return memo[key]


@torch.no_grad()
def image_weights(model: LexVLA, features: Tensor, batch: int = 32) -> Tensor:
    """(N, P, Dv) features -> (N, V) dense image vectors."""
    return torch.cat(
        [
            model.vision(features[i : i + batch])[0].float().cpu()
            for i in range(0, len(features), batch)
        ]
    )


def evaluate_model(model: LexVLA, data: EvalSet, store: FeatureStore) -> dict[str, Any]:
    """Everything the experiments report about one model on one evaluation set."""
    model.eval()
    features = store.image_features(model, data.retrieval.images, crop=True)
    enc = Encodings(
        image_weights(model, features),
        store.text_weights(model, data.retrieval.captions),
        data.retrieval.text_to_image,
    )
    threshold = default_threshold(model.vocab_size)
    return {
        "vocab_size": model.vocab_size,
        "curve": sparsity_curve_from_encodings(enc, CURVE_POINTS, threshold=threshold),
        "discovery": discoveries(model, enc, data, threshold),
        "patchdis": patchdis(model, data, store),
    }


def discoveries(model: LexVLA, enc: Encodings, data: EvalSet, threshold: float) -> dict[str, Any]:
    """False discoveries and overuse at the threshold and at each matched top-k (image side)."""
    words = model.vocab.words
    texts_truth = [[c] for c in data.retrieval.captions]
    out: dict[str, Any] = {
        "threshold": false_discoveries(
            enc.image_weights,
            enc.text_weights,
            words,
            data.truth_per_image,
            gt_words_per_text=texts_truth,
            threshold=threshold,
        )  # fmt: skip
    }
    for k in MATCHED_K:
        images = sparsify_weights(enc.image_weights, k)  # (N, V), exactly k words each
        result = false_discoveries(images, None, words, data.truth_per_image, threshold=TINY)
        mean_vector = images.mean(0)  # (V,)
        merged = merge_pieces(mean_vector, words)
        result["cloud"] = dict(sorted(merged.items(), key=lambda kv: -kv[1])[:CLOUD_WORDS])
        out[f"top{k}"] = result
    return out


@torch.no_grad()
def class_weights(model: LexVLA, data: EvalSet, store: FeatureStore) -> Tensor:
    """(C, V) sparsified class-name vectors through the text side (names[1:])."""
    dense = store.text_weights(model, data.class_names[1:])
    return sparsify_weights(dense, "threshold", default_threshold(model.vocab_size))


@torch.no_grad()
def patchdis(
    model: LexVLA, data: EvalSet, store: FeatureStore, batch: int = 16, rule: str = "absolute"
) -> dict[str, Any]:
    """PatchDis mIoU with a sweep of the background threshold (0.1 is the reported default);
    `rule` "relative" reads each threshold as a fraction of each image's best patch-class score."""
    classes = class_weights(model, data, store)
    threshold = default_threshold(model.vocab_size)
    n = len(data.class_names)
    sweep = PATCHDIS_RELATIVE_THRESHOLDS if rule == "relative" else PATCHDIS_THRESHOLDS
    confs = {t: torch.zeros(n, n, dtype=torch.long) for t in sweep}
    for start in range(0, len(data.seg_images), batch):
        images = data.seg_images[start : start + batch]
        masks = data.seg_masks[start : start + batch]
        features = store.image_features(model, images, crop=False)
        patches = model.vision(features, return_patches=True)[1].float()  # (B, P, V)
        patches = sparsify_weights(patches, "threshold", threshold)
        scores = patches @ classes.t()  # (B, P, C)
        for t in sweep:
            confs[t] += patchdis_confusion(labels_from_scores(scores, t, rule), masks, n)
    result = summarise_sweep(confs, data.class_names, default=DEFAULT_THRESHOLDS[rule])
    result["rule"] = rule
    return result


def summarise_sweep(
    confs: dict[float, Tensor], class_names: list[str], default: float
) -> dict[str, Any]:
    """The default threshold's summary plus mIoU at every swept threshold and the best of them."""
    result = summarize_confusion(confs[default], class_names, default)
    sweep = {t: summarize_confusion(c, class_names, t)["mIoU"] for t, c in confs.items()}
    best = max(sweep, key=lambda t: sweep[t])
    result["sweep"] = [{"threshold": t, "mIoU": v} for t, v in sweep.items()]
    result["best"] = {"threshold": best, "mIoU": sweep[best]}
    return result


@torch.no_grad()
def linear_probe(model: LexVLA, data: EvalSet, store: FeatureStore) -> dict[str, Any]:
    """The dense patch-level linear probe (upper reference), scored like PatchDis.

    With probe images: fit on them, test on the PatchDis images. Without (coco-mini): 2-fold
    cross-fitting over the PatchDis images (each half predicted by a probe fit on the other half).
    """
    n = len(data.class_names)
    test_features = store.image_features(model, data.seg_images, crop=False)  # (N, P, Dv)
    conf = torch.zeros(n, n, dtype=torch.long)
    if data.probe_images:
        train_features = store.image_features(model, data.probe_images, crop=False)
        labels = probe_patch_labels(train_features, data.probe_masks, n)
        predicted = fit_linear_probe(train_features, labels, n).predict(test_features)
        conf += patchdis_confusion(predicted, data.seg_masks, n)
        trained_on = f"{len(data.probe_images)} training images"
    else:
        half = len(data.seg_images) // 2
        folds = [(range(half), range(half, len(data.seg_images)))]
        folds.append((folds[0][1], folds[0][0]))
        for fit_idx, test_idx in folds:
            fit_masks = [data.seg_masks[i] for i in fit_idx]
            labels = probe_patch_labels(test_features[list(fit_idx)], fit_masks, n)
            probe = fit_linear_probe(test_features[list(fit_idx)], labels, n)
            predicted = probe.predict(test_features[list(test_idx)])
            conf += patchdis_confusion(predicted, [data.seg_masks[i] for i in test_idx], n)
        trained_on = "2-fold cross-fitting over the evaluated images"
    result = summarize_confusion(conf, data.class_names, float("nan"))
    result["rule"] = "linear probe on frozen patch features (background is a learnt class)"
    result["trained_on"] = trained_on
    return result
