"""Reading lexical vectors as words."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def top_words(weights: Tensor, words: Sequence[str], k: int = 20) -> list[tuple[str, float]]:
    """The `k` heaviest non-zero entries of one (V,) vector as (word, weight), heaviest first."""
    values, ids = weights.float().topk(min(k, weights.shape[-1]))
    return [(words[i], float(v)) for i, v in zip(ids.tolist(), values.tolist()) if v > 0]


def encode_top_words(
    model_ref: str,
    *,
    image: str | Path | None = None,
    text: str | None = None,
    k: int = 20,
    merge_pieces: bool = True,
) -> list[tuple[str, float]]:
    """Build the model named by `model_ref`, encode one image or text and return its top words
    (continuation pieces merged with their words unless `merge_pieces=False`)."""
    from lexvla.models.factory import create_model

    model = create_model(model_ref).eval()
    with torch.inference_mode():
        if image is not None:
            weights = model.encode_image([image]).image_weights[0]
        else:
            weights = model.encode_text([text or ""]).text_weights[0]
    return model.top_words(weights[None], k, merge_pieces=merge_pieces)[0]
