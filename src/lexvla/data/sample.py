"""The sample type shared by every dataset, lazy images, skip accounting and batch collation.

A dataset item is a :class:`Sample`: one image with all of its captions. Map-style datasets over files
give either decoded samples (`__getitem__` returns ``None`` for an image that cannot be decoded) or
:class:`LazySample` objects whose image is decoded on first access (raising :class:`LexVLAError`).

Unreadable data is skipped and counted, never a crash:

- each dataset owns a :class:`SkipCounter` (`dataset.skips`) that logs every skipped file once, with the
  reason, and counts every skip made *in this process*;
- DataLoader workers are other processes, so their counters never reach the trainer: the collate
  functions therefore carry the number of samples dropped from each batch (`num_skipped`), which the
  main process sums. Sum `num_skipped` over batches when workers are used; read `dataset.skips` when not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lexvla.data.transforms import ImageProcessor, load_image
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Sample:
    """One image and all of its captions.

    Attributes:
        key: unique, stable identifier of the image inside its dataset (sorting keys orders the data).
        image: the decoded RGB image.
        captions: every caption of the image (at least one for training data).
        path: the image file, when the image comes from one ("" otherwise).
        words: ground-truth content words (synthetic data only).
    """

    key: str
    image: Image.Image
    captions: list[str]
    path: str = ""
    words: list[str] | None = None


class LazySample(Sample):
    """A :class:`Sample` whose image is read from `path` on first access of `.image` (then kept).

    Accessing `.image` of an unreadable file raises :class:`LexVLAError` naming the file, so a consumer
    that touches images must catch it (the collate functions here do).
    """

    def __init__(
        self,
        key: str,
        path: str,
        captions: list[str],
        words: list[str] | None = None,
        loader: Callable[[str], Image.Image] = load_image,
    ) -> None:
        self.key = key
        self.path = path
        self.captions = captions
        self.words = words
        self._loader = loader
        self._image: Image.Image | None = None

    @property  # type: ignore[override]
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = self._loader(self.path)
        return self._image

    @image.setter
    def image(self, value: Image.Image) -> None:
        self._image = value

    @property
    def is_loaded(self) -> bool:
        return self._image is not None

    def __repr__(self) -> str:
        return f"LazySample(key={self.key!r}, path={self.path!r}, captions={len(self.captions)})"


def utf8_text(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates: undecodable file names, JSON escapes
    like "\\ud800") replaced by "?": no tokenizer or UTF-8 file takes them."""
    return text.encode("utf-8", "replace").decode("utf-8")


@dataclass
class SkipCounter:
    """Counts skipped samples and logs each skipped file once, with its reason.

    Counts are per process: a DataLoader worker increments its own copy. Batches made by
    :func:`collate_samples` / :func:`collate_train` carry their skips so the main process can sum them.
    """

    count: int = 0
    reasons: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, reason: str) -> None:
        """Record one skipped sample `name` (file, key or shard) because of `reason`."""
        self.count += 1
        if name not in self.reasons:
            self.reasons[name] = reason
            logger.warning("skipping %s: %s", name, reason)

    def add_batch(self, num_skipped: int) -> None:
        """Add skips reported by a batch made in another process (names unknown here)."""
        self.count += int(num_skipped)

    @property
    def files(self) -> list[str]:
        """Sorted names of every file skipped at least once in this process."""
        return sorted(self.reasons)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: `{"skipped": n, "files": {name: reason}}`."""
        return {"skipped": self.count, "files": dict(sorted(self.reasons.items()))}


# Files already logged by the collate functions of this process (they have no dataset counter).
_LOGGED: set[str] = set()


def resolve_image(item: Sample | None, counter: SkipCounter | None = None) -> Sample | None:
    """The sample with its image decoded, or None (counted, logged once) if it cannot be used."""
    if item is None:
        return None
    try:
        item.image  # noqa: B018 - decodes a LazySample
    except LexVLAError as err:
        _skip(item.path or item.key, str(err), counter)
        return None
    return item


def _skip(name: str, reason: str, counter: SkipCounter | None) -> None:
    if counter is not None:
        counter.add(name, reason)
    elif name not in _LOGGED:
        _LOGGED.add(name)
        logger.warning("skipping %s: %s", name, reason)


@dataclass
class SampleBatch:
    """Samples that survived collation and how many were dropped (None or undecodable)."""

    samples: list[Sample]
    num_skipped: int

    def __len__(self) -> int:
        return len(self.samples)


def collate_samples(
    items: Sequence[Sample | None], counter: SkipCounter | None = None
) -> SampleBatch:
    """DataLoader `collate_fn` that drops None / undecodable samples and counts them in the batch."""
    kept = [resolve_image(item, counter) for item in items]
    samples = [s for s in kept if s is not None]
    return SampleBatch(samples, len(items) - len(samples))


def collate_train(
    samples: Sequence[Sample | None],
    processor: ImageProcessor,
    rng: np.random.Generator | None = None,
    counter: SkipCounter | None = None,
) -> tuple[Tensor, list[str], list[str], int]:
    """Preprocess a training batch: one random caption per image.

    Samples that are None, cannot be decoded or have no caption are dropped and counted.

    Args:
        samples: dataset items (decoded or lazy samples, or None for a skipped item).
        processor: resize / crop / normalise to the vision tower's input.
        rng: draws the caption of each image; None takes the first caption. With DataLoader workers,
            give each worker its own generator (every worker receives a copy of this one).
        counter: optional counter of this process to record the skipped files in.

    Returns:
        `(pixel_values (B, 3, S, S), captions (B,), keys (B,), num_skipped)`.
    """
    pixels: list[Tensor] = []
    captions: list[str] = []
    keys: list[str] = []
    for item in samples:
        sample = resolve_image(item, counter)
        if sample is None:
            continue
        if not sample.captions:
            _skip(sample.path or sample.key, "no caption", counter)
            continue
        try:
            pixels.append(processor.to_tensor(processor.resize_crop(load_image(sample.image))))
        except LexVLAError as err:
            _skip(sample.path or sample.key, str(err), counter)
            continue
        choice = 0 if rng is None else int(rng.integers(len(sample.captions)))
        captions.append(sample.captions[choice])
        keys.append(sample.key)
    side = processor.image_size
    stacked = torch.stack(pixels) if pixels else torch.empty(0, 3, side, side)
    return stacked, captions, keys, len(samples) - len(keys)
