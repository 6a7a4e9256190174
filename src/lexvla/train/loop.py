"""`fit`: the training loop, one process or many (torchrun), made of small named steps.

Determinism and exact resume: the batch of step `s` (which images, which of their captions) and every
random draw inside the step (dropout) are functions of `(seed, s)` only, so a run resumed from the
checkpoint of step `s` continues exactly as the uninterrupted run would have.
Under DDP, `train.batch_size` is the GLOBAL batch: rank r takes every world_size-th sample of it, the
lexical vectors are gathered (with gradient) and the loss and its penalties use the global batch, so one
process and N processes compute the same loss and the same update.

Divergence guard: a step whose loss or total gradient norm is not finite (on any rank: the ranks agree
through one all-reduce) makes no update and is counted; `train.max_nonfinite_steps` such steps in a row
stop the run with :class:`TrainingDivergedError`, naming the step, the last finite loss and the last good
checkpoint. Checkpoints are not written during such a streak (and never with non-finite values).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lexvla.config import ExperimentConfig, to_json
from lexvla.errors import LexVLAError
from lexvla.losses import LexVLAObjective
from lexvla.models.lexvla import LexVLA
from lexvla.train import state as ckpt
from lexvla.train.batches import BatchSource
from lexvla.train.distributed import (
    DistInfo,
    all_gather_with_grad,
    any_rank,
    barrier,
    cleanup,
    init_distributed,
    is_main_process,
)
from lexvla.train.features import (
    ImageFeatureCache,
    TextFeatureCache,
    image_feature_table,
    module_fingerprint,
    text_feature_table,
)
from lexvla.train.optim import create_optimizer, create_scheduler
from lexvla.train.runlog import RunLogger, strict_json
from lexvla.train.targets import CaptionWordTargets

logger = logging.getLogger(__name__)


class TrainingDivergedError(LexVLAError):
    """`train.max_nonfinite_steps` steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainState:
    """What a training run has produced so far."""

    step: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0  # steps skipped (no update) for a non-finite loss or gradient norm
    nonfinite_in_a_row: int = 0  # the current streak of them
    last_finite: tuple[int, float] | None = None  # (step, loss) of the newest step that was applied
    metrics: dict[str, float] = field(default_factory=dict)
    eval_results: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trainer:
    """Holds the pieces of a run; `fit` drives it."""

    cfg: ExperimentConfig
    run_dir: Path
    dist: DistInfo
    model: LexVLA
    ddp_model: torch.nn.Module
    objective: LexVLAObjective
    word_targets: CaptionWordTargets
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: BatchSource
    image_cache: ImageFeatureCache | None
    text_cache: TextFeatureCache | None
    log: RunLogger
    state: TrainState


def fit(
    cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> TrainState:
    """Train a LexVLA model as configured; write checkpoints, logs and the final model under `run_dir`.

    Returns the final TrainState (step, skipped samples, last metrics, evaluation results).
    """
    trainer = build_trainer(cfg, Path(run_dir), resume=resume, progress=progress)
    try:
        run_steps(trainer)
        finish(trainer)
    finally:
        trainer.log.close()
    # Only after success: destroying the group while another rank is still in a collective hangs.
    cleanup()
    return trainer.state


def build_trainer(cfg: ExperimentConfig, run_dir: Path, *, resume: bool, progress: bool) -> Trainer:
    dist = init_distributed(cfg.train.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.rank == 0:
        ckpt.write_text_atomic(run_dir / "config.json", to_json(cfg))
    model = LexVLA(cfg.model, device=dist.device)
    if cfg.train.grad_checkpointing and cfg.model.text.use_lora:
        model.set_grad_checkpointing(True)
    batches = BatchSource(cfg.data, cfg.train, dist.rank, dist.world_size, model.image_processor)
    # Before wrapping: fingerprints and the frozen towers' passes need the whole weights.
    image_cache, text_cache = _feature_caches(cfg, model, batches, progress and dist.rank == 0)
    wrapped = _wrap(model, dist, cfg.train.distributed)
    # After wrapping: FSDP2 replaces the parameters with sharded ones, the optimiser must hold those.
    optimizer = create_optimizer(model.trainable_parameters(), cfg.train)
    scheduler = create_scheduler(optimizer, cfg.train)
    state = TrainState()
    if resume:
        state.step = ckpt.load_latest(run_dir, model, optimizer, scheduler)
    return Trainer(
        cfg=cfg,
        run_dir=run_dir,
        dist=dist,
        model=model,
        ddp_model=wrapped,
        objective=LexVLAObjective(cfg.loss, max_scale=cfg.model.logit_scale_max),
        word_targets=CaptionWordTargets(model.vocab),
        optimizer=optimizer,
        scheduler=scheduler,
        batches=batches,
        image_cache=image_cache,
        text_cache=text_cache,
        log=RunLogger(
            run_dir,
            cfg.train.steps,
            start_step=state.step,
            enabled=dist.rank == 0,
            progress=progress,
        ),
        state=state,
    )


def _wrap(model: LexVLA, dist: DistInfo, strategy: str) -> torch.nn.Module:
    """DDP (default) or FSDP2 (shards each LLM layer: for the 7B text tower) across processes."""
    if dist.world_size == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 reshards a layer after its forward; the prefix-cached text path runs each layer twice
        # per step (prefix, then captions), which FSDP2's backward cannot follow: use the plain path.
        model.text.cfg.prefix_cache = False
        for layer in model.text.decoder_layers():
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _feature_caches(
    cfg: ExperimentConfig, model: LexVLA, batches: BatchSource, progress: bool
) -> tuple[ImageFeatureCache | None, TextFeatureCache | None]:
    """Frozen features computed once: for map-style data, whole tables before the first step (the
    batches then carry features); for streaming shards, caches filled on first use."""
    if not cfg.train.cache_features:
        return None, None
    vision_frozen = cfg.model.vision.freeze
    # A "bow" text side is cheap and (B, V) wide: not worth caching.
    text = cfg.model.text
    text_frozen = not text.use_lora and text.encoder == "llm"
    root = ckpt.feature_cache_root()
    if not batches.streaming:
        dtype = _FEATURE_DTYPES.get(cfg.train.feature_cache_dtype)
        if dtype is None:
            raise LexVLAError(
                f"train.feature_cache_dtype {cfg.train.feature_cache_dtype!r}: use float16 or float32"
            )
        compute = cfg.train.feature_cache_compute
        _build_tables(model, batches, root, vision_frozen, text_frozen, dtype, compute, progress)
        return None, None
    image_cache = None
    if vision_frozen:
        vision = cfg.model.vision
        preprocessing = [vision.image_size, vision.resize_size, vision.mean, vision.std]
        image_cache = ImageFeatureCache(
            root, module_fingerprint(model.vision.backbone, preprocessing)
        )
    return image_cache, TextFeatureCache() if text_frozen else None


_FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _build_tables(
    model: LexVLA,
    batches: BatchSource,
    root: Path,
    images: bool,
    texts: bool,
    dtype: torch.dtype,
    compute: str,
    progress: bool,
) -> None:
    """Rank 0 computes the missing table chunks first; the other ranks then read them."""
    if not (images or texts):
        return
    image_table = text_table = offsets = None
    for turn in (0, 1):
        if is_main_process() == (turn == 0):
            dataset = batches.train_set
            image_table = (
                image_feature_table(
                    model, dataset, root, dtype=dtype, compute=compute, progress=progress
                )
                if images
                else None
            )
            text_table, offsets = (
                text_feature_table(model, dataset, root, compute=compute, progress=progress)
                if texts
                else (None, None)
            )
        barrier()
    batches.use_tables(image_table, text_table, offsets)


def run_steps(t: Trainer) -> None:
    """The optimisation loop from the current step to `train.steps`."""
    cfg = t.cfg.train
    t.model.train()
    while t.state.step < cfg.steps:
        start = time.perf_counter()
        metrics = train_step(t, t.state.step)
        t.state.step += 1
        metrics["time/step_s"] = time.perf_counter() - start
        metrics["lr"] = t.scheduler.get_last_lr()[0]
        t.state.metrics = metrics
        skipped = _track_nonfinite(t, metrics)
        t.log.step(
            t.state.step,
            metrics,
            log=skipped or t.state.step % cfg.log_every == 0 or t.state.step == cfg.steps,
        )
        if t.state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise TrainingDivergedError(_divergence_message(t))
        if skipped or t.state.step >= cfg.steps:
            continue  # no checkpoint or evaluation of weights that just gave a non-finite step
        if cfg.save_every and t.state.step % cfg.save_every == 0:
            save(t)
        if cfg.eval_every and t.state.step % cfg.eval_every == 0:
            evaluate(t)


def train_step(t: Trainer, step: int) -> dict[str, float]:
    """One optimiser step (with gradient accumulation) on the batch of `step`; no update when the
    loss or the gradient norm is not finite on some rank (then `skipped_nonfinite` is 1)."""
    torch.manual_seed(t.cfg.train.seed * 1_000_003 + step)  # dropout etc.: a function of the step
    batch = t.batches.batch(step)
    t.state.skipped_samples = t.batches.skipped
    accum = max(1, t.cfg.train.grad_accum)
    totals: dict[str, float] = {}
    for micro in batch.split(accum):
        with _autocast(t):
            losses = _forward_losses(t, micro, step)
        (losses["loss"] / accum).backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / accum
    totals["grad_norm"] = _grad_norm(t)
    finite = math.isfinite(totals["loss"]) and math.isfinite(totals["grad_norm"])
    finite = not any_rank(not finite, t.dist.device)  # every rank skips, or none does
    if finite:
        t.optimizer.step()
    t.scheduler.step()  # the schedule follows the step number, applied or skipped
    t.optimizer.zero_grad(set_to_none=True)
    totals["samples"] = float(len(batch) * t.dist.world_size)
    totals["skipped_nonfinite"] = 0.0 if finite else 1.0
    return totals


def _grad_norm(t: Trainer) -> float:
    """The total gradient norm of the trained parameters, clipping them to `train.grad_clip` if on."""
    params = list(t.model.trainable_parameters().values())
    if t.cfg.train.grad_clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, t.cfg.train.grad_clip))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _track_nonfinite(t: Trainer, metrics: dict[str, float]) -> bool:
    """Count a skipped step and its streak, or remember an applied step's loss; True when skipped."""
    state = t.state
    if not metrics["skipped_nonfinite"]:
        state.nonfinite_in_a_row = 0
        state.last_finite = (state.step, metrics["loss"])
        return False
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    if t.dist.rank == 0:
        logger.warning(
            "step %d skipped: loss %s, gradient norm %s (%d in a row; the run stops at %d)",
            state.step,
            metrics["loss"],
            metrics["grad_norm"],
            state.nonfinite_in_a_row,
            t.cfg.train.max_nonfinite_steps,
        )
    return True


def _divergence_message(t: Trainer) -> str:
    state = t.state
    first = state.step - state.nonfinite_in_a_row + 1
    last = (
        f"{state.last_finite[1]:.6g} at step {state.last_finite[0]}"
        if state.last_finite
        else "none in this run"
    )
    # The checkpoint of step first-1 holds the weights that gave the first non-finite loss.
    good = [path for step, path in ckpt.checkpoint_steps(t.run_dir) if step < first - 1]
    where = f"{good[-1]} (resume from it: move newer checkpoints away)" if good else "none"
    fix = f"lower train.lr (now {t.cfg.train.lr:g})"
    fix += " or set train.grad_clip > 0" if t.cfg.train.grad_clip == 0 else ""
    return (
        f"training diverged at step {state.step}: steps {first}-{state.step} had a non-finite loss "
        f"or gradient norm ({state.nonfinite_in_a_row} in a row, train.max_nonfinite_steps="
        f"{t.cfg.train.max_nonfinite_steps}); last finite loss: {last}; last good checkpoint: "
        f"{where}. To fix: {fix}"
    )


def _autocast(t: Trainer) -> torch.autocast:
    precision = t.cfg.train.precision
    device_type = t.dist.device.type
    use_bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_bf16)


def _forward_losses(t: Trainer, micro: Any, step: int) -> dict[str, Tensor]:
    """Encode a micro-batch (through the DDP wrapper), gather across processes, apply the objective."""
    out = t.ddp_model(**_model_inputs(t, micro))
    loss = t.cfg.loss
    names = ["image_weights", "text_weights"]
    needs_activations = loss.penalty_on == "activations" or loss.caption_words_weight > 0
    if needs_activations:
        names += ["image_activations", "text_activations"]
    tensors = [out[name].float() for name in names]
    targets = None
    if loss.caption_words_weight > 0:
        targets = t.word_targets(micro.all_captions).to(t.dist.device)  # (B, V)
        tensors.append(targets)
    if t.dist.world_size > 1:
        tensors = [all_gather_with_grad(x) for x in tensors]  # (global B, V) each
    image, text = tensors[:2]
    activations = tuple(tensors[2:4]) if needs_activations else None
    return t.objective(
        image,
        text,
        out["logit_scale"],
        step,
        activations if loss.penalty_on == "activations" else None,
        word_targets=tensors[-1] if targets is not None else None,
        activations=activations,
    )


def _model_inputs(t: Trainer, micro: Any) -> dict[str, Any]:
    """Cached frozen features where a cache is on, raw pixels and captions otherwise."""
    inputs: dict[str, Any] = {"patch_keep": t.cfg.train.patch_keep}
    if micro.image_features is not None:
        inputs["image_features"] = micro.image_features
    elif t.image_cache is not None:
        device = t.dist.device
        compute = lambda px: t.model.vision.forward_features(px.to(device))  # noqa: E731
        inputs["image_features"] = t.image_cache.get(micro.pixels, compute)
    else:
        inputs["pixel_values"] = micro.pixels
    inputs["texts"] = micro.captions  # with cached features: for `input_words_weight`
    if micro.text_features is not None:
        inputs["text_features"] = micro.text_features
    elif t.text_cache is not None:
        inputs["text_features"] = t.text_cache.get(micro.captions, t.model.text.forward_features)
    return inputs


def save(t: Trainer) -> None:
    """Write a checkpoint; when it fails on one rank (a full disk on the writer), every rank stops."""
    failed: LexVLAError | None = None
    try:
        ckpt.save_checkpoint(
            t.run_dir,
            t.state.step,
            t.model,
            t.optimizer,
            t.scheduler,
            keep=t.cfg.train.keep_checkpoints,
            extra={
                "skipped_samples": t.state.skipped_samples,
                "nonfinite_steps": t.state.nonfinite_steps,
            },
            is_writer=t.dist.rank == 0,
        )
    except LexVLAError as err:
        failed = err
    if any_rank(failed is not None, t.dist.device):  # also the barrier after the writer
        raise failed or LexVLAError(f"rank 0 could not write the checkpoint of step {t.state.step}")


def evaluate(t: Trainer) -> dict[str, Any]:
    """Retrieval and word quality on the validation images (if any); logged and kept in the state."""
    holdout = t.batches.holdout
    if holdout is None or len(holdout) == 0 or t.dist.rank != 0:
        return {}
    from lexvla.train.validate import validate

    cfg = t.cfg
    text = cfg.model.text
    frozen = cfg.model.vision.freeze and not text.use_lora and text.encoder == "llm"
    use_tables = cfg.train.cache_features and frozen and not t.batches.streaming
    t.model.eval()
    result = validate(
        t.model,
        holdout,
        tables_root=ckpt.feature_cache_root() if use_tables else None,
        dtype=_FEATURE_DTYPES.get(cfg.train.feature_cache_dtype, torch.float16),
        compute=cfg.train.feature_cache_compute,
        batch_size=cfg.eval.batch_size,
        ks=cfg.eval.recall_ks,
    )
    t.model.train()
    t.state.eval_results = result
    t.log.eval(t.state.step, _flat_numbers(result))
    return result


def _flat_numbers(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested result as `a/b` keys (lists are left out)."""
    flat: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def finish(t: Trainer) -> None:
    """Final evaluation, final model in `run_dir/model`, a summary in `run_dir/summary.json`."""
    evaluate(t)
    ckpt.save_final_model(t.model, t.run_dir / "model", is_writer=t.dist.rank == 0)
    if t.dist.rank != 0:
        return
    summary = {
        "steps": t.state.step,
        "skipped_samples": t.state.skipped_samples,
        "skipped_files": sorted(t.batches.skipped_files)[:100],
        "nonfinite_steps": t.state.nonfinite_steps,
        "final_metrics": t.state.metrics,
        "eval": t.state.eval_results,
        "trainable_parameters": t.model.num_trainable(),
        "world_size": t.dist.world_size,
    }
    ckpt.write_text_atomic(t.run_dir / "summary.json", strict_json(summary, indent=2))
    if t.state.skipped_samples:
        logger.warning(
            "skipped %d unreadable samples (listed in summary.json)", t.state.skipped_samples
        )
