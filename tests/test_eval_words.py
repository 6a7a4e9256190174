"""Word-quality metrics (`lexvla eval words`) against a small case computed by hand."""

from __future__ import annotations

import pytest
import torch

from lexvla.errors import LexVLAError
from lexvla.eval.words import (
    caption_words,
    fold_word,
    fragment_words,
    frequent_caption_words,
    overused_word_text,
    word_quality,
    words_table,
)

WORDS = ["dog", "##dog", "dogs", "cat", "the", "grass", "##ing", "ball", "car", "red"]
CAPTIONS = ["A dog on the grass.", "Two dogs play.", "A red car."]
TEXT_TO_IMAGE = torch.tensor([0, 0, 1])


def _row(**weights: float) -> list[float]:
    # Distinct tiny values everywhere else, so the top k never depends on how ties are broken.
    row = [1e-4 * (len(WORDS) - i) for i in range(len(WORDS))]
    for word, value in weights.items():
        row[WORDS.index(word.replace("_", "#"))] = value
    return row


# image 0: dog .3 + ##dog .2 + dogs .1 = .6 (one folded word), cat .5, the .4 -> top 3: dog cat the
# image 1: car .9, ##ing .5, red .1 -> top 3: car ing red
IMAGES = torch.tensor(
    [_row(dog=0.3, __dog=0.2, dogs=0.1, cat=0.5, the=0.4), _row(car=0.9, __ing=0.5, red=0.1)]
)
# caption 0: grass .9, cat .7, dog .6 -> 2 of 3; caption 1: ball .8, dogs .7, red .6 -> 1 of 3;
# caption 2: red .9, car .8, the .7 -> 2 of 3 ("the" is in the caption but a stop word never counts)
TEXTS = torch.tensor(
    [
        _row(grass=0.9, cat=0.7, dog=0.6),
        _row(ball=0.8, dogs=0.7, red=0.6),
        _row(red=0.9, car=0.8, the=0.7),
    ]
)


def test_fold_word_merges_pieces_case_and_plurals():
    assert fold_word("##Dog") == fold_word("dogs") == "dog"
    assert fold_word("puppies") == "puppy"
    assert fold_word("boxes") == "box" and fold_word("glasses") == "glass"
    assert fold_word("horses") == fold_word("horse") == "horse"
    assert fold_word("bus") == "bus" and fold_word("is") == "is" and fold_word("grass") == "grass"
    assert fold_word("men") == "man" and fold_word("children") == "child"
    assert caption_words(["Two dogs, one T-shirt!"]) == {"two", "dog", "one", "t", "shirt"}


def test_word_quality_hand_computed():
    result = word_quality(IMAGES, TEXTS, TEXT_TO_IMAGE, CAPTIONS, WORDS, k=3, threshold=0.15)
    # image 0: dog hit, cat miss, the (stop word) miss = 1/3; image 1: car, red hit, ing miss = 2/3
    assert result["image_precision"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert result["text_precision"] == pytest.approx(100 * (2 / 3 + 1 / 3 + 2 / 3) / 3)
    # most frequent caption words (by images, stop words and one-letter words out), ties a-z
    assert result["fixed_answer"] == ["car", "dog", "grass"]
    assert result["fixed_answer_precision"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    # weights >= 0.15: image 0 has .3 .2 .5 .4, image 1 has .9 .5; texts 3 each
    assert result["active_words"] == {"image": 3.0, "text": 3.0}
    shares = {row["word"]: row["share"] for row in result["overused_words"]["image"]}
    assert shares == dict.fromkeys(("dog", "cat", "the", "car", "ing", "red"), 0.5)
    flagged = {
        r["word"]: (r["stop_word"], r["fragment"]) for r in result["overused_words"]["image"]
    }
    assert flagged["the"] == (True, False) and flagged["ing"] == (False, True)
    assert flagged["dog"] == (False, False)
    assert result["meaningless_overused"] == ["ing", "the"]
    # right: of the images showing a word, the share whose captions have it; in_captions: of all
    # captioned images. Image 0's captions have dog, the (a stop word: never right) and grass;
    # image 1's have red and car.
    truth = {r["word"]: (r["right"], r["in_captions"]) for r in result["overused_words"]["image"]}
    assert truth == {
        "dog": (1.0, 0.5), "cat": (0.0, 0.0), "the": (0.0, 0.0),
        "car": (1.0, 0.5), "ing": (0.0, 0.0), "red": (1.0, 0.5),
    }  # fmt: skip
    assert overused_word_text(result["overused_words"]["image"][0]) == "car 50% (right 100%)"
    assert "ing* 50% (never right)" in words_table(result)
    rare = {"word": "dog", "share": 0.2, "stop_word": False, "fragment": False, "right": 0.004}
    assert overused_word_text(rare) == "dog 20% (right 1%)"


def test_object_recall_any_word_of_the_class_name():
    objects = [["dog", "sports ball"], ["car", "traffic light"], []]
    images = torch.cat([IMAGES, IMAGES[:1]])
    result = word_quality(
        images, TEXTS, TEXT_TO_IMAGE, CAPTIONS, WORDS, k=3, objects=objects, object_k=3
    )
    assert result["object_recall"] == pytest.approx(
        50.0
    )  # dog of 2, car of 2; no-object row left out
    assert result["images_with_objects"] == 2
    # the third image has no caption: counted, and left out of the image precision
    assert result["images_without_captions"] == 1
    assert result["image_precision"] == pytest.approx(50.0)


def test_frequent_caption_words_and_fragments():
    truths = [caption_words([c]) for c in ["the dog runs", "a dog and a cat", "cats"]]
    assert frequent_caption_words(truths, 2) == ["cat", "dog"]
    assert fragment_words(["dog", "##dog", "##ing", "##s"]) == {"ing", "s"}


def test_word_quality_refuses_data_it_cannot_measure():
    with pytest.raises(LexVLAError, match="no caption word is in the model's vocabulary"):
        word_quality(IMAGES, TEXTS, TEXT_TO_IMAGE, ["Ein Hund.", "Zwei.", "Ein Auto."], WORDS)
    with pytest.raises(LexVLAError, match="disagree in length"):
        word_quality(IMAGES, TEXTS[:2], TEXT_TO_IMAGE, CAPTIONS, WORDS)


def test_words_of_zero_weight_are_not_counted():
    # a bag-of-words vector shows only its non-zero words: 2 of them, both in the captions
    bag = torch.zeros(1, len(WORDS))
    bag[0, WORDS.index("car")] = bag[0, WORDS.index("red")] = 1.0
    result = word_quality(bag, bag, torch.tensor([0]), ["A red car."], WORDS, k=5)
    assert result["image_precision"] == result["text_precision"] == pytest.approx(100.0)
