"""LexVLA: images and texts as sparse, non-negative vectors over one vocabulary (the LLM's words).

Follows open_clip's API (`encode_image`, `encode_text`, a dict `forward`) and Hugging Face's
(`save_pretrained`, `from_pretrained`). Checkpoints store only what is trained (adapter, image
codebook, LoRA, temperature) in safetensors, plus `config.json`, `vocab.json` and a model card; the frozen
backbones are referenced by hub name, local path or `offline:NAME`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lexvla.config import ModelConfig
from lexvla.data.transforms import ImageProcessor
from lexvla.errors import LexVLAError
from lexvla.layers.lexical import SparseLexical, sparsify, to_sparse
from lexvla.models.serialization import (
    WEIGHTS,
    CheckpointFiles,
    check_vocab,
    load_trained_weights,
    local_folder,
    model_card,
    read_checkpoint_config,
    save_checkpoint_files,
)
from lexvla.models.text import TextTower
from lexvla.models.tokenizer import load_tokenizer
from lexvla.models.vision import VisionTower
from lexvla.vocab import LexicalVocabulary

logger = logging.getLogger(__name__)

ImageInput = Tensor | Image.Image | str | Path | Sequence[Image.Image | str | Path]


@dataclass
class ImageEncoding:
    """Output of `encode_image`."""

    image_weights: Tensor  # (B, V) L2-normalised, non-negative
    patch_weights: Tensor | None = None  # (B, P, V) per-patch, each L2-normalised; on request


@dataclass
class TextEncoding:
    """Output of `encode_text`."""

    text_weights: Tensor  # (B, V) L2-normalised, non-negative


def _trainable_part(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if ".adapter." in name:
        return "adapter"
    if name.startswith("text.head."):
        return "text_head"
    if ".affine." in name:
        return "logit_affine"
    if name.startswith("vision.codebook"):
        return "image_codebook"
    return {"logit_scale": "logit_scale"}.get(name, "other")


def _finite(weights: Tensor, modality: str) -> Tensor:
    """`weights`, or an error when a vector holds NaN or inf (an empty answer would hide it)."""
    bad = ~torch.isfinite(weights).all(dim=-1)
    if bool(bad.any()):
        raise LexVLAError(
            f"the model's {modality} vectors are not finite (NaN or inf) for {int(bad.sum())} of "
            f"{len(bad)} inputs: its weights are damaged or its training diverged; use another "
            "checkpoint"
        )
    return weights


def random_patches(features: Tensor, keep: float) -> Tensor:
    """A random subset of `round(keep · P)` (at least 1) patches of each image: (B, P, D) -> (B, K, D),
    drawn from torch's default generator (seeded per step by the trainer)."""
    B, P, D = features.shape
    count = max(1, round(keep * P))
    chosen = torch.rand(B, P, device=features.device).argsort(dim=1)[:, :count]  # (B, K)
    return features.gather(1, chosen[..., None].expand(B, count, D))


class LexVLA(nn.Module):
    """The LexVLA model. Build it with :func:`lexvla.create_model` or `LexVLA(ModelConfig(...))`.

    Args:
        cfg: the model configuration.
        device: where to build; ``torch.device("meta")`` builds the architecture without weights.
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else None
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.text.tokenizer or cfg.text.backbone)
        self.vocab = LexicalVocabulary.from_tokenizer(self.tokenizer, cfg.lexical.vocab_rule)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # same random towers, LoRA and adapter on every build
            self.text = TextTower(
                cfg.text,
                self.tokenizer,
                self.vocab,
                cfg.lexical,
                device=device,
            )
            # Both codebooks start from the same (centred) LM-head rows; only the image one is trained.
            self.vision = VisionTower(cfg.vision, cfg.lexical, self.text.codebook.detach(), device)
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(cfg.logit_scale_init), device=self.text.codebook.device)
        )  # shaped [1] so FSDP2 can shard it
        self.image_processor = ImageProcessor(
            cfg.vision.image_size, cfg.vision.resize_size, cfg.vision.mean, cfg.vision.std
        )
        if device is not None and device.type != "meta":
            self.to(device)

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> Tensor:
        """The contrastive temperature's inverse, `exp(logit_scale)` clamped to `logit_scale_max`. [1]"""
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)

    # ----------------------------------------------------------------------------------- encoding
    def preprocess(self, images: ImageInput, *, crop: bool = True) -> Tensor:
        """PIL images or paths -> (B, 3, S, S) pixels for this model's vision tower."""
        if isinstance(images, Tensor):
            return images
        return self.image_processor(images, crop=crop)

    def encode_image_features(self, images: ImageInput, *, crop: bool = True) -> Tensor:
        """Frozen backbone patch features (cacheable): images -> (B, P, Dv)."""
        pixels = self.preprocess(images, crop=crop).to(self.device)
        return self.vision.forward_features(pixels)

    def encode_image(
        self,
        images: ImageInput,
        *,
        return_patches: bool = False,
        features: Tensor | None = None,
        crop: bool = True,
    ) -> ImageEncoding:
        """Images (PIL, paths, or a preprocessed (B, 3, S, S) tensor) -> lexical weights.

        Args:
            images: the images; ignored when `features` (cached backbone outputs) are given.
            return_patches: also return per-patch weights (B, P, V).
            features: precomputed backbone patch features (B, P, Dv).
            crop: centre-crop (True) or resize the whole image to the square input (PatchDis).
        """
        with self.vision.inference_autocast(self.device):  # bf16 where configured (inference)
            if features is None:
                features = self.encode_image_features(images, crop=crop)
            image_weights, patch_weights = self.vision(features.to(self.device), return_patches)
        return ImageEncoding(_finite(image_weights, "image"), patch_weights)

    def encode_text(self, texts: str | Sequence[str]) -> TextEncoding:
        """Captions -> (B, V) lexical weights through the in-context prompt."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return TextEncoding(_finite(self.text(self.text.forward_features(texts), texts), "text"))

    def forward(
        self,
        pixel_values: Tensor | None = None,
        texts: Sequence[str] | None = None,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
        patch_keep: float = 1.0,
    ) -> dict[str, Tensor]:
        """Training forward: `{"image_weights", "text_weights", "logit_scale"}` for the objective, and
        the activations before L2 normalisation (`image_activations`, `text_activations`).

        Args:
            pixel_values: (B, 3, S, S) images, or `image_features` (B, P, Dv) cached backbone outputs.
            texts: B captions, or `text_features` (B, D) cached last-token states of a frozen LLM
                (give the captions too when `model.text.input_words_weight` > 0).
            patch_keep: share of each image's patches the heads see (a random subset per image, as
                FLIP masks patches: the pool's cost falls in proportion); 1: all of them.
        """
        out: dict[str, Tensor] = {"logit_scale": self.scale()}
        if image_features is None and pixel_values is not None:
            image_features = self.vision.forward_features(pixel_values.to(self.device))
        if image_features is not None and patch_keep < 1.0:
            image_features = random_patches(image_features, patch_keep)
        if image_features is not None:
            activations = self.vision.activations(image_features.to(self.device))  # (B, V)
            out["image_activations"] = activations
            out["image_weights"] = F.normalize(activations, dim=-1)
        if text_features is None and texts is not None:
            text_features = self.text.forward_features(list(texts))
        if text_features is not None:
            activations = self.text.activations(text_features.to(self.device), texts)  # (B, V)
            out["text_activations"] = activations
            out["text_weights"] = F.normalize(activations, dim=-1)
        return out

    def set_image_inference_dtype(self, name: str) -> None:
        """Encode images in `name` precision from now on ("float32" | "bfloat16" | "auto": bf16 where
        native; `model.vision.inference_dtype`). Training is not affected."""
        vision = dataclasses.replace(self.cfg.vision, inference_dtype=name)  # checked: LexVLAError
        self.cfg = dataclasses.replace(self.cfg, vision=vision)
        self.vision.cfg = vision

    # ----------------------------------------------------------------------------------- sparsity
    def sparsify(self, weights: Tensor, *, mode: str | None = None, max_words: int = 0) -> Tensor:
        """The configured inference sparsification (threshold 1/sqrt(V) by default); not re-normalised."""
        lex = self.cfg.lexical
        return sparsify(
            weights,
            mode or lex.sparsify,
            threshold=lex.threshold,
            top_k=lex.top_k,
            max_words=max_words,
        )

    def to_sparse(
        self, weights: Tensor, *, mode: str | None = None, max_words: int = 0
    ) -> SparseLexical:
        """Sparsified weights in CSR form (indices + values)."""
        return to_sparse(self.sparsify(weights, mode=mode, max_words=max_words))

    def top_words(
        self, weights: Tensor, k: int = 20, *, merge_pieces: bool = False
    ) -> list[list[tuple[str, float]]]:
        """The `k` heaviest words of each (B, V) vector, as (word, weight) pairs, heaviest first.

        With `merge_pieces`, the forms of one word count as one (their weights summed, shown as the
        word): a continuation piece ("##dog": after the prompt's opening quote the LLM predicts that
        form) and a plural ("dogs"), by `LexicalVocabulary.word_groups`.
        """
        words = self.vocab.words
        weights = weights.float()
        if merge_pieces:
            groups, words = self.vocab.word_groups()
            index = torch.tensor(groups, device=weights.device)
            weights = weights.new_zeros(weights.shape[0], len(words)).index_add_(1, index, weights)
        values, ids = weights.topk(min(k, weights.shape[-1]), dim=-1)
        return [
            [(words[i], float(v)) for i, v in zip(row_ids.tolist(), row_vals.tolist()) if v > 0]
            for row_ids, row_vals in zip(ids, values)
        ]

    # ----------------------------------------------------------------------------------- training
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything that is trained (adapter, image codebook, LoRA, scale)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def num_trainable(self) -> dict[str, int]:
        """Trainable parameter counts by part."""
        counts = {"adapter": 0, "image_codebook": 0, "lora": 0, "logit_scale": 0}
        counts.update(text_head=0, logit_affine=0)
        for name, p in self.trainable_parameters().items():
            part = _trainable_part(name)
            counts[part] = counts.get(part, 0) + p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the LLM's activations in the backward pass (memory for time)."""
        llm = self.text.llm
        kwargs = {"use_reentrant": False}
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5: the old name warns
            if enable:
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.activation_checkpointing_disable()
        elif enable:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            llm.gradient_checkpointing_disable()

    # ----------------------------------------------------------------------------------- persistence
    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write config.json, model.safetensors (trained weights, in `dtype` if given), vocab.json and
        README.md atomically."""
        tensors = None
        if dtype is not None:
            tensors = {k: v.detach().to(dtype) for k, v in self.trainable_parameters().items()}
        return save_checkpoint_files(path, self.checkpoint_files(tensors))

    def checkpoint_files(self, tensors: dict[str, Tensor] | None = None) -> CheckpointFiles:
        """What a checkpoint of this model holds; `tensors` overrides the trained parameters (e.g.
        whole tensors gathered from FSDP shards)."""
        if tensors is None:
            tensors = self.trainable_parameters()
        card = model_card(self.cfg, self.vocab_size, self.num_trainable())
        return CheckpointFiles(self.cfg, self.vocab, tensors, card)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: torch.device | str | None = None
    ) -> LexVLA:
        """Load a model saved by `save_pretrained` (a local folder, or a hub repository name)."""
        folder = local_folder(path)
        model = cls(read_checkpoint_config(folder))
        check_vocab(model.vocab, folder)
        load_trained_weights(model.trainable_parameters(), folder / WEIGHTS)
        return model.to(device) if device is not None else model
