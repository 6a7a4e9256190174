"""lexvla.data.datasets: COCO / Karpathy / CSV / TSV parsing, format detection, factory, holdout split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lexvla.config import DataConfig
from lexvla.data import (
    ImageTextDataset,
    LazySample,
    Sample,
    ShardDataset,
    SyntheticDataset,
    create_dataset,
    detect_format,
    split_holdout,
    write_shards,
)
from lexvla.errors import LexVLAError

COCO_MINI = Path(__file__).resolve().parents[1] / "../shared/data/coco-mini"


def _images(folder: Path, names: list[str], size: tuple[int, int] = (24, 16)) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def _coco(tmp_path: Path) -> Path:
    (tmp_path / "annotations").mkdir()
    _images(tmp_path / "train2017", ["b.jpg", "a.jpg", "c.jpg"])
    data = {
        "images": [
            {"id": 2, "file_name": "b.jpg"},
            {"id": 1, "file_name": "a.jpg"},
            {"id": 3, "file_name": "c.jpg"},  # no caption: dropped
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a dog "},
            {"id": 11, "image_id": 2, "caption": "a cat"},
            {"id": 12, "image_id": 1, "caption": "a brown dog"},
            {"id": 13, "image_id": 2, "caption": "   "},
        ],
    }
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_captions_grouped_per_image_with_default_image_folder(tmp_path):
    path = _coco(tmp_path)
    assert detect_format(path) == "coco"
    ds = create_dataset(path, lazy=False)
    assert isinstance(ds, ImageTextDataset) and len(ds) == 2
    by_key = {ds.key(i): ds[i] for i in range(len(ds))}
    assert by_key["a.jpg"].captions == ["a dog", "a brown dog"]
    assert by_key["b.jpg"].captions == ["a cat"]
    sample = by_key["a.jpg"]
    assert (
        isinstance(sample, Sample) and sample.image.size == (24, 16) and sample.image.mode == "RGB"
    )
    assert Path(sample.path) == (tmp_path / "train2017" / "a.jpg").resolve()


def test_coco_explicit_images_dir_and_missing_folder_error(tmp_path):
    path = _coco(tmp_path)
    other = tmp_path / "elsewhere"
    _images(other, ["a.jpg", "b.jpg"])
    ds = create_dataset(DataConfig(path=str(path), images=str(other)))
    assert Path(ds.records[0].path).parent == other
    (tmp_path / "train2017" / "b.jpg").rename(tmp_path / "b.jpg.bak")
    with pytest.raises(LexVLAError, match="data.images"):
        create_dataset(path)


def _karpathy(tmp_path: Path) -> Path:
    names = [f"img{i}.jpg" for i in range(5)]
    _images(tmp_path / "images" / "val2014", names)
    splits = ["train", "restval", "val", "test", "train"]
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": name,
                "split": split,
                "sentences": [{"raw": f"caption {j} of {name}", "tokens": []} for j in range(2)],
            }
            for name, split in zip(names, splits)
        ],
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path


def test_karpathy_splits(tmp_path):
    path = _karpathy(tmp_path)
    assert detect_format(path) == "karpathy"
    images = tmp_path / "images"
    train = create_dataset(path, images_dir=images, split="train")
    assert [r.key for r in train.records] == [
        "val2014/img0.jpg",
        "val2014/img1.jpg",
        "val2014/img4.jpg",
    ]
    assert train.records[0].captions == ["caption 0 of img0.jpg", "caption 1 of img0.jpg"]
    assert len(create_dataset(DataConfig(path=str(path), split="val"))) == 1  # finds images/ itself
    test = create_dataset(path, images_dir=images, split="test")
    assert [r.key for r in test.records] == ["val2014/img3.jpg"]
    assert test[0].image.size == (24, 16)
    assert len(create_dataset(path, images_dir=images, split="all")) == 5
    with pytest.raises(LexVLAError, match="unknown Karpathy split"):
        create_dataset(path, images_dir=images, split="dev")


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_tsv_grouping_and_relative_paths(tmp_path, suffix, sep):
    _images(tmp_path / "pics", ["x.png", "y.png"])
    absolute = tmp_path / "pics" / "y.png"
    rows = [
        f"filepath{sep}caption",
        f"pics/x.png{sep}a red thing",
        f"{absolute}{sep}a blue thing",
        f"pics/x.png{sep}the same red thing",
        f"pics/x.png{sep}",
    ]
    table = tmp_path / f"data{suffix}"
    table.write_text("\n".join(rows) + "\n")
    assert detect_format(table) == suffix[1:]
    ds = create_dataset(table, lazy=False)
    assert len(ds) == 2
    assert ds.records[0].captions == ["a red thing", "the same red thing"]
    assert all(ds[i].image.size == (24, 16) for i in range(2))
    # relative paths against images_dir when given
    ds2 = create_dataset(DataConfig(path=str(table), images=str(tmp_path)))
    assert Path(ds2.records[0].path) == tmp_path / "pics" / "x.png"


def test_csv_quoted_captions_and_missing_columns(tmp_path):
    _images(tmp_path, ["x.png"])
    (tmp_path / "q.csv").write_text('filepath,caption\nx.png,"a dog, a cat and ""quotes"""\n')
    assert create_dataset(tmp_path / "q.csv").records[0].captions == ['a dog, a cat and "quotes"']
    (tmp_path / "bad.csv").write_text("file,words\nx.png,a dog\n")
    with pytest.raises(LexVLAError, match="filepath.*caption"):
        create_dataset(tmp_path / "bad.csv")


def test_detect_format_cases(tmp_path):
    assert detect_format("synthetic") == "synthetic"
    assert detect_format("synthetic:12") == "synthetic"
    with pytest.raises(LexVLAError, match="synthetic:N"):
        detect_format("synthetic:zero")
    write_shards(SyntheticDataset(3, image_size=32), tmp_path / "shards", shard_size=2)
    assert detect_format(tmp_path / "shards") == "wds"
    assert detect_format(str(tmp_path / "shards" / "*.tar")) == "wds"
    assert detect_format(str(tmp_path / "shards" / "{00000..00001}.tar")) == "wds"
    assert detect_format(tmp_path / "shards" / "00000.tar") == "wds"
    (tmp_path / "one.tar.gz").write_bytes(b"")
    assert detect_format(tmp_path / "one.tar.gz") == "wds"
    (tmp_path / "other.json").write_text('{"foo": []}')
    (tmp_path / "notes.txt").write_text("hello")
    for bad, message in [
        (tmp_path / "other.json", "neither COCO"),
        (tmp_path / "notes.txt", "unknown data format"),
        (tmp_path / "missing.csv", "not found"),
        (tmp_path / "shards-*.tar", "no .tar shards"),
    ]:
        with pytest.raises(LexVLAError, match=message) as info:
            detect_format(bad)
        assert "accepted" in str(info.value) or "shards" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LexVLAError, match="without .tar shards"):
        detect_format(empty)


def test_create_dataset_synthetic_and_shards(tmp_path):
    synthetic = create_dataset("synthetic:10")
    assert isinstance(synthetic, SyntheticDataset) and len(synthetic) == 10
    assert len(create_dataset(DataConfig(path="synthetic", synthetic_size=7))) == 7
    write_shards(SyntheticDataset(4, image_size=32), tmp_path, shard_size=2)
    shards = create_dataset(str(tmp_path), rank=0, world_size=1)
    assert isinstance(shards, ShardDataset) and len(list(shards)) == 4
    with pytest.raises(LexVLAError, match="data.path"):
        create_dataset(DataConfig())


def test_lazy_samples_decode_on_access(tmp_path):
    _images(tmp_path, ["x.png"])
    (tmp_path / "d.csv").write_text("filepath,caption\nx.png,a thing\nmissing.png,gone\n")
    ds = create_dataset(tmp_path / "d.csv")  # lazy by default
    sample = ds[0]
    assert isinstance(sample, LazySample) and not sample.is_loaded
    assert "x.png" in repr(sample) and not sample.is_loaded  # repr never decodes
    assert sample.image.size == (24, 16) and sample.is_loaded
    with pytest.raises(LexVLAError, match="not found"):
        ds[1].image  # noqa: B018
    assert [s.key for s in ds] == ["x.png"]  # iteration skips what cannot be decoded, and counts it
    assert ds.skips.count == 1 and ds.skips.files == [str(tmp_path / "missing.png")]


def test_split_holdout_is_deterministic_by_sorted_key(tmp_path):
    path = _karpathy(tmp_path)
    ds = create_dataset(path, images_dir=tmp_path / "images", split="all")
    ds.records.reverse()  # file order must not matter
    train, hold = split_holdout(ds, 2)
    assert sorted(train.key(i) for i in range(len(train))) == [
        f"val2014/img{i}.jpg" for i in range(3)
    ]
    assert sorted(hold.key(i) for i in range(len(hold))) == ["val2014/img3.jpg", "val2014/img4.jpg"]
    assert hold.skips is ds.skips
    with pytest.raises(LexVLAError, match="holdout"):
        split_holdout(ds, 5)
    syn_train, syn_hold = split_holdout(SyntheticDataset(10, image_size=32), 3)
    assert [s.key for s in syn_hold] == [f"synthetic-{i:06d}" for i in (7, 8, 9)]
    assert len(syn_train) == 7 and syn_hold[0].key == "synthetic-000007"
    with pytest.raises(LexVLAError, match="map-style"):
        split_holdout(ShardDataset(write_shards([syn_hold[0]], tmp_path / "s")), 1)


def test_split_holdout_of_a_plain_map_dataset():
    class Plain:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> Sample:
            return Sample(f"k{3 - i}", Image.new("RGB", (4, 4)), ["c"])

    train, hold = split_holdout(Plain(), 1)
    assert [s.key for s in hold] == ["k3"] and len(train) == 3


# ------------------------------------------------------------------------------ coco-mini
@pytest.mark.assets
def test_coco_mini_captions(coco_mini):
    path = coco_mini / "annotations" / "captions_train2017.json"
    assert detect_format(path) == "coco"
    ds = create_dataset(path)
    assert len(ds) == 80 and ds.num_captions == 400
    assert all(len(r.captions) == 5 for r in ds.records)
    assert all(Path(r.path).is_file() for r in ds.records)
    train, hold = split_holdout(ds, 16)
    assert (len(train), len(hold)) == (64, 16)
    keys = sorted(r.key for r in ds.records)
    assert sorted(hold.key(i) for i in range(16)) == keys[-16:]
    assert hold[0].image.mode == "RGB" and min(hold[0].image.size) > 100


@pytest.mark.assets
def test_coco_mini_instances_file_is_not_a_caption_file(coco_mini):
    with pytest.raises(LexVLAError, match="CocoInstanceMasks"):
        create_dataset(coco_mini / "annotations" / "instances_train2017.json")
