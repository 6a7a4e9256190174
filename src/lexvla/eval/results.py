"""Evaluation results: a JSON result that says which model, data, settings and library versions made it.

Every evaluation (`lexvla eval ...`) writes its result with :func:`write_report`. The file holds the
result's own keys at the top level (e.g. `image_to_text/R@1`) plus

- `model`: `{"ref": "small-offline", "fingerprint": "…", "vocab_size": V, "vocab_fingerprint": "…"}`,
- `data`: what was evaluated (path, number of images/texts, …),
- `settings`: every option that changes the numbers (sparsification, threshold, batch size, …),
- `versions`: python, lexvla, torch, transformers, numpy, …, and `created` (UTC, ISO 8601).

The write is atomic (temporary file + rename), so a reader never sees a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lexvla._atomic import atomic_write_text
from lexvla._fingerprint import weights_fingerprint

logger = logging.getLogger(__name__)

_VERSIONED = ("lexvla", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pillow")
RESERVED_KEYS = ("model", "data", "settings", "versions", "created")


def library_versions() -> dict[str, str]:
    """Python and the versions of the libraries that influence the numbers."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash identifying a model's config, vocabulary and weights (16 hex digits).

    The cheap :func:`lexvla._fingerprint.weights_fingerprint` of the state dict with the config (when
    the model has `cfg`) and the vocabulary fingerprint (when it has `vocab`) as `extra`: two models with
    the same fingerprint give the same encodings. Costs one pass over the weights (~0.1 s for 160M).
    """
    cfg = getattr(model, "cfg", None)
    head = {"cfg": _jsonable(cfg) if cfg is not None else type(model).__name__}
    vocab = getattr(model, "vocab", None)
    if vocab is not None and hasattr(vocab, "fingerprint"):
        head["vocab"] = vocab.fingerprint()
    return weights_fingerprint(model.state_dict().items(), head)


def model_info(model: torch.nn.Module, model_ref: str | None = None) -> dict[str, Any]:
    """`{"ref", "fingerprint", "vocab_size", "vocab_fingerprint"}` of a model for a report."""
    info: dict[str, Any] = {"ref": model_ref, "fingerprint": model_fingerprint(model)}
    vocab = getattr(model, "vocab", None)
    if vocab is not None:
        info["vocab_size"] = len(vocab)
        if hasattr(vocab, "fingerprint"):
            info["vocab_fingerprint"] = vocab.fingerprint()
    return info


def _jsonable(value: Any) -> Any:
    """Plain JSON types: dataclasses, paths, tensors, numpy scalars, NaN (as null) and tuples."""
    import dataclasses

    import numpy as np

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray | np.generic):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | bytes):
        return value if isinstance(value, str) else value.decode(errors="replace")
    if isinstance(value, Sequence | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def build_report(
    result: Mapping[str, Any],
    *,
    model_ref: str | Mapping[str, Any],
    data: Any,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The report dict: `result`'s keys plus `model`, `data`, `settings`, `versions`, `created`.

    Args:
        result: the evaluation's numbers (top-level keys kept as they are).
        model_ref: what the user named (`"small-offline"`, a run folder), or the dict of
            :func:`model_info` (reference + fingerprint).
        data: a description of the evaluated data (path string or dict).
        settings: every option that changes the numbers.
    """
    clash = sorted(set(result) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"result keys {clash} are reserved for the report's metadata")
    model = dict(model_ref) if isinstance(model_ref, Mapping) else {"ref": str(model_ref)}
    report = dict(result)
    report.update(
        model=model,
        data=data,
        settings=dict(settings),
        versions=library_versions(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    return _jsonable(report)


def write_report(
    path: str | Path,
    result: Mapping[str, Any],
    *,
    model_ref: str | Mapping[str, Any],
    data: Any,
    settings: Mapping[str, Any],
) -> Path:
    """Write :func:`build_report` as indented JSON, atomically; returns the path written.

    NaN values (e.g. a recall with no query) are written as `null` so the file is strict JSON.
    """
    path = Path(path)
    report = build_report(result, model_ref=model_ref, data=data, settings=settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    # readers never see a half-written report
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    logger.info("wrote %s", path)
    return path


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table (columns padded; floats with 2 decimals) for the CLI to print."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.2f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        first, *rest = row
        lines.append(
            "  ".join([first.ljust(widths[0])] + [v.rjust(w) for v, w in zip(rest, widths[1:])])
        )
    return "\n".join(lines)
