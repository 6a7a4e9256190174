"""Corrupt images are skipped and counted (in process and through DataLoader workers); collate helpers."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.data import (
    LazySample,
    Sample,
    SkipCounter,
    SyntheticDataset,
    collate_samples,
    collate_train,
    create_dataset,
)
from lexvla.data.transforms import ImageProcessor

BAD = ("zero.jpg", "truncated.jpg", "text.jpg")


@pytest.fixture
def table(tmp_path) -> Path:
    """A CSV of 6 good images and 3 broken ones (zero bytes, truncated JPEG, text named .jpg)."""
    rng = np.random.default_rng(0)
    rows = ["filepath,caption"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"ok{i}.jpg"
        )
        rows += [f"ok{i}.jpg,good image {i}", f"ok{i}.jpg,another caption {i}"]
    (tmp_path / "zero.jpg").write_bytes(b"")
    whole = (tmp_path / "ok0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.jpg").write_text("I am not a picture\n")
    rows += [f"{name},broken {name}" for name in BAD]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_eager_dataset_returns_none_counts_and_logs_once(table, caplog):
    ds = create_dataset(table, lazy=False)
    assert len(ds) == 9
    with caplog.at_level(logging.WARNING, logger="lexvla.data"):
        first = [ds[i] for i in range(len(ds))]
        second = [ds[i] for i in range(len(ds))]
    for items in (first, second):
        assert [Path(s.path).name for s in items if s is not None] == [
            f"ok{i}.jpg" for i in range(6)
        ]
        assert sum(s is None for s in items) == 3
    assert ds.skips.count == 6  # every skip counts ...
    assert {Path(f).name for f in ds.skips.files} == set(BAD)
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(logged) == 3  # ... but each file is logged once, with its reason
    assert any("empty" in m and "zero.jpg" in m for m in logged)
    assert all(Path(f).name in ds.skips.report()["files"][f] for f in ds.skips.files)


def test_collate_samples_drops_and_counts(table):
    ds = create_dataset(table)  # lazy
    counter = SkipCounter()
    batch = collate_samples([ds[i] for i in range(len(ds))] + [None], counter)
    assert len(batch) == 6 and batch.num_skipped == 4
    assert all(isinstance(s, LazySample) and s.is_loaded for s in batch.samples)
    assert counter.count == 3 and {Path(f).name for f in counter.files} == set(BAD)


@pytest.mark.parametrize("lazy", [True, False])
def test_skips_reach_the_main_process_through_dataloader_workers(table, lazy):
    ds = create_dataset(table, lazy=lazy)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=collate_samples, shuffle=False
    )
    total = SkipCounter()
    keys: list[str] = []
    for batch in loader:
        total.add_batch(batch.num_skipped)
        keys.extend(s.key for s in batch.samples)
    assert total.count == 3 and sorted(keys) == [f"ok{i}.jpg" for i in range(6)]
    assert ds.skips.count == 0  # the workers' counters are their own: the batch carries the count


def test_collate_train(table):
    processor = ImageProcessor(image_size=28, resize_size=32)
    ds = create_dataset(table)
    rng = np.random.default_rng(0)
    pixels, captions, keys, skipped = collate_train([ds[i] for i in range(len(ds))], processor, rng)
    assert pixels.shape == (6, 3, 28, 28) and pixels.dtype == torch.float32
    assert keys == [f"ok{i}.jpg" for i in range(6)] and skipped == 3
    assert all(c.endswith(k[2]) for c, k in zip(captions, keys))  # a caption of the same image
    # the random caption choice follows the generator
    again = collate_train([ds[i] for i in range(6)], processor, np.random.default_rng(0))
    assert again[1] == captions
    choices = {collate_train([ds[0]], processor, rng)[1][0] for _ in range(20)}
    assert choices == {"good image 0", "another caption 0"}
    assert collate_train([ds[0]], processor, None)[1] == ["good image 0"]
    # matches the processor's own preprocessing
    torch.testing.assert_close(pixels[0], processor([ds[0].image])[0])


def test_collate_train_edge_cases():
    processor = ImageProcessor(image_size=16, resize_size=16)
    empty = collate_train([None, None], processor)
    assert empty[0].shape == (0, 3, 16, 16) and empty[3] == 2
    no_caption = Sample("k", Image.new("RGB", (20, 20)), [])
    grey = Sample("g", Image.new("L", (20, 30)), ["grey"])
    pixels, captions, keys, skipped = collate_train([no_caption, grey], processor)
    assert keys == ["g"] and skipped == 1 and pixels.shape == (1, 3, 16, 16)


def test_collate_train_in_workers_on_synthetic_data():
    processor = ImageProcessor(image_size=32, resize_size=32)
    collate = functools.partial(collate_train, processor=processor, rng=np.random.default_rng(1))
    loader = torch.utils.data.DataLoader(
        SyntheticDataset(8, image_size=48), batch_size=4, num_workers=2, collate_fn=collate
    )
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 32, 32)] * 2
    assert sum(b[3] for b in batches) == 0 and len({k for b in batches for k in b[2]}) == 8
