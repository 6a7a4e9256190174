"""Resolve a run's ExperimentConfig from a preset, a config file, data flags and overrides."""

from __future__ import annotations

from pathlib import Path

from lexvla.config import ExperimentConfig, apply_overrides, load_config
from lexvla.presets import get_preset


def experiment_config(
    preset: str,
    *,
    config: Path | None = None,
    data: str | None = None,
    images: Path | None = None,
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """Preset (or `config` file) < `--data/--images` < `--set` overrides."""
    cfg = load_config(ExperimentConfig, config) if config else get_preset(preset)
    flags = {}
    if data is not None:
        flags["data.path"] = data
    if images is not None:
        flags["data.images"] = str(images)
    if flags:
        cfg = apply_overrides(cfg, flags)
    return apply_overrides(cfg, overrides or [])
