"""Weight fingerprints: the one hash of named tensors that caches, reports and corpus folders use.

Two strengths, both 16 hex digits of a sha256:

- cheap (default): per tensor its name, shape, its sum (float64, on a grid relative to the sum of
  magnitudes, so the thread count cannot change it) and the bytes of a strided sample (one pass, about
  0.1 s for 160M weights). Any training step changes it; it keys the frozen-feature caches
  (`train.features.module_fingerprint`) and the evaluation encodings (`eval.results.model_fingerprint`).
- exact: per tensor its name and float32 bytes, so a change of one weight changes it. Corpus folders
  record it for the trained tensors (`search.encode.trained_weights_fingerprint`): vectors of an older
  model are never mixed in.

`extra` (any JSON-able value, `default=str`) is hashed first when given: preprocessing settings, a
config, a vocabulary fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch
from torch import Tensor

SAMPLE_POINTS = 64  # the strided sample of the cheap fingerprint takes about this many values


def weights_fingerprint(
    tensors: Iterable[tuple[str, Tensor]], extra: object = None, *, exact: bool = False
) -> str:
    """16 hex digits of a sha256 over `extra` (as JSON, when not None) and the named tensors in order.

    Args:
        tensors: (name, tensor) pairs, e.g. `module.state_dict().items()`; the order counts.
        extra: settings that change what the weights produce (hashed as sorted-key JSON).
        exact: hash every value (float32 bytes) instead of the cheap statistics. Tensors on the meta
            device (no values) count by name and shape in both modes.
    """
    digest = hashlib.sha256()
    if extra is not None:
        digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in tensors:
            tensor = tensor.detach()
            if tensor.device.type == "meta":
                digest.update(repr((name, tuple(tensor.shape))).encode())
            elif exact:
                digest.update(name.encode())
                digest.update(tensor.float().cpu().contiguous().numpy().tobytes())
            else:
                flat = tensor.float().flatten()
                sample = flat[:: max(1, flat.numel() // SAMPLE_POINTS)]
                stats = (name, tuple(tensor.shape), _quantised_sum(flat))
                digest.update(repr(stats).encode())
                digest.update(sample.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _quantised_sum(flat: Tensor) -> int:
    """The sum of a tensor's values on a grid of 2^-40 of the sum of their magnitudes, in float64:
    the same whatever the number of threads (a parallel sum's order, and so its last bits, depends on
    it), while any change of a weight by more than about 1e-12 of the magnitudes moves it."""
    values = flat.double()
    scale = float(values.abs().sum())
    if scale == 0.0:
        return 0
    return round(float(values.sum()) / scale * 2**40)
