"""Evaluation sets of the experiments: the synthetic holdout and coco-mini (paths as in the run config)."""

from __future__ import annotations

from pathlib import Path

from experiments.evaluate import EvalSet

from lexvla.config import ExperimentConfig
from lexvla.data import create_dataset, split_holdout
from lexvla.data.masks import CocoInstanceMasks
from lexvla.eval.retrieval import collect_retrieval_data

EVAL_CAPTIONS = 2  # captions per held-out synthetic image (each costs an LLM pass)


def eval_set(cfg: ExperimentConfig, probe_images: int) -> EvalSet:
    """The held-out images of a run's data (`data.holdout`), with masks for PatchDis."""
    if cfg.data.path.startswith("synthetic"):
        return synthetic_set(cfg, probe_images)
    return coco_set(cfg)


def synthetic_set(cfg: ExperimentConfig, probe_images: int) -> EvalSet:
    """Synthetic holdout (exact words and shape masks); the probe trains on the first training images."""
    train, holdout = split_holdout(create_dataset(cfg.data), cfg.data.holdout)
    samples = list(holdout)
    probe = [train[i] for i in range(min(probe_images, len(train)))]
    retrieval = collect_retrieval_data([(s.image, s.captions[:EVAL_CAPTIONS]) for s in samples])
    return EvalSet(
        name="synthetic",
        retrieval=retrieval,
        truth_per_image=[list(s.captions[:EVAL_CAPTIONS]) + list(s.words) for s in samples],
        seg_images=[s.image for s in samples],
        seg_masks=[s.mask for s in samples],
        class_names=list(holdout.class_names),
        probe_images=[s.image for s in probe],
        probe_masks=[s.mask for s in probe],
    )


def coco_set(cfg: ExperimentConfig) -> EvalSet:
    """coco-mini: retrieval and discoveries on the held-out images; PatchDis on all 80 images.

    80 images cannot hold out enough masks for a probe: the probe is cross-fitted instead (2 folds,
    each half predicted by a probe trained on the other half); `probe_images` is empty to say so.
    """
    _, holdout = split_holdout(create_dataset(cfg.data), cfg.data.holdout)
    retrieval = collect_retrieval_data(holdout)
    truth: list[list[str]] = [[] for _ in range(retrieval.num_images)]
    for caption, owner in zip(retrieval.captions, retrieval.text_to_image.tolist()):
        truth[owner].append(caption)
    instances = Path(cfg.data.path).with_name("instances_train2017.json")
    masks = CocoInstanceMasks(instances, cfg.data.images or None)
    samples = list(masks)
    return EvalSet(
        name="coco-mini",
        retrieval=retrieval,
        truth_per_image=truth,
        seg_images=[s.path for s in samples],
        seg_masks=[s.mask for s in samples],
        class_names=list(masks.class_names),
        probe_images=[],
        probe_masks=[],
    )
