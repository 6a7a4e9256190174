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

import numpy as np
import torch
from torch import Tensor

from lexvla.config import DataConfig, TrainConfig
from lexvla.data.transforms import ImageProcessor
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """A (local) training batch: preprocessed pixels and one caption per image."""

    pixels: Tensor  # (B, 3, S, S)
    captions: list[str]  # (B,)
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def split(self, parts: int) -> list[Batch]:
        """Micro-batches for gradient accumulation."""
        size = -(-len(self) // parts)
        return [
            Batch(self.pixels[i : i + size], self.captions[i : i + size], self.keys[i : i + size])
            for i in range(0, len(self), size)
        ]


class BatchSource:
    """Produces the batch of any step, for one rank, from a dataset described by DataConfig."""

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
            self.train_set, self.holdout = (
                split_holdout(dataset, data.holdout) if data.holdout else (dataset, None)
            )
            if len(self.train_set) == 0:
                raise LexVLAError(f"no training images in {data.path} (holdout={data.holdout})")
        self.skipped = 0
        self.skipped_files: set[str] = set()
        self._bad: set[int] = set()

    def set_processor(self, processor: ImageProcessor) -> None:
        self.processor = processor

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
        if self.processor is None:
            raise RuntimeError("BatchSource needs an image processor (set_processor)")
        if self.streaming:
            return self._stream_batch(step)
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
            sample = self._load(index)
            if sample is not None:
                samples.append((index, sample))
        local = samples[self.rank :: self.world_size]
        return self._collate(step, local)

    def _load(self, index: int):  # noqa: ANN202 - a dataset Sample or None
        if index in self._bad:
            return None
        sample = self.train_set[index]
        if sample is None or not sample.captions:
            self._mark_bad(index, sample)
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
        captions = []
        for index, sample in local:
            rng = np.random.default_rng([self.seed, step, index])
            captions.append(sample.captions[int(rng.integers(len(sample.captions)))])
        pixels = torch.stack([sample.pixels for _, sample in local])
        return Batch(pixels, captions, [sample.key for _, sample in local])

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
