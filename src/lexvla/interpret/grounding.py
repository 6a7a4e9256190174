"""Text-to-patch grounding: which patches of an image carry a text's words.

The score of patch p with a text is the dot product of the patch's lexical vector and the text's,
`patch_weights[p] · text_weights` — the same per-word sum as the image-text score, restricted to one
patch (the image vector is the max over patches of the same activations, before normalisation).
Tensors in, tensors out; drawing lives in :mod:`lexvla.interpret.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lexvla.data.transforms import grid_side
from lexvla.errors import LexVLAError

PatchSpec = int | tuple[int, int] | str


def text_patch_scores(patch_weights: Tensor, text_weights: Tensor) -> Tensor:
    """Per-patch score with a text: (P, V), (V,) -> (P,); or batched (B, P, V), (B, V) -> (B, P)."""
    patches, text = patch_weights.float(), text_weights.float()
    if patches.dim() == 2:
        return patches @ text.flatten()  # (P,)
    return torch.einsum("bpv,bv->bp", patches, text)  # (B, P)


def to_grid(scores: Tensor) -> Tensor:
    """(P,) per-patch values -> (g, g), row-major as the vision tower orders patches."""
    side = grid_side(scores.numel())
    return scores.reshape(side, side)


def parse_patch(spec: PatchSpec, side: int) -> int:
    """A patch index from an int, a (row, col) pair or a "row,col" string; validated against g."""
    if isinstance(spec, str):
        parts = [p for p in spec.replace(" ", "").split(",") if p]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2):
            raise LexVLAError(f"patch {spec!r}: give an index or 'row,col'")
        spec = values[0] if len(values) == 1 else (values[0], values[1])
    if isinstance(spec, tuple):
        row, col = spec
        if not (0 <= row < side and 0 <= col < side):
            raise LexVLAError(
                f"patch {spec} is outside the {side}x{side} grid (rows/cols 0..{side - 1})"
            )
        return row * side + col
    if not 0 <= int(spec) < side * side:
        raise LexVLAError(f"patch {spec} is outside 0..{side * side - 1} ({side}x{side} grid)")
    return int(spec)


def patches_weights(patch_weights: Tensor, patches: Sequence[PatchSpec]) -> Tensor:
    """Max over the chosen patches of (P, V) patch weights -> (V,) (as the image vector pools)."""
    side = grid_side(patch_weights.shape[0])
    ids = [parse_patch(p, side) for p in patches]
    if not ids:
        raise LexVLAError("no patch chosen: give at least one patch index or 'row,col'")
    return patch_weights[ids].amax(dim=0)


def top_patches(scores: Tensor, k: int = 3) -> list[int]:
    """Indices of the k highest-scoring patches of (P,) scores, best first."""
    return torch.argsort(scores.float(), descending=True, stable=True)[:k].tolist()


def word_source_patches(patch_weights: Tensor, image_weights: Tensor, k: int = 3) -> list[int]:
    """The patch each of the image's k heaviest words comes from (arg-max patch), deduplicated."""
    words = torch.argsort(image_weights.float(), descending=True, stable=True)[:k]
    sources = patch_weights[:, words].argmax(dim=0).tolist()  # (k,)
    return list(dict.fromkeys(sources))
