"""`create_model`: one entry point from a preset name, a bundled checkpoint's name, a run folder or a
checkpoint folder to a model.

Names are looked up first (presets, then :data:`BUNDLED_CHECKPOINTS`), then paths: a folder that
shares a name with them is reached as `./NAME`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lexvla.config import apply_overrides
from lexvla.errors import LexVLAError
from lexvla.models.bundled import BUNDLED_CHECKPOINTS, bundled_checkpoint_dir
from lexvla.models.lexvla import LexVLA
from lexvla.presets import get_preset, list_presets

_STEP_DIR = re.compile(r"step_(\d+)")


def resolve_checkpoint_dir(path: str | Path) -> Path | None:
    """The checkpoint folder behind `path`: itself, `path/model` (a finished run) or the latest
    `path/checkpoints/step_N` (a run in progress). None when `path` holds none of these."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    if (path / "model" / "model.safetensors").is_file():
        return path / "model"
    steps = [p for p in (path / "checkpoints").glob("step_*") if _STEP_DIR.fullmatch(p.name)]
    steps = [p for p in steps if (p / "model.safetensors").is_file()]
    if steps:
        return max(steps, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))
    return None


def create_model(
    name_or_path: str | Path = "small-offline",
    *,
    device: torch.device | str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> LexVLA:
    """Build a LexVLA model from a preset name, a bundled checkpoint, a run or a checkpoint folder.

    Args:
        name_or_path: a preset (`tiny`, `small-offline`, `paper`), a bundled checkpoint
            (`flickr8k`: :data:`BUNDLED_CHECKPOINTS`), a run folder (`lexvla train --out`) or a
            checkpoint folder (`save_pretrained`).
        device: target device; `"meta"` builds the architecture without loading weights.
        overrides: dotted `key=value` overrides of the model config (presets only), e.g.
            `["lexical.vocab_rule=word-start"]`.
    """
    name = str(name_or_path)
    if name in list_presets():
        cfg = get_preset(name).model
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        return LexVLA(cfg, device=device)
    checkpoint = (
        bundled_checkpoint_dir(name)
        if name in BUNDLED_CHECKPOINTS
        else resolve_checkpoint_dir(name)
    )
    if checkpoint is not None:
        if overrides:
            raise LexVLAError("config overrides apply to presets only, not to a trained checkpoint")
        return LexVLA.from_pretrained(checkpoint, device=device)
    if Path(name).exists():
        raise LexVLAError(
            f"{name} is neither a run folder nor a checkpoint (no model.safetensors found)"
        )
    raise LexVLAError(
        f"unknown model '{name}': give a preset ({', '.join(list_presets())}), a bundled checkpoint "
        f"({', '.join(BUNDLED_CHECKPOINTS)}), a run folder or a checkpoint folder"
    )
