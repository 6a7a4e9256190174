"""Reading lexical vectors as words."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lexvla.vocab import display_groups

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA


def encode_top_words(
    model: LexVLA,
    *,
    image: str | Path | None = None,
    text: str | None = None,
    k: int = 20,
    merge_pieces: bool = True,
) -> list[tuple[str, float]]:
    """Encode one image or text with `model` and return its top words (continuation pieces merged
    with their words unless `merge_pieces=False`)."""
    with torch.inference_mode():
        if image is not None:
            weights = model.encode_image([image]).image_weights[0]
        else:
            weights = model.encode_text([text or ""]).text_weights[0]
    return model.top_words(weights[None], k, merge_pieces=merge_pieces)[0]


def merge_pieces(weights: Tensor | Sequence[float], words: Sequence[str]) -> dict[str, float]:
    """Non-zero entries of one (V,) vector as `{word: weight}`, the forms of a word summed.

    "##dog", "dog" and "dogs" become one entry "dog" (:func:`lexvla.vocab.display_groups`: a `##`
    piece and a plural are shown with their word); a form without its word shows as itself.
    """
    groups, labels = _display_groups(tuple(words))
    values = torch.as_tensor(weights).double().flatten()
    merged: dict[str, float] = {}
    for i in torch.nonzero(values).flatten().tolist():
        word = labels[groups[i]]
        merged[word] = merged.get(word, 0.0) + float(values[i])
    return merged


@functools.lru_cache(maxsize=8)
def _display_groups(words: tuple[str, ...]) -> tuple[list[int], list[str]]:
    return display_groups(words)


OTHER_WORDS = "(other words)"


def score_contributions(
    image_weights: Tensor,
    text_weights: Tensor,
    words: Sequence[str],
    k: int = 10,
    *,
    merge: bool = False,
) -> list[tuple[str, float]]:
    """The per-word contributions to an image-text score `s = Σ_v image[v] · text[v]`.

    Args:
        image_weights: (V,) image vector (as scored: usually sparsified).
        text_weights: (V,) text vector.
        words: (V,) display words.
        k: number of top contributing words listed.
        merge: sum a `##piece`'s contribution into its word first.

    Returns:
        Up to `k` (word, contribution) pairs, largest first, then `("(other words)", remainder)` when
        more words contribute; the contributions sum to the score (float64, exact up to rounding).
    """
    image, text = image_weights.double().flatten(), text_weights.double().flatten()
    if image.shape != text.shape or image.numel() != len(words):
        raise ValueError(
            f"image {tuple(image.shape)}, text {tuple(text.shape)} and {len(words)} words differ"
        )
    contrib = image * text  # (V,)
    if merge:
        per_word = merge_pieces(contrib, words)
        names, values = list(per_word), torch.tensor(list(per_word.values()), dtype=torch.float64)
    else:
        ids = torch.nonzero(contrib).flatten()
        names, values = [words[i] for i in ids.tolist()], contrib[ids]
    order = torch.argsort(values, descending=True, stable=True)
    top = order[:k].tolist()
    out = [(names[i], float(values[i])) for i in top]
    if len(order) > k:
        out.append((OTHER_WORDS, float(values[order[k:]].sum())))
    return out
