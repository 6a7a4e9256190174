"""lexvla.data.masks: polygon and RLE decoding, COCO semantic masks, VOC palette masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lexvla.data import (
    IGNORE_INDEX,
    CocoInstanceMasks,
    VocMasks,
    decode_polygons,
    decode_rle,
    encode_rle,
    read_palette_mask,
    rle_from_string,
    rle_to_string,
)
from lexvla.errors import LexVLAError


def test_square_polygon_covers_exact_pixels():
    mask = decode_polygons([[10, 10, 30, 10, 30, 30, 10, 30]], 50, 60)
    assert mask.shape == (50, 60) and mask.sum() == 400  # 20 x 20, COCO's area
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 10, 29)


def test_polygon_shapes_and_clipping():
    triangle = decode_polygons([[0, 0, 40, 0, 0, 40]], 40, 40)
    assert abs(int(triangle.sum()) - 800) <= 40  # area 800
    two = decode_polygons([[0, 0, 4, 0, 4, 4, 0, 4], [10, 10, 12, 10, 12, 12, 10, 12]], 20, 20)
    assert two.sum() == 16 + 4
    clipped = decode_polygons([[-5, -5, 5, -5, 5, 5, -5, 5]], 10, 10)
    assert clipped.sum() == 25
    assert decode_polygons([[1, 1, 3, 3]], 10, 10).sum() == 0  # degenerate: ignored
    # even-odd: a polygon with a hole traced as one ring (outer square, cut, inner square reversed)
    ring = [0, 0, 10, 0, 10, 10, 0, 10, 0, 0, 3, 3, 3, 7, 7, 7, 7, 3, 3, 3]
    assert decode_polygons([ring], 10, 10).sum() == 100 - 16


def test_uncompressed_rle_round_trip_column_major():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1] = True  # column 1, rows 1-2
    mask[0, 4] = True
    rle = encode_rle(mask)
    assert rle == {"size": [4, 5], "counts": [5, 2, 9, 1, 3]}
    assert np.array_equal(decode_rle(rle), mask)
    starts_on = np.ones((2, 2), dtype=bool)
    assert encode_rle(starts_on)["counts"] == [0, 4]
    assert decode_rle({"size": [2, 2], "counts": [0, 4]}).all()
    with pytest.raises(LexVLAError, match="corrupt"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})


def test_compressed_rle_known_string():
    # 3x3 mask with the centre pixel set: runs [4, 1, 4] -> chars 48+4, 48+1, 48+4 = "414"
    # (small values fit one 5-bit group; differences to counts[i-2] only start at i = 3).
    assert rle_to_string([4, 1, 4]) == "414"
    assert rle_from_string("414") == [4, 1, 4]
    # a long run needs several 5-bit groups; a decreasing run a negative difference
    counts = [1000, 3, 2, 500, 1, 7]
    assert rle_from_string(rle_to_string(counts)) == counts
    mask = decode_rle({"size": [3, 3], "counts": "414"})
    assert mask.sum() == 1 and mask[1, 1]
    with pytest.raises(LexVLAError, match="truncated"):
        rle_from_string("o")  # 'o' = 48 + 63: "more follows", then nothing


@pytest.mark.parametrize(
    "rows, expected",
    [
        (slice(0, 5), "05d00000000d?"),
        (slice(5, 10), "R45d00000000b;"),
        (slice(20, 25), "X`05d00000000"),
    ],
)
def test_compressed_rle_matches_pycocotools_strings(rows, expected):
    # Strings produced by pycocotools.mask.encode for a 5x5 block on the diagonal of a 25x25 mask.
    mask = np.zeros((25, 25), dtype=bool)
    mask[rows, rows] = True
    assert rle_to_string(encode_rle(mask)["counts"]) == expected
    assert np.array_equal(decode_rle({"size": [25, 25], "counts": expected}), mask)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=30))
def test_compressed_rle_round_trip(counts):
    assert rle_from_string(rle_to_string(counts)) == counts


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_rle_mask_round_trip(height, width, seed):
    mask = np.random.default_rng(seed).random((height, width)) < 0.4
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle(rle), mask)
    compressed = {"size": rle["size"], "counts": rle_to_string(rle["counts"])}
    assert np.array_equal(decode_rle(compressed), mask)


def _instances(tmp_path: Path) -> Path:
    (tmp_path / "annotations").mkdir(parents=True)
    (tmp_path / "val2017").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "val2017" / "img.jpg")
    crowd = np.zeros((30, 40), dtype=bool)
    crowd[20:30, 0:10] = True  # bottom-left corner
    data = {
        "images": [{"id": 7, "file_name": "img.jpg", "height": 30, "width": 40}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 90, "name": "kite"}],
        "annotations": [
            # a big dog square 0..20 x 0..20 and a small person square inside it, listed first
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 16,
             "segmentation": [[5, 5, 9, 5, 9, 9, 5, 9]]},
            {"id": 1, "image_id": 7, "category_id": 18, "iscrowd": 0, "area": 400,
             "segmentation": [[0, 0, 20, 0, 20, 20, 0, 20]]},
            {"id": 3, "image_id": 7, "category_id": 90, "iscrowd": 1, "area": 100,
             "segmentation": {"size": [30, 40], "counts": rle_to_string(encode_rle(crowd)["counts"])}},
        ],
    }  # fmt: skip
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_semantic_mask_rules(tmp_path):
    masks = CocoInstanceMasks(_instances(tmp_path))
    assert masks.class_names == ["background", "person", "dog", "kite"]  # by category id
    assert masks.category_to_index == {1: 1, 18: 2, 90: 3}
    assert masks.images_dir == (tmp_path / "val2017").resolve()
    sample = masks[0]
    assert sample.key == "img.jpg" and sample.image.size == (40, 30)
    mask = sample.mask
    assert mask.dtype == np.uint8 and mask.shape == (30, 40)
    assert (mask == 1).sum() == 16  # the small person stays on top of the big dog
    assert (mask == 2).sum() == 400 - 16
    assert (mask == IGNORE_INDEX).sum() == 100  # crowd region is ignored
    assert (mask == 0).sum() == 30 * 40 - 400 - 100
    kept = CocoInstanceMasks(_instances(tmp_path / "again"), ignore_crowd=False)[0].mask
    assert (kept == 3).sum() == 100


def test_coco_masks_errors(tmp_path):
    with pytest.raises(LexVLAError, match="not found"):
        CocoInstanceMasks(tmp_path / "nope.json")
    (tmp_path / "captions.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(LexVLAError, match="instances"):
        CocoInstanceMasks(tmp_path / "captions.json")


def test_voc_palette_masks(tmp_path):
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    labels = np.zeros((12, 16), dtype=np.uint8)
    labels[2:6, 3:9] = 12  # dog
    labels[2:6, 9] = 255  # border
    image = Image.fromarray(labels, mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[12] = (64, 0, 128)
    palette[255] = (224, 224, 192)
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "SegmentationClass" / "2007_000001.png")
    Image.new("RGB", (16, 12)).save(tmp_path / "JPEGImages" / "2007_000001.jpg")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    voc = VocMasks(tmp_path)
    assert len(voc) == 1 and voc.class_names[12] == "dog" and len(voc.class_names) == 21
    sample = voc[0]
    assert np.array_equal(sample.mask, labels) and sample.image.size == (16, 12)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(LexVLAError, match="palette"):
        read_palette_mask(tmp_path / "rgb.png")


@pytest.mark.assets
def test_coco_mini_instance_masks(coco_mini):
    masks = CocoInstanceMasks(coco_mini / "annotations" / "instances_train2017.json")
    assert len(masks) == 80 and len(masks.class_names) == 81
    present = set()
    for index in range(len(masks)):
        mask = masks.semantic_mask(index)
        info = masks.images[index]
        assert mask.shape == (info["height"], info["width"]) and mask.dtype == np.uint8
        values = np.unique(mask)
        assert ((values < 81) | (values == IGNORE_INDEX)).all()
        assert (mask > 0).sum() > 0  # every image has at least one object
        present.update(int(v) for v in values if 0 < v < 81)
    assert len(present) == 80  # one image per category
    sample = masks[0]
    assert Path(sample.path).is_file()
