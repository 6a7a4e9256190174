"""A small checkpoint of a trained model: the image codebook as its start plus a low-rank correction.

A trained image codebook is a (V, D) matrix (21,223 x 576 floats, 49 MB, for ``small-offline``), but
training moves it only a little away from where it started: the LM-head rows, which every user rebuilds
from the backbone. `compact_model` keeps that start out of the file and stores the change as the best
rank-r product U·W (truncated SVD, Eckart-Young), in the layout of ``lexical.image_codebook_rank``, so
the result is an ordinary checkpoint: `LexVLA.from_pretrained` loads it, training can continue from it.
Saved in float16 (`save_pretrained(..., dtype=torch.float16)`), the ``small-offline`` head is a few MB.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lexvla.errors import LexVLAError
from lexvla.models.lexvla import LexVLA


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (U, W) of `delta` (V, D) in the Frobenius norm: U·W ≈ delta."""
    left, singular, right_t = torch.linalg.svd(delta.double(), full_matrices=False)
    u = left[:, :rank] * singular[:rank]  # (V, r)
    return u.to(delta.dtype), right_t[:rank].to(delta.dtype)  # (V, r), (r, D)


def compact_model(model: LexVLA, rank: int) -> tuple[LexVLA, dict[str, float]]:
    """`model` with its image codebook stored as start + rank-`rank` correction, and what that costs.

    Returns the new model and a report: ``relative_error`` (‖Δ − U·W‖ / ‖Δ‖ of the codebook change Δ)
    and ``relative_change`` (‖Δ‖ / ‖start‖, how far training moved the codebook).
    """
    if rank < 1:
        raise LexVLAError(f"rank must be at least 1 (got {rank})")
    lexical = model.cfg.lexical
    if lexical.image_codebook_rank > 0:
        raise LexVLAError("this model's image codebook is already low-rank: save it as it is")
    cfg = dataclasses.replace(
        model.cfg, lexical=dataclasses.replace(lexical, image_codebook_rank=rank)
    )
    compact = LexVLA(cfg)
    start = compact.vision.codebook_base  # (V, D): the LM-head rows both models start from
    trained = model.vision.codebook.detach().to(start)  # (V, D)
    delta = trained - start
    u, w = low_rank(delta, min(rank, *delta.shape))
    state = {k: v for k, v in model.trainable_parameters().items() if k != "vision.codebook"}
    with torch.no_grad():
        for name, param in compact.trainable_parameters().items():
            if name == "vision.codebook_u":
                param.zero_()[:, : u.shape[1]].copy_(u)
            elif name == "vision.codebook_w":
                param.zero_()[: w.shape[0]].copy_(w)
            else:
                param.copy_(state[name])
    delta_norm = float(delta.norm())
    report = {
        "rank": rank,
        "relative_error": float((delta - u @ w).norm()) / max(delta_norm, 1e-12),
        "relative_change": delta_norm / max(float(start.norm()), 1e-12),
    }
    return compact.train(model.training), report


def compact_checkpoint(
    model_ref: str, out: str | Path, rank: int, *, dtype: torch.dtype | None = torch.float16
) -> dict[str, float | str]:
    """Load `model_ref` (run or checkpoint folder), write its compact form to `out`; the report."""
    from lexvla.models.factory import create_model

    compact, report = compact_model(create_model(model_ref), rank)
    out = compact.save_pretrained(out, dtype=dtype)
    weights = Path(out) / "model.safetensors"
    return {**report, "out": str(out), "weights_bytes": weights.stat().st_size}
