"""False discoveries: document frequency, overuse mass, caption-word matching, end to end on tiny."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lexvla.eval.discovery import (
    caption_words,
    discovery_table,
    evaluate_false_discoveries,
    false_discoveries,
    normalize_word,
    truth_forms,
    word_in_caption,
)

WORDS = ["the", "dog", "##dog", "frisb", "##ing", "bus", "cat", "park"]


def _vec(**weights: float) -> list[float]:
    return [weights.get(w.replace("#", "_"), 0.0) for w in WORDS]


def test_matching_rules():
    forms = truth_forms(caption_words(["Two dogs catch a Frisbee.", "A bus!"]))
    assert word_in_caption(normalize_word("dog"), forms)  # plural in the caption
    assert word_in_caption(normalize_word("##dog"), forms)  # continuation piece = the word
    assert word_in_caption("frisb", forms)  # 4+ letter prefix of a caption word
    assert word_in_caption("buses", forms)  # plural of a caption word
    assert not word_in_caption("ing", forms)
    assert not word_in_caption("cat", forms)  # "catch" starts with it, but 3 letters is too short
    assert not word_in_caption("", forms)


def test_overuse_and_false_discovery_by_hand():
    images = torch.tensor(
        [
            _vec(the=0.6, dog=0.4, __dog=0.2),
            _vec(the=0.5, bus=0.5, cat=0.1),
            _vec(the=0.3, park=0.3, __ing=0.4),
        ]
    )
    truth = [["a dog runs"], ["the bus"], ["a park"]]
    out = false_discoveries(images, None, WORDS, truth, top_frac=0.5, threshold=0.05)
    stats = out["image"]
    assert stats["overused_words"] == ["the"]  # active in 3/3 > 50%
    assert stats["most_frequent"][0] == {
        "word": "the",
        "doc_freq": 1.0,
        "mean_weight": pytest.approx(1.4 / 3),
    }
    shares = [0.6 / 1.2, 0.5 / 1.1, 0.3 / 1.0]
    assert stats["overused_mass"]["mean"] == pytest.approx(sum(shares) / 3)
    truth_stats = stats["truth"]
    # image 0: the (no), dog, ##dog -> 1/3 false; image 1: the (yes), bus, cat (no) -> 1/3; image 2: the, ##ing -> 2/3
    assert truth_stats["false_discovery_share"]["mean"] == pytest.approx(
        (1 / 3 + 1 / 3 + 2 / 3) / 3
    )
    assert truth_stats["false_discovery_mass"]["mean"] == pytest.approx(
        (0.6 / 1.2 + 0.1 / 1.1 + 0.7 / 1.0) / 3
    )
    assert truth_stats["most_frequent_false"][0] == {
        "word": "the",
        "count": 2,
        "weight": pytest.approx(0.9),
    }
    assert "text" not in out
    assert "false discoveries" in discovery_table(out)


def test_threshold_defaults_to_paper_value():
    weights = torch.full((2, len(WORDS)), 1 / len(WORDS) ** 0.5)
    weights[:, 0] = 0.1  # below 1/sqrt(8) = 0.354
    out = false_discoveries(weights, weights, WORDS)
    assert out["threshold"] == pytest.approx(len(WORDS) ** -0.5)
    assert out["image"]["active_words"] == len(WORDS) - 1
    assert out["text"]["active_words"] == len(WORDS) - 1


def test_mismatched_truth_raises():
    with pytest.raises(ValueError, match="ground-truth"):
        false_discoveries(torch.rand(3, len(WORDS)), None, WORDS, [["x"]])


def test_tiny_model_end_to_end(tiny_model):
    images = [Image.new("RGB", (30, 20), (60 * i, 90, 30)) for i in range(3)]
    pairs = [(im, [f"a dog in a park {i}", "a red bus"]) for i, im in enumerate(images)]
    out = evaluate_false_discoveries(tiny_model, pairs, progress=False)
    assert out["image"]["num_inputs"] == 3 and out["text"]["num_inputs"] == 6
    assert 0.0 <= out["image"]["truth"]["false_discovery_share"]["mean"] <= 1.0
    assert out["text"]["truth"]["evaluated"] == 6
