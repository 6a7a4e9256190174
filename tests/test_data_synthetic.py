"""lexvla.data.synthetic: determinism, masks match the drawn shapes, captions and words, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lexvla.data import SyntheticDataset, synthetic_class_names
from lexvla.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZES
from lexvla.errors import LexVLAError


def test_sample_is_a_function_of_seed_and_index_only():
    a, b = SyntheticDataset(50, seed=7), SyntheticDataset(50, seed=7)
    order = [31, 2, 49, 2, 0]
    first = {i: a[i] for i in order}
    for i in reversed(order):  # another access order, another object
        x, y = first[i], b[i]
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert x.captions == y.captions and x.words == y.words and x.key == y.key
        assert np.array_equal(x.mask, y.mask) and np.array_equal(x.instances, y.instances)
    other = SyntheticDataset(50, seed=8)[31]
    assert not np.array_equal(np.asarray(other.image), np.asarray(first[31].image))
    assert SyntheticDataset(1000, seed=7)[31].captions == first[31].captions  # size does not matter


def test_masks_match_the_drawn_shapes():
    ds = SyntheticDataset(40, seed=1)
    names = ds.class_names
    assert names == synthetic_class_names("shape") and names[0] == "background"
    for sample in ds:
        image = np.asarray(sample.image)
        assert image.shape == (224, 224, 3) and sample.mask.shape == (224, 224)
        assert sample.mask.dtype == np.uint8 and sample.mask.max() < len(names)
        assert 1 <= len(sample.objects) <= 3
        for number, obj in enumerate(sample.objects, start=1):
            inside = sample.instances == number
            assert inside.sum() > 0.3 * obj.radius**2  # fully visible, never occluded
            assert (image[inside] == COLOURS[obj.colour]).all()  # no anti-aliasing, exact colour
            assert (sample.mask[inside] == names.index(obj.shape)).all()
            ys, xs = np.nonzero(inside)
            cx, cy = obj.center
            assert abs(xs.mean() + 0.5 - cx) < 0.35 * obj.radius  # drawn where it says
            assert abs(ys.mean() + 0.5 - cy) < 0.35 * obj.radius
        assert ((sample.mask > 0) == (sample.instances > 0)).all()
        background = image[sample.instances == 0].astype(int)
        assert background.min() > 150  # pale background, never an object colour


def test_colour_shape_scheme():
    ds = SyntheticDataset(10, mask_classes="colour_shape", seed=2)
    assert len(ds.class_names) == 1 + len(COLOURS) * len(SHAPES)
    for sample in ds:
        for number, obj in enumerate(sample.objects, start=1):
            label = ds.class_names.index(f"{obj.colour} {obj.shape}")
            assert (sample.mask[sample.instances == number] == label).all()
    with pytest.raises(LexVLAError, match="mask scheme"):
        SyntheticDataset(2, mask_classes="texture")


def test_captions_and_words():
    ds = SyntheticDataset(60, seed=4)
    vocabulary = set(COLOURS) | set(SHAPES) | set(SIZES) | set(POSITIONS)
    counts = set()
    for sample in ds:
        assert len(sample.captions) == 5 and len(set(sample.captions)) == 5
        assert set(sample.words) <= vocabulary
        for obj in sample.objects:
            assert {obj.colour, obj.shape, obj.size, obj.position} <= set(sample.words)
            assert any(obj.colour in c and obj.shape in c for c in sample.captions)
        text = " ".join(sample.captions)
        assert " a " in f" {text} " or " an " in f" {text} "  # function words
        assert "an orange" in text or "a orange" not in text
        counts.add(len(sample.objects))
    assert counts == {1, 2, 3}
    all_text = " ".join(c for s in ds for c in s.captions)
    for phrase in ("there is", "there are", "two", "on the left", "and"):
        assert phrase in all_text


def test_configurable_size_texture_and_views():
    ds = SyntheticDataset(6, image_size=64, texture=False, captions_per_image=2, seed=0)
    sample = ds[-1]
    assert sample.image.size == (64, 64) and len(sample.captions) == 2
    background = np.asarray(sample.image)[sample.instances == 0]
    assert len(np.unique(background, axis=0)) == 1  # plain
    view = ds.subset([4, 5])
    assert len(view) == 2 and view[0].key == ds[4].key == "synthetic-000004"
    with pytest.raises(IndexError):
        ds[6]


def test_fast_enough():
    ds = SyntheticDataset(100)
    ds[0]
    start = time.perf_counter()
    for i in range(100):
        ds[i]
    per_image = (time.perf_counter() - start) / 100
    assert per_image < 0.02, f"{per_image * 1e3:.1f} ms per image"  # ~1.5 ms; loose on a busy CPU
