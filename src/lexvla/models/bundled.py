"""Trained checkpoints shipped inside the package, addressable by name (`create_model("flickr8k")`).

Each name maps to a checkpoint folder under `lexvla/resources/` (config.json, model.safetensors,
vocab.json, README.md model card); the folders are package data, so a wheel carries them. Only the
trained parts are in a folder: the frozen backbones it names come from `lexvla assets prepare`.
No torch import here: `lexvla presets` lists these names cheaply.
"""

from __future__ import annotations

from pathlib import Path

from lexvla.errors import LexVLAError

RESOURCES = Path(__file__).resolve().parents[1] / "resources"

# name -> (folder under lexvla/resources, one-line description)
BUNDLED_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "flickr8k": (
        "flickr8k-head",
        "small-offline trained on Flickr8k's train split: frozen DINOv2-S + SmolLM2-135M (from "
        "`lexvla assets prepare`), trained heads shipped with lexvla",
    ),
}


def list_bundled_checkpoints() -> dict[str, str]:
    """Names of the checkpoints bundled with lexvla, with one-line descriptions."""
    return {name: description for name, (_, description) in BUNDLED_CHECKPOINTS.items()}


def is_bundled_checkpoint(name: object) -> bool:
    return isinstance(name, str) and name in BUNDLED_CHECKPOINTS


def bundled_checkpoint_path(name: str) -> Path:
    """Where bundled checkpoint `name` lives (whether or not its files are there)."""
    if name not in BUNDLED_CHECKPOINTS:
        raise LexVLAError(
            f"unknown bundled checkpoint '{name}': use one of {', '.join(BUNDLED_CHECKPOINTS)}"
        )
    return RESOURCES / BUNDLED_CHECKPOINTS[name][0]


def bundled_checkpoint_available(name: str) -> bool:
    folder = bundled_checkpoint_path(name)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def bundled_checkpoint_dir(name: str) -> Path:
    """The folder of bundled checkpoint `name`; a LexVLAError naming what to do when it is missing."""
    folder = bundled_checkpoint_path(name)
    if not bundled_checkpoint_available(name):
        raise LexVLAError(
            f"the bundled checkpoint '{name}' is missing: {folder} has no config.json and "
            "model.safetensors. Reinstall lexvla from a complete checkout or wheel, or train a "
            "model (lexvla train --preset small-offline --data ... --out RUN) and pass --model RUN"
        )
    return folder
