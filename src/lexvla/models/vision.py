"""The vision tower: frozen DINOv2 → trained adapter → trained image codebook → lexical max-pool.

Only this module (with text.py) imports the vision backbone classes of transformers.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model

from lexvla import assets
from lexvla.config import LexicalConfig, VisionConfig
from lexvla.errors import LexVLAError
from lexvla.layers.adapter import Adapter
from lexvla.layers.lexical import (
    LogitAffine,
    bf16_autocast,
    lexical_activation,
    lexical_max_pool,
    lexical_weights,
)
from lexvla.models._quiet import quiet_loading


def build_dinov2(cfg: VisionConfig, device: torch.device | None = None) -> Dinov2Model:
    """DINOv2 from pretrained weights, or randomly initialised from `cfg.arch` (tests, meta device)."""
    on_meta = device is not None and device.type == "meta"
    if cfg.pretrained and not on_meta:
        path = assets.resolve_reference(cfg.backbone)
        try:
            with quiet_loading():
                return Dinov2Model.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise LexVLAError(f"cannot load vision backbone '{cfg.backbone}': {err}") from None
    if not cfg.arch:
        raise LexVLAError(
            f"vision backbone '{cfg.backbone}' is not loaded (pretrained=false or meta device) and "
            "model.vision.arch is empty: give the Dinov2Config fields in model.vision.arch"
        )
    with torch.device(device or "cpu"):
        return Dinov2Model(Dinov2Config(**cfg.arch))


class VisionTower(nn.Module):
    """Image → patch features (frozen) → adapter → patch logits over the vocabulary → image weights.

    Args:
        cfg: vision settings.
        lexical: vocabulary/pooling settings.
        codebook_init: (V, D) initial image codebook (the centred LM-head rows of the kept ids).
        device: where to build (``meta`` builds without weights).
    """

    def __init__(
        self,
        cfg: VisionConfig,
        lexical: LexicalConfig,
        codebook_init: Tensor,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.lexical = lexical
        self.backbone = build_dinov2(cfg, device)
        self.backbone.requires_grad_(not cfg.freeze)
        width = self.backbone.config.hidden_size
        heads = cfg.adapter_heads or self.backbone.config.num_attention_heads
        with torch.device(device or codebook_init.device):
            self.adapter = Adapter(width, codebook_init.shape[1], heads, cfg.adapter_mlp_ratio)
            self.affine = (
                LogitAffine(offset=lexical.logit_offset_init) if lexical.logit_affine else None
            )
        rank = lexical.image_codebook_rank
        if rank > 0:
            # Z_img = Z_init + U·W: the LM-head rows stay as they are (rebuilt with the model, not
            # saved); only the low-rank correction is trained (LoRA's zero-start: U = 0).
            self.register_buffer("codebook_base", codebook_init.clone(), persistent=False)
            self.codebook_u = nn.Parameter(codebook_init.new_zeros(codebook_init.shape[0], rank))
            self.codebook_w = nn.Parameter(
                torch.randn(rank, codebook_init.shape[1], device=codebook_init.device)
                / codebook_init.shape[1] ** 0.5
            )
        else:
            self.codebook = nn.Parameter(codebook_init.clone())  # (V, D), trained

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens that precede the patch tokens."""
        return 1 + int(getattr(self.backbone.config, "num_register_tokens", 0) or 0)

    def inference_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast for the backbone and adapter when encoding without gradients and
        `vision.inference_dtype` asks for it ("bfloat16", or "auto" where bf16 is native on `device`);
        otherwise a no-op. The lexical pool opts out (:meth:`pooled_logits` runs in float32)."""
        if torch.is_grad_enabled():
            return contextlib.nullcontext()
        return bf16_autocast(self.cfg.inference_dtype, device)

    def forward_features(self, pixel_values: Tensor) -> Tensor:
        """Backbone patch tokens (CLS and registers dropped): (B, 3, S, S) -> (B, P, Dv)."""
        dtype = next(self.backbone.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze):
            hidden = self.backbone(pixel_values=pixel_values.to(dtype)).last_hidden_state
        return hidden[:, self.num_prefix_tokens :]  # (B, P, Dv)

    def codebook_weight(self) -> Tensor:
        """The image codebook (V, D): trained whole, or the LM-head rows plus a trained low-rank part."""
        if self.lexical.image_codebook_rank > 0:
            return torch.addmm(self.codebook_base, self.codebook_u, self.codebook_w)
        return self.codebook

    def forward_adapter(self, features: Tensor) -> Tensor:
        """Adapter on patch features: (B, P, Dv) -> (B, P, D)."""
        return self.adapter(features.to(self.adapter.proj.weight.dtype))

    def pooled_logits(self, hidden: Tensor) -> Tensor:
        """Max over patches of the patch logits: (B, P, D) -> (B, V) (the affine map is monotone, so
        it is applied after the max). Outside any autocast: the pool picks its own search dtype."""
        with torch.autocast(hidden.device.type, enabled=False):
            codebook = self.codebook_weight()  # (V, D)
            pooled = lexical_max_pool(
                hidden.to(codebook.dtype),
                codebook,
                impl=self.lexical.pooling,
                chunk_size=self.lexical.pool_chunk_size,
                search_dtype=self.lexical.pool_search_dtype,
            )
            return self.affine(pooled) if self.affine is not None else pooled

    def patch_logits(self, hidden: Tensor) -> Tensor:
        """Per-patch lexical logits: (B, P, D) -> (B, P, V). Memory: B·P·V floats."""
        with torch.autocast(hidden.device.type, enabled=False):
            codebook = self.codebook_weight()  # (V, D)
            logits = hidden.to(codebook.dtype) @ codebook.t()  # (B, P, V)
            return self.affine(logits) if self.affine is not None else logits

    def activations(self, features: Tensor) -> Tensor:
        """Image activations before L2 normalisation, `elu+1` of the pooled logits: (B, P, Dv) -> (B, V)."""
        return lexical_activation(self.pooled_logits(self.forward_adapter(features)))

    def forward(
        self, features: Tensor, return_patches: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """From cached or fresh patch features to (image_weights (B, V), patch_weights (B, P, V) | None)."""
        hidden = self.forward_adapter(features)  # (B, P, D)
        image_weights = lexical_weights(self.pooled_logits(hidden))  # (B, V)
        patch_weights = lexical_weights(self.patch_logits(hidden)) if return_patches else None
        return image_weights, patch_weights
