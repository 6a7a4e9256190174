"""Word targets of the caption-word loss: the content words of each image's captions, over the vocabulary.

An image with five captions gets a soft target over the lexical vocabulary: each content word (stop
words and words outside the vocabulary left out) weighted by the number of captions that use it, the row
normalised to sum 1. A caption word maps to every vocabulary word of its folded form ("dogs" to "dog"
and "dogs"), as `lexvla eval words` compares words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lexvla.vocab import LexicalVocabulary, caption_tokens


class CaptionWordTargets:
    """Builds (B, V) soft word targets from each image's captions."""

    def __init__(self, vocab: LexicalVocabulary) -> None:
        self.vocab = vocab

    def __call__(self, captions_per_image: Sequence[Sequence[str]]) -> Tensor:
        """(B, V) float targets; rows sum to 1, or are all zero when no caption word is known."""
        targets = torch.zeros(len(captions_per_image), self.vocab.size)
        for row, captions in enumerate(captions_per_image):
            for caption in captions:
                dims = {d for word in caption_tokens(caption) for d in self.vocab.word_dims(word)}
                if dims:
                    targets[row, sorted(dims)] += 1.0
        mass = targets.sum(dim=-1, keepdim=True)
        return torch.where(mass > 0, targets / mass.clamp_min(1.0), targets)
