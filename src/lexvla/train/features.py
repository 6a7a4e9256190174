"""Frozen-feature caches: run a frozen tower once per input, not once per epoch.

With a frozen DINOv2 the backbone output of an image never changes, yet it costs about as much as the
trained heads. `ImageFeatureCache` stores it on disk keyed by (backbone + preprocessing fingerprint,
hash of the preprocessed pixels) in safetensors files, with an in-memory layer on top. `TextFeatureCache`
does the same in memory for captions when the text tower has nothing to train (no LoRA).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def module_fingerprint(module: nn.Module, extra: object = None) -> str:
    """A short hash of a module's parameter shapes and a cheap checksum of their values plus `extra`."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().float().flatten()
            stats = (
                name,
                tuple(tensor.shape),
                float(flat.sum()),
                float(flat[:: max(1, flat.numel() // 64)].sum()),
            )
            digest.update(repr(stats).encode())
    return digest.hexdigest()[:16]


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
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            save_file({"features": features}, str(tmp))
            os.replace(tmp, path)  # readers never see a half-written file

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
