"""Caption-word targets: each image's content words over the vocabulary, weighted by caption count."""

from __future__ import annotations

import pytest
import torch

from lexvla.train.targets import CaptionWordTargets
from lexvla.vocab import LexicalVocabulary


def test_targets_count_captions_fold_plurals_and_skip_stop_words():
    words = ["dog", "dogs", "snow", "the", "run", "cat"]
    vocab = LexicalVocabulary(tuple(range(len(words))), tuple(words), "pieces", 10)
    targets = CaptionWordTargets(vocab)(
        [["A dog in the snow.", "Two dogs run in snow"], ["Ein Hund"], []]
    )
    # caption 1: dog group {dog, dogs}, snow ("the" is a stop word); caption 2: dog group, snow, run
    raw = torch.tensor([2.0, 2.0, 2.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(targets[0], raw / raw.sum())
    assert targets[0].sum().item() == pytest.approx(1.0)
    assert targets[1:].abs().sum().item() == 0.0  # nothing known: no target
