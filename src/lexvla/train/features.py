"""Frozen-feature caches: run a frozen tower once per input, not once per epoch.

With a frozen DINOv2 the backbone output of an image never changes, yet it costs about as much as the
trained heads. `ImageFeatureCache` stores it on disk keyed by (backbone + preprocessing fingerprint,
hash of the preprocessed pixels) in safetensors files, with an in-memory layer on top. `TextFeatureCache`
does the same in memory for captions when the text tower has nothing to train (no LoRA).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lexvla._atomic import atomic_file
from lexvla._fingerprint import weights_fingerprint
from lexvla.config import FEATURE_CACHE_COMPUTE
from lexvla.errors import LexVLAError
from lexvla.layers.lexical import bf16_autocast, wants_bf16

logger = logging.getLogger(__name__)


def module_fingerprint(module: nn.Module, extra: object = None) -> str:
    """The cheap fingerprint (:func:`lexvla._fingerprint.weights_fingerprint`) of a module's state dict
    plus `extra` (e.g. the preprocessing): the key of a frozen tower's feature cache."""
    return weights_fingerprint(module.state_dict().items(), extra)


def pixels_key(pixels: Tensor) -> str:
    """Content hash of one preprocessed image (3, S, S)."""
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class ImageFeatureCache:
    """Disk + memory cache of backbone patch features, one safetensors file per image.

    Args:
        root: cache folder (a subfolder per backbone fingerprint is created).
        fingerprint: identifies backbone weights and preprocessing; different values never mix.
        memory: also keep features in RAM (fast epochs on small datasets).
    """

    def __init__(self, root: Path | None, fingerprint: str, memory: bool = True) -> None:
        self.folder = Path(root) / fingerprint if root is not None else None
        self.memory: dict[str, Tensor] | None = {} if memory else None
        self.hits = 0
        self.misses = 0
        self.shape: tuple[int, ...] | None = None  # (P, Dv) of features computed by this cache

    def _file(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def _lookup(self, key: str) -> Tensor | None:
        if self.memory is not None and key in self.memory:
            return self.memory[key]
        if self.folder is None or not self._file(key).is_file():
            return None
        try:
            features = load_file(str(self._file(key)))["features"]
            if not features.is_floating_point():
                raise KeyError("features")
        except (SafetensorError, OSError, KeyError):
            logger.warning("discarding unreadable cached features %s", self._file(key))
            return None
        if self.memory is not None:
            self.memory[key] = features
        return features

    def _store(self, key: str, features: Tensor) -> None:
        features = features.detach().cpu().contiguous()
        if self.memory is not None:
            self.memory[key] = features
        if self.folder is not None:
            path = self._file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:  # readers never see a half-written file
                save_file({"features": features}, str(tmp))

    def get(self, pixels: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """Features of a batch (B, 3, S, S) -> (B, P, Dv), computing only the missing ones."""
        keys = [pixels_key(p) for p in pixels]
        found = [self._lookup(k) for k in keys]
        computed = 0
        for _ in range(
            2
        ):  # a second pass recomputes cached features of a shape the first showed wrong
            found = self._usable(found)
            missing = [i for i, f in enumerate(found) if f is None]
            if not missing:
                break
            with torch.no_grad():
                features = compute(pixels[missing]).detach().cpu()  # (M, P, Dv)
            self.shape = tuple(features.shape[1:])
            for i, row in zip(missing, features):
                self._store(keys[i], row)
                found[i] = row
            computed += len(missing)
        self.hits += len(keys) - computed
        self.misses += computed
        return torch.stack(found)  # type: ignore[arg-type]

    def _usable(self, found: list[Tensor | None]) -> list[Tensor | None]:
        """Drop cached features of another shape than this cache computes (a damaged or planted
        file): they are recomputed. Before anything was computed, a batch must agree with itself."""
        shapes = {tuple(f.shape) for f in found if f is not None}
        if (self.shape is None and len(shapes) <= 1) or shapes <= {self.shape}:
            return found
        logger.warning("discarding cached features of an unexpected shape %s", sorted(shapes))
        return [f if f is not None and tuple(f.shape) == self.shape else None for f in found]


class TextFeatureCache:
    """In-memory cache of frozen text-tower features per caption string."""

    def __init__(self) -> None:
        self.memory: dict[str, Tensor] = {}

    def get(self, captions: Sequence[str], compute: Callable[[list[str]], Tensor]) -> Tensor:
        """(B,) captions -> (B, D) features, computing only the unseen ones."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.memory))
        if missing:
            with torch.no_grad():
                computed = compute(missing).detach().cpu()
            self.memory.update(zip(missing, computed))
        return torch.stack([self.memory[c] for c in captions])


# ------------------------------------------------------------------------------ precomputed tables
class FeatureTable:
    """Frozen features of a fixed list of inputs, computed once and kept under the cache.

    A map-style dataset is known in advance, so its frozen features are computed in one pass before
    training (with progress) rather than on first use: training steps then only index a tensor, never
    decode an image or run a frozen tower. The pass writes chunk files
    (`folder/chunk_000000.safetensors`, `features` (n, ...) and `ok` (n,) uint8) atomically, so an
    interrupted pass resumes at the first missing chunk, and a second run with the same frozen model
    and data reads the table without computing anything. An input whose encoding raises
    :class:`LexVLAError` (an undecodable image) gets a zero row and `ok = 0`: skipped and counted.

    Attributes:
        features: (N, ...) the table, in `dtype`.
        ok: (N,) bool, False where the input could not be encoded.
    """

    def __init__(self, features: Tensor, ok: Tensor, folder: Path | None = None) -> None:
        self.features = features
        self.ok = ok
        self.folder = folder

    def __len__(self) -> int:
        return len(self.ok)

    @property
    def failed(self) -> list[int]:
        return torch.nonzero(~self.ok).flatten().tolist()

    @classmethod
    def build(
        cls,
        folder: Path,
        count: int,
        encode: Callable[[range], tuple[Tensor, Tensor]],
        *,
        chunk: int = 512,
        dtype: torch.dtype = torch.float16,
        progress: Callable[[int, int], None] | None = None,
    ) -> FeatureTable:
        """Load or compute the table of `count` inputs.

        Args:
            folder: where the chunks live (name it by a fingerprint of the frozen model and the data).
            count: number of inputs.
            encode: `encode(range)` -> (features (n, ...), ok (n,) bool) of inputs `range`.
            chunk: inputs per chunk file.
            dtype: storage dtype of the features.
            progress: called as `progress(done, count)` after each chunk.
        """
        folder.mkdir(parents=True, exist_ok=True)
        parts, oks = [], []
        for number, start in enumerate(range(0, count, chunk)):
            span = range(start, min(count, start + chunk))
            path = folder / f"chunk_{number:06d}.safetensors"
            loaded = _read_chunk(path, len(span))
            if loaded is None:
                features, ok = encode(span)
                loaded = (features.detach().to("cpu", dtype).contiguous(), ok.to(torch.uint8))
                _write_chunk(path, *loaded)
            parts.append(loaded[0])
            oks.append(loaded[1].bool())
            if progress is not None:
                progress(span.stop, count)
        if not parts:
            raise ValueError("a feature table needs at least one input")
        return cls(torch.cat(parts), torch.cat(oks), folder)


def _read_chunk(path: Path, rows: int) -> tuple[Tensor, Tensor] | None:
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        features, ok = tensors["features"], tensors["ok"]
        if len(features) != rows or len(ok) != rows or not features.is_floating_point():
            raise KeyError("shape")
    except (SafetensorError, OSError, KeyError):
        logger.warning("recomputing the unreadable feature chunk %s", path)
        return None
    return features, ok


def _write_chunk(path: Path, features: Tensor, ok: Tensor) -> None:
    with atomic_file(path) as tmp:  # a reader never sees half a chunk; a full disk: DiskFullError
        save_file({"features": features, "ok": ok}, str(tmp))


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of a map-style dataset's keys, file contents and captions.

    Files count by their bytes, not their path or modification time: the same images named from
    another working directory, copied elsewhere or touched share one cache, and changed bytes never
    reuse it. Reading them costs a fraction of decoding them once."""
    digest = hashlib.sha256()
    records = getattr(dataset, "records", None)
    items = records if records is not None else (dataset[i] for i in range(len(dataset)))
    for item in items:
        if item is None:
            digest.update(b"\0none\0")
            continue
        path = str(getattr(item, "path", "") or "")
        content = _file_digest(path) if path and os.path.isfile(path) else None
        identity = (item.key, content, list(item.captions))
        digest.update(json.dumps(identity, default=str).encode())
    return digest.hexdigest()[:16]


def _file_digest(path: str) -> str:
    """blake2b of a file's bytes (16 hex digits)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, lambda: hashlib.blake2b(digest_size=8)).hexdigest()


class _Progress:
    """`progress(done, total)` for FeatureTable.build: a tqdm bar, or nothing."""

    def __init__(self, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit="item", disable=not enabled, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def image_feature_table(
    model: Any,
    dataset: Any,
    root: Path,
    *,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float16,
    compute: str = "float32",
    progress: bool = True,
) -> FeatureTable:
    """Frozen backbone patch features of every image of a map-style dataset: rows (N, P, Dv).

    `model` is a LexVLA; the table lives under `root/image-<backbone, preprocessing, data>` (plus the
    precision when bf16) and is computed only where it is missing. `compute` ("float32", "bfloat16",
    "auto": bf16 where native) is the precision the backbone runs at (`train.feature_cache_compute`).
    An undecodable image gets `ok = False`.
    """
    vision = model.cfg.vision
    preprocessing = [vision.image_size, vision.resize_size, vision.mean, vision.std]
    device = model.device
    compute = _resolve_compute(compute, device)
    key = [preprocessing, dataset_fingerprint(dataset)] + _compute_key(compute)
    name = module_fingerprint(model.vision.backbone, key)
    shape: list[tuple[int, ...]] = []

    def encode(span: range) -> tuple[Tensor, Tensor]:
        pixels, ok = [], []
        for index in span:
            sample = dataset[index]
            try:
                if sample is None:
                    raise LexVLAError(f"image {index} cannot be read")
                pixels.append(model.image_processor([sample.image])[0])
                ok.append(True)
            except LexVLAError as err:
                logger.warning("skipping unreadable image %s: %s", index, err)
                ok.append(False)
        with bf16_autocast(compute, device):
            good = [
                _frozen(
                    model.vision.forward_features, torch.stack(pixels[i : i + batch_size]), device
                )
                for i in range(0, len(pixels), batch_size)
            ]
        if not shape:
            side = model.image_processor.image_size
            probe = (
                good[0]
                if good
                else _frozen(model.vision.forward_features, torch.zeros(1, 3, side, side), device)
            )
            shape.append(tuple(probe.shape[1:]))
        rows = torch.zeros(len(span), *shape[0], dtype=dtype)
        mask = torch.tensor(ok, dtype=torch.bool)
        if good:
            rows[mask] = torch.cat(good).to(dtype)
        return rows, mask

    return FeatureTable.build(
        root / f"image-{name}",
        len(dataset),
        encode,
        chunk=256,
        dtype=dtype,
        progress=_Progress("caching image features", progress),
    )


def text_feature_table(
    model: Any,
    dataset: Any,
    root: Path,
    *,
    batch_size: int = 64,
    compute: str = "float32",
    progress: bool = True,
) -> tuple[FeatureTable, Tensor]:
    """Frozen-LLM features of every caption of a map-style dataset: (table (N_captions, D),
    offsets (N + 1,)): image i's captions are rows `offsets[i]` to `offsets[i + 1]`.

    `compute` that means bf16 on the model's device ("bfloat16", or "auto" where bf16 is native) runs
    the LLM's packed inference path with bf16 weights (`TextTower.frozen_inference`) and is part of
    the table's key; otherwise the float32 tables are made and shared."""
    captions: list[str] = []
    offsets = [0]
    for index in range(len(dataset)):
        sample = dataset[index]
        captions.extend(sample.captions if sample is not None else [])
        offsets.append(len(captions))
    text = model.cfg.text
    device = model.device
    compute = _resolve_compute(compute, device)
    settings = [
        text.prompt,
        text.max_caption_tokens,
        hashlib.sha256("\0".join(captions).encode()).hexdigest(),
    ] + _compute_key(compute)
    name = module_fingerprint(model.text.llm, settings)

    def encode(span: range) -> tuple[Tensor, Tensor]:
        # Batches of captions of near-equal length: a batch is padded to its longest prompt, which in
        # dataset order costs Flickr8k 1.66x the real tokens, sorted 1.03x.
        lengths = model.text.prompt_lengths(captions[span.start : span.stop])
        order = sorted(range(len(span)), key=lengths.__getitem__)
        with _text_precision(model, compute):
            parts = [
                _frozen(
                    model.text.forward_features,
                    [captions[span.start + i] for i in order[j : j + batch_size]],
                    device,
                )
                for j in range(0, len(order), batch_size)
            ]
        rows = parts[0].new_empty(len(span), *parts[0].shape[1:])  # (n, D) in dataset order
        rows[torch.tensor(order)] = torch.cat(parts)
        return rows, torch.ones(len(span), dtype=torch.bool)

    if not captions:
        raise LexVLAError("the training data has no caption")
    table = FeatureTable.build(
        root / f"text-{name}",
        len(captions),
        encode,
        chunk=2048,
        dtype=torch.float32,
        progress=_Progress("caching caption features", progress),
    )
    return table, torch.tensor(offsets)


def _resolve_compute(compute: str, device: torch.device) -> str:
    """A `train.feature_cache_compute` choice as what runs on `device`: "bfloat16" or "float32"
    ("auto" is bf16 only where it is native), so "auto" without native bf16 is exactly float32 and
    shares its tables."""
    if compute not in FEATURE_CACHE_COMPUTE:
        raise LexVLAError(
            f"feature cache compute {compute!r}: use one of {', '.join(FEATURE_CACHE_COMPUTE)}"
        )
    return "bfloat16" if wants_bf16(compute, device) else "float32"


def _compute_key(compute: str) -> list[str]:
    """What a resolved compute adds to a table's key: nothing for "float32" (the tables made before
    the option existed stay valid)."""
    return [] if compute == "float32" else [f"compute={compute}"]


def _text_precision(model: Any, compute: str) -> contextlib.AbstractContextManager:
    """The text tower's packed inference path in bf16 for caching; "float32" keeps the
    training-mode forward the tables were always made with."""
    if compute == "float32":
        return contextlib.nullcontext()
    return model.text.frozen_inference(compute)


def _frozen(forward: Callable[[Any], Tensor], inputs: Any, device: torch.device) -> Tensor:
    with torch.no_grad():
        if isinstance(inputs, Tensor):
            inputs = inputs.to(device)
        return forward(inputs).detach().cpu()
