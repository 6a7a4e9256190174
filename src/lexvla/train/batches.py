"""Deterministic training batches: the batch of step `s` is a function of `(seed, s)` only.

Map-style data (caption JSON, CSV, synthetic): each epoch is a seeded permutation of the training images;
step `s` takes positions `[s·B, (s+1)·B)` of the concatenated epochs, and one of each image's captions is
drawn with a generator seeded by `(seed, s, image)`. Under DDP rank r keeps every world_size-th sample of
the global batch. An unreadable sample is skipped and counted; the next image in the permutation takes
its place, so every process still sees a full batch.

Streaming data (WebDataset shards) is read in order, split across ranks by shard; on resume, the samples
of the steps already done are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lexvla.config import DataConfig, TrainConfig
from lexvla.data.transforms import ImageProcessor
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """A (local) training batch: one caption per image, and either preprocessed pixels or the
    images' (and captions') precomputed frozen features."""

    pixels: Tensor | None  # (B, 3, S, S); None when image_features are given
    captions: list[str]  # (B,)
    keys: list[str]
    image_features: Tensor | None = None  # (B, P, Dv) from a FeatureTable
    text_features: Tensor | None = None  # (B, D) from a FeatureTable
    all_captions: list[list[str]] | None = None  # (B,) every caption of each image

    def __len__(self) -> int:
        return len(self.captions)

    def split(self, parts: int) -> list[Batch]:
        """Micro-batches for gradient accumulation."""
        size = -(-len(self) // parts)

        def cut(x: Tensor | None, i: int) -> Tensor | None:
            return None if x is None else x[i : i + size]

        return [
            Batch(
                cut(self.pixels, i),
                self.captions[i : i + size],
                self.keys[i : i + size],
                cut(self.image_features, i),
                cut(self.text_features, i),
                None if self.all_captions is None else self.all_captions[i : i + size],
            )
            for i in range(0, len(self), size)
        ]


class BatchSource:
    """Produces the batch of any step, for one rank, from a dataset described by DataConfig.

    `holdout` is what training never sees, for validation: the data file's validation split when it
    has one (Karpathy JSON: `data.val_split`), else the last `data.holdout` images by key, else None.
    """

    def __init__(
        self,
        data: DataConfig,
        train: TrainConfig,
        rank: int = 0,
        world_size: int = 1,
        processor: ImageProcessor | None = None,
    ) -> None:
        from lexvla.data import create_dataset, split_holdout

        if train.batch_size % world_size:
            raise LexVLAError(
                f"train.batch_size={train.batch_size} must be divisible by the {world_size} processes"
            )
        self.cfg = data
        self.seed = train.seed
        self.global_batch = train.batch_size
        self.rank, self.world_size = rank, world_size
        self.processor = processor
        dataset = create_dataset(data)
        self.streaming = not hasattr(dataset, "__getitem__")
        self.holdout = None
        if self.streaming:
            self.train_set = dataset
            self._stream: Iterator | None = None
        else:
            self.holdout = _validation_split(data)
            if self.holdout is not None:
                self.train_set = dataset
            elif data.holdout:
                self.train_set, self.holdout = split_holdout(dataset, data.holdout)
            else:
                self.train_set = dataset
            if len(self.train_set) == 0:
                raise LexVLAError(f"no training images in {data.path} (holdout={data.holdout})")
        self.skipped = 0
        self.skipped_files: set[str] = set()
        self._bad: set[int] = set()
        self._tables: tuple[Any, Any, Tensor | None] | None = None

    def set_processor(self, processor: ImageProcessor) -> None:
        self.processor = processor

    def use_tables(self, image_table: Any, text_table: Any, caption_offsets: Tensor | None) -> None:
        """Serve batches from precomputed frozen features (:class:`~lexvla.train.features.FeatureTable`).

        `image_table` rows are the training images (None: pixels are loaded as usual); `text_table`
        rows are their captions, image i's at `caption_offsets[i] : caption_offsets[i + 1]` (None:
        caption strings only). Images the table could not encode are skipped and counted.
        """
        if image_table is not None:
            for index in image_table.failed:
                self._mark_bad(index, self.train_set[index])
        self._tables = (image_table, text_table, caption_offsets)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train_set))

    def _global_indices(self, step: int) -> Iterator[int]:
        """Dataset indices in the order step `step` consumes them (endless, wraps over epochs)."""
        n = len(self.train_set)
        position = step * self.global_batch
        epoch, offset = divmod(position, n)
        while True:
            perm = self._permutation(epoch)
            yield from (int(i) for i in perm[offset:])
            epoch, offset = epoch + 1, 0

    def batch(self, step: int) -> Batch:
        """The local batch of `step` (deterministic; skips and counts unreadable samples)."""
        if self.streaming:
            if self.processor is None:
                raise RuntimeError("BatchSource needs an image processor (set_processor)")
            return self._stream_batch(step)
        image_table = self._tables[0] if self._tables else None
        if image_table is None and self.processor is None:
            raise RuntimeError("BatchSource needs an image processor (set_processor)")
        load = self._usable if image_table is not None else self._load
        local = self._pick(step, load)[self.rank :: self.world_size]
        return self._collate(step, local)

    def _pick(self, step: int, load: Any) -> list[tuple[int, Any]]:
        """The global batch of `step`: (index, sample) of the next usable images of the order."""
        samples = []
        indices = self._global_indices(step)
        attempts = 0
        while len(samples) < self.global_batch:
            index = next(indices)
            attempts += 1
            if attempts > 10 * self.global_batch + len(self.train_set):
                raise LexVLAError(
                    f"too many unreadable samples in {self.cfg.path}: nothing left to train on"
                )
            sample = load(index)
            if sample is not None:
                samples.append((index, sample))
        return samples

    def _usable(self, index: int):  # noqa: ANN202 - a dataset Sample or None
        """A sample whose features are in the tables (its image is not read)."""
        if index in self._bad:
            return None
        sample = self.train_set[index]
        if sample is None or not sample.captions:
            self._mark_bad(index, sample)
            return None
        return sample

    def _load(self, index: int):  # noqa: ANN202 - a dataset Sample or None
        sample = self._usable(index)
        if sample is None:
            return None
        try:
            sample.pixels = self.processor([sample.image])[0]  # type: ignore[union-attr]
        except LexVLAError as err:
            logger.warning("skipping unreadable sample %s: %s", getattr(sample, "path", index), err)
            self._mark_bad(index, sample)
            return None
        return sample

    def _mark_bad(self, index: int, sample) -> None:  # noqa: ANN001
        self._bad.add(index)
        self.skipped += 1
        self.skipped_files.add(
            str(getattr(sample, "path", "") or getattr(sample, "key", "") or index)
        )

    def _collate(self, step: int, local: list) -> Batch:
        choices = []
        for index, sample in local:
            rng = np.random.default_rng([self.seed, step, index])
            choices.append(int(rng.integers(len(sample.captions))))
        captions = [sample.captions[c] for (_, sample), c in zip(local, choices)]
        keys = [sample.key for _, sample in local]
        every = [list(sample.captions) for _, sample in local]
        text_rows = self._text_rows(local, choices)
        if not self._tables or self._tables[0] is None:
            pixels = torch.stack([sample.pixels for _, sample in local])
            return Batch(pixels, captions, keys, None, text_rows, every)
        rows = torch.tensor([index for index, _ in local])
        features = self._tables[0].features[rows].float()  # (B, P, Dv)
        return Batch(None, captions, keys, features, text_rows, every)

    def _text_rows(self, local: list, choices: list[int]) -> Tensor | None:
        if not self._tables or self._tables[1] is None:
            return None
        _, text_table, offsets = self._tables
        rows = torch.tensor([int(offsets[index]) + c for (index, _), c in zip(local, choices)])
        return text_table.features[rows].float()  # (B, D)

    def _stream_batch(self, step: int) -> Batch:
        if self._stream is None:
            self._stream = iter(self.train_set)
            for _ in range(
                step * (self.global_batch // self.world_size)
            ):  # resume: skip consumed samples
                next(self._stream, None)
        local: list = []
        while len(local) < self.global_batch // self.world_size:
            sample = next(self._stream, None)
            if sample is None:
                self._stream = iter(self.train_set)  # next epoch
                continue
            try:
                sample.pixels = self.processor([sample.image])[0]
            except LexVLAError as err:
                self._mark_bad(-1, sample)
                logger.warning(
                    "skipping unreadable sample %s: %s", getattr(sample, "key", "?"), err
                )
                continue
            local.append((len(local), sample))
        return self._collate(step, local)


def _validation_split(data: DataConfig) -> Any:
    """The data file's validation split (`data.val_split` of a Karpathy JSON), or None."""
    from lexvla.data import create_dataset
    from lexvla.data.datasets import detect_format

    if not data.val_split or detect_format(data.path) != "karpathy" or data.split == data.val_split:
        return None
    try:
        return create_dataset(data, split=data.val_split)
    except LexVLAError:  # the file has no such split: fall back to data.holdout
        return None
