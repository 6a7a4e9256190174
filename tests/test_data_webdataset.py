"""lexvla.data.webdataset: round trip, rank x worker split, shard shuffling, corrupt and unsafe tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.data import ShardDataset, SyntheticDataset, collate_samples, expand_shards, write_shards
from lexvla.data.webdataset import expand_braces, iter_tar_groups
from lexvla.errors import LexVLAError


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[Path], SyntheticDataset]:
    dataset = SyntheticDataset(22, image_size=32, seed=3)
    out = tmp_path_factory.mktemp("shards")
    return write_shards(dataset, out, shard_size=3), dataset


def test_round_trip_keeps_pixels_captions_words(shards):
    paths, dataset = shards
    assert [p.name for p in paths] == [f"{i:05d}.tar" for i in range(8)]  # 22 samples / 3
    read = list(ShardDataset(paths, shuffle=False, rank=0, world_size=1))
    assert [s.key for s in read] == [dataset.key(i) for i in range(22)]
    for got, want in zip(read, dataset):
        assert got.captions == want.captions and got.words == want.words
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image))  # PNG is lossless
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:3] == ["000000000.png", "000000000.txt", "000000000.json"]


def test_jpg_shards_and_captions_from_txt_lines_or_json(tmp_path):
    data = SyntheticDataset(2, image_size=32)
    (path,) = write_shards(data, tmp_path, image_format="jpg")
    read = list(ShardDataset(path))
    assert read[0].image.size == (32, 32) and read[0].captions == data[0].captions
    tar_path = tmp_path / "json-only.tar"
    with tarfile.open(tar_path, "w") as tar:
        _add(tar, "k1.jpg", _jpeg())
        _add(tar, "k1.json", json.dumps({"caption": "only in json"}).encode())
    assert [s.captions for s in ShardDataset(tar_path)] == [["only in json"]]


@pytest.mark.parametrize("world_size, workers", [(2, 2), (3, 1)])
def test_ranks_and_workers_cover_every_sample_once(shards, world_size, workers):
    paths, dataset = shards
    seen: list[str] = []
    for rank in range(world_size):
        ds = ShardDataset(paths, rank=rank, world_size=world_size, seed=5)
        ds.set_epoch(1)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=4, num_workers=workers, collate_fn=collate_samples
        )
        for batch in loader:
            assert batch.num_skipped == 0
            seen.extend(s.key for s in batch.samples)
    assert sorted(seen) == [dataset.key(i) for i in range(len(dataset))]


def test_shard_order_depends_on_seed_and_epoch_only(shards):
    paths, _ = shards
    a, b = ShardDataset(paths, seed=1), ShardDataset(paths, seed=1)
    assert a.shard_order() == b.shard_order()
    first = a.shard_order()
    a.set_epoch(1)
    assert a.shard_order() != first and sorted(a.shard_order()) == sorted(first)
    assert ShardDataset(paths, seed=2).shard_order() != first
    assert ShardDataset(paths, shuffle=False).shard_order() == [str(p) for p in paths]
    # every rank sees the same order and takes positions rank, rank + world, ...
    r0 = ShardDataset(paths, rank=0, world_size=2, seed=1)
    r1 = ShardDataset(paths, rank=1, world_size=2, seed=1)
    assert r0.local_shards() == first[0::2] and r1.local_shards() == first[1::2]


def test_truncated_and_garbage_shards_are_skipped_and_counted(shards, tmp_path):
    paths, dataset = shards
    data = paths[0].read_bytes()
    truncated = tmp_path / "a-truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "b-garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "c-empty.tar"
    empty.write_bytes(b"")
    good = paths[1]
    ds = ShardDataset([truncated, garbage, empty, good], shuffle=False)
    keys = [s.key for s in ds]
    # the samples complete before the damage survive; the one cut in half does not
    assert 1 <= sum(k in {dataset.key(i) for i in range(3)} for k in keys) < 3
    assert keys[-3:] == [dataset.key(i) for i in range(3, 6)]
    assert str(truncated) in ds.skips.reasons and str(garbage) in ds.skips.reasons
    assert ds.skips.count >= 2


def test_gzipped_shards(shards, tmp_path):
    import gzip

    paths, dataset = shards
    gz = tmp_path / "00000.tar.gz"
    gz.write_bytes(gzip.compress(paths[0].read_bytes()))
    assert expand_shards(tmp_path) == [str(gz)]
    assert [s.key for s in ShardDataset(tmp_path)] == [dataset.key(i) for i in range(3)]


def test_corrupt_member_and_missing_parts_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "ok.jpg", _jpeg())
        _add(tar, "ok.txt", b"a fine caption\n\nand a second one\n")
        _add(tar, "bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        _add(tar, "bad.txt", b"caption of a broken image")
        _add(tar, "noimage.txt", b"caption without image")
        _add(tar, "nocaption.png", _jpeg())
    ds = ShardDataset(path)
    samples = list(ds)
    assert [s.key for s in samples] == ["ok"]
    assert samples[0].captions == ["a fine caption", "and a second one"]
    assert ds.skips.count == 3
    reasons = ds.skips.reasons
    assert "bad.jpg" in reasons[f"{path}:bad"] and reasons[f"{path}:noimage"] == "no image member"
    assert reasons[f"{path}:nocaption"] == "no caption"


def test_unsafe_members_are_ignored_and_nothing_is_extracted(tmp_path):
    inner = tmp_path / "box"
    inner.mkdir()
    path = inner / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("../escape.jpg", "/abs/root.jpg", "a/../../up.jpg"):
            _add(tar, name, _jpeg())
            _add(tar, name.replace(".jpg", ".txt"), b"sneaky")
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "link.txt", b"a link")
        _add(tar, "sub/fine.jpg", _jpeg())
        _add(tar, "sub/fine.txt", b"a fine one")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    keys = [group["__key__"] for group in iter_tar_groups(path)]
    assert "sub/fine" in keys and not any(".." in k or k.startswith("/") for k in keys)
    assert [s.key for s in ShardDataset(path)] == ["sub/fine"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_expand_shards_patterns(shards, tmp_path):
    paths, _ = shards
    folder = paths[0].parent
    assert expand_braces("s-{0..2}.tar") == ["s-0.tar", "s-1.tar", "s-2.tar"]
    assert expand_braces("{a,b}-{08..10}") == ["a-08", "a-09", "a-10", "b-08", "b-09", "b-10"]
    assert expand_shards(folder) == [str(p) for p in paths]
    assert expand_shards(str(folder / "{00001..00002}.tar")) == [str(p) for p in paths[1:3]]
    assert expand_shards(str(folder / "0000[0-1].tar")) == [str(p) for p in paths[:2]]
    assert expand_shards([paths[3], str(paths[4])]) == [str(paths[3]), str(paths[4])]
    with pytest.raises(LexVLAError, match="no .tar shards"):
        expand_shards(str(tmp_path / "none-{0..3}.tar"))


def test_rank_defaults_and_validation(shards):
    paths, _ = shards
    ds = ShardDataset(paths)
    assert (ds.rank, ds.world_size) == (0, 1)  # torch.distributed not initialised
    assert not hasattr(ds, "__getitem__") and isinstance(ds, torch.utils.data.IterableDataset)
    with pytest.raises(LexVLAError, match="rank 2"):
        ShardDataset(paths, rank=2, world_size=2)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()
