"""The LexVLA training objective: symmetric InfoNCE plus a sparsity penalty (tensors in, dict out).

See docs/method.md, "Losses". Everything here works on the batch of lexical vectors it is given; under
DDP the trainer passes the globally gathered (B_global, V) tensors, so the contrastive negatives and the
penalties' batch statistics are those of the global batch and 1 and N processes compute the same loss.

Penalties (each applied to image and text vectors separately, weighted by a warmed-up λ):

- FLOPs (SPLADE, Paria et al. 2020 "Minimizing FLOPs to Learn Efficient Sparse Representations";
  Formal et al. 2021 "SPLADE"): `sum_j (mean_i |w_ij|)^2`.
- Overuse (LexVLA, Li et al. 2024; the equation is not public, **project default**): with the batch
  usage `a_j = mean_i w_ij` and usage share `p_j = a_j / sum_k a_k`, `"share"`: `sum_j p_j a_j` or
  `"square"`: `sum_j p_j^2`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lexvla.config import LossConfig

logger = logging.getLogger(__name__)

_EPS = 1e-12


def info_nce(
    image_weights: Tensor, text_weights: Tensor, logit_scale: Tensor, max_scale: float = 100.0
) -> Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021; van den Oord et al. 2018 "CPC").

    Image i and text i are the positive pair; the other B-1 texts (images) of the batch are negatives.

    Args:
        image_weights: (B, V) image lexical vectors (L2-normalised by the model).
        text_weights: (B, V) text lexical vectors, row i paired with image i.
        logit_scale: shape [1] (or scalar) inverse temperature, already exponentiated; clamped to
            `max_scale` here.
        max_scale: upper bound of the logit scale (config `model.logit_scale_max`).

    Returns:
        Scalar loss: mean of the image→text and text→image cross-entropies.
    """
    if image_weights.shape != text_weights.shape or image_weights.dim() != 2:
        raise ValueError(
            f"expected paired (B, V) batches, got {tuple(image_weights.shape)} "
            f"and {tuple(text_weights.shape)}"
        )
    scale = logit_scale.clamp(max=max_scale).reshape(())
    logits = scale * image_weights @ text_weights.t()  # (B, B): images x texts
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def flops_penalty(weights: Tensor) -> Tensor:
    """SPLADE's FLOPs regulariser `sum_j (mean_i |w_ij|)^2` over a (B, V) batch -> scalar.

    Paria et al. 2020, "Minimizing FLOPs to Learn Efficient Sparse Representations"; used by SPLADE
    (Formal et al. 2021) as `torch.sum(torch.mean(torch.abs(rep), dim=0) ** 2)`. Lexical weights are
    non-negative, so the absolute value changes nothing here.
    """
    usage = weights.abs().mean(dim=0)  # (V,) a_j
    return (usage**2).sum()


def l1_penalty(weights: Tensor) -> Tensor:
    """Mean L1 norm of a (B, V) batch of non-negative vectors -> scalar: `sum_j mean_i w_ij`.

    On L2-normalised vectors it is a scale-free measure of density: a unit vector with k equal
    non-zero entries has L1 norm sqrt(k), a one-hot 1, a uniform vector sqrt(V).
    """
    return weights.abs().sum(dim=-1).mean()


def overuse_penalty(weights: Tensor, form: str = "share") -> Tensor:
    """LexVLA's overuse penalty on a (B, V) batch of non-negative weights -> scalar.

    With `a_j = mean_i w_ij` (how much the batch uses word j) and `p_j = a_j / sum_k a_k` (its share
    of all usage): `form="share"` gives `sum_j p_j a_j` (usage-share-weighted FLOPs, the **project
    default**; Li et al. 2024 do not publish the equation) and `form="square"` gives `sum_j p_j^2`
    (a concentration index of the usage distribution, scale-free).

    `p_j` is **not** detached; the gradient flows through the share. For "share", with S = sum a and
    Q = sum a^2, `dL/da_j = 2 a_j / S - Q / S^2`: the push-down grows with a word's usage, so the
    most-used words are pushed down hardest; words used less than `Q / 2S` get a small push up, i.e.
    the penalty spreads usage rather than only shrinking it (it sums to `Q / S > 0` over words).
    Detaching `p_j` would give `dL/da_j = a_j / S`, the same direction as FLOPs (`2 a_j`) only
    rescaled, so the overuse-vs-FLOPs ablation would compare two scalings of one gradient.
    """
    usage = weights.mean(dim=0)  # (V,) a_j
    share = usage / usage.sum().clamp_min(_EPS)  # (V,) p_j
    if form == "share":
        return (share * usage).sum()
    if form == "square":
        return (share**2).sum()
    raise ValueError(f"unknown overuse form {form!r}: use 'share' or 'square'")


def caption_word_loss(activations: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy between soft word targets and each vector's share of its activation mass.

    `share_j = a_j / sum_k a_k` of the (B, V) non-negative activations; `targets` (B, V) are rows that
    sum to 1 (the words of an image's captions, weighted by how many captions use them) or all zeros
    (no target: the row is left out). `-sum_j t_j log share_j` is lowest when the targeted words carry
    the whole mass: it pulls the caption's words up and every other word down, towards vectors whose
    few heavy words are the ones people use for the image. Returns a scalar (0 without targets).
    """
    log_share = torch.log(activations.clamp_min(_EPS)) - torch.log(
        activations.sum(dim=-1, keepdim=True).clamp_min(_EPS)
    )  # (B, V)
    per_row = -(targets * log_share).sum(dim=-1)  # (B,)
    has_target = targets.sum(dim=-1) > 0
    if not bool(has_target.any()):
        return per_row.sum() * 0.0
    return per_row[has_target].mean()


class PenaltySchedule:
    """Quadratic warm-up of the penalty weight: `λ_t = λ · min(1, (t / T)^2)`.

    SPLADE's `RegWeightScheduler` (Formal et al. 2021): the penalty starts at 0 so the contrastive
    loss shapes the representation first, and reaches λ at step T. T = 0 means no warm-up.
    """

    def __init__(self, weight: float, warmup_steps: int) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.weight = float(weight)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.weight
        return self.weight * (max(step, 0) / self.warmup_steps) ** 2


def active_count(weights: Tensor) -> Tensor:
    """Mean number of entries per (B, V) vector that survive the `1/sqrt(V)` threshold (detached).

    Uses `>=`, the rule of inference sparsification (`lexvla.layers.lexical.sparsify_threshold`).
    """
    threshold = 1.0 / math.sqrt(weights.shape[-1])
    return (weights.detach() >= threshold).sum(dim=-1).float().mean()


class LexVLAObjective:
    """`L = InfoNCE + λ_t · (penalty(image) + penalty(text))` with detached statistics.

    Args:
        cfg: the loss settings (penalty kind, λ, warm-up steps).
        max_scale: clamp of the logit scale (config `model.logit_scale_max`).
    """

    def __init__(self, cfg: LossConfig, max_scale: float = 100.0) -> None:
        self.cfg = cfg
        self.max_scale = float(max_scale)
        self.schedule = PenaltySchedule(cfg.penalty_weight, cfg.penalty_warmup_steps)

    def penalty(self, weights: Tensor) -> Tensor | None:
        """The configured penalty of one modality's (B, V) batch, or None for "none"."""
        if self.cfg.penalty == "overuse":
            return overuse_penalty(weights, "share")
        if self.cfg.penalty == "overuse-square":
            return overuse_penalty(weights, "square")
        if self.cfg.penalty == "flops":
            return flops_penalty(weights)
        if self.cfg.penalty == "l1":
            return l1_penalty(weights)
        return None

    def __call__(
        self,
        image_weights: Tensor,
        text_weights: Tensor,
        logit_scale: Tensor,
        step: int,
        penalty_inputs: tuple[Tensor, Tensor] | None = None,
        word_targets: Tensor | None = None,
        activations: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms of one (global) batch of paired (B, V) image and text vectors at `step`.

        `penalty_inputs`: the (image, text) (B, V) tensors the penalty reads, when not the weights
        themselves (`loss.penalty_on="activations"`: the activations before normalisation).
        `word_targets`: (B, V) soft targets of :func:`caption_word_loss` (the words of each image's
        captions), read with `activations`, the (image, text) activations, when
        `loss.caption_words_weight > 0`.

        Returns:
            `contrastive_loss`, `overuse_loss` | `flops_loss` | `l1_loss` (image + text penalty,
            unweighted; absent for "none"), `caption_word_loss` (when on), `loss` (the total to
            back-propagate) and detached statistics
            `sparsity/image_active`, `sparsity/text_active`, `penalty_weight`, `logit_scale`.
        """
        nce = info_nce(image_weights, text_weights, logit_scale, self.max_scale)
        out: dict[str, Tensor] = {"contrastive_loss": nce}
        weight = self.schedule(step)
        total = nce
        image_input, text_input = penalty_inputs or (image_weights, text_weights)
        image_penalty = self.penalty(image_input)
        text_penalty = self.penalty(text_input)
        if image_penalty is not None and text_penalty is not None:
            penalty = image_penalty + text_penalty
            key = f"{self.cfg.penalty.split('-')[0]}_loss"
            out[key] = penalty
            total = nce + weight * penalty
        if self.cfg.caption_words_weight > 0 and word_targets is not None:
            if activations is None:
                raise ValueError("the caption-word loss needs the (image, text) activations")
            words = caption_word_loss(activations[0], word_targets)  # the image side
            if self.cfg.caption_words_on == "both":
                words = words + caption_word_loss(activations[1], word_targets)
            out["caption_word_loss"] = words
            total = total + self.cfg.caption_words_weight * words
        out["loss"] = total
        out["sparsity/image_active"] = active_count(image_weights)
        out["sparsity/text_active"] = active_count(text_weights)
        out["penalty_weight"] = torch.tensor(weight, device=nce.device)
        out["logit_scale"] = logit_scale.detach().clamp(max=self.max_scale).reshape(())
        return out
