"""Named presets: configs as code, found by name (timm's `@register_model`, typed).

- ``tiny``: random-initialised towers of the real classes (Dinov2Model, LlamaForCausalLM) from a fixed
  seed with the built-in word-level tokenizer; builds and runs in well under a second (tests, smoke runs).
- ``small-offline``: DINOv2-S/14 + SmolLM2-135M prepared by ``lexvla assets prepare`` (runs on a CPU).
- ``paper``: DINOv2-L/14 + Llama-2-7B as in the paper, by hub name. The architecture values are written
  here so the model can be built on the ``meta`` device (sizes, parameter counts) without a download.
"""

from __future__ import annotations

from collections.abc import Callable

from lexvla.config import (
    DataConfig,
    ExperimentConfig,
    LexicalConfig,
    LossConfig,
    ModelConfig,
    TextConfig,
    TrainConfig,
    VisionConfig,
)
from lexvla.errors import LexVLAError

_PRESETS: dict[str, Callable[[], ExperimentConfig]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_preset(name: str, description: str) -> Callable:
    """Decorator: register a function returning an ExperimentConfig under `name`."""

    def decorator(fn: Callable[[], ExperimentConfig]) -> Callable[[], ExperimentConfig]:
        _PRESETS[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return decorator


def list_presets() -> dict[str, str]:
    """Preset names with one-line descriptions."""
    return dict(_DESCRIPTIONS)


def get_preset(name: str) -> ExperimentConfig:
    """A fresh ExperimentConfig for preset `name`."""
    if name not in _PRESETS:
        raise LexVLAError(f"unknown preset '{name}'. Available presets: {', '.join(_PRESETS)}")
    return _PRESETS[name]()


TINY_DINOV2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "image_size": 56,
    "layerscale_value": 1.0,
}
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 3840,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
# DINOv2 ViT-L/14 (facebook/dinov2-large) and Llama-2-7B (meta-llama/Llama-2-7b-hf), from their configs.
DINOV2_LARGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
}
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@register_preset("tiny", "random-init tiny towers of the real classes; for tests and smoke runs")
def tiny() -> ExperimentConfig:
    model = ModelConfig(
        vision=VisionConfig(
            backbone="tiny-dinov2",
            pretrained=False,
            arch=dict(TINY_DINOV2),
            image_size=56,
            resize_size=64,
        ),
        text=TextConfig(
            backbone="tiny-llama",
            tokenizer="builtin:tiny-words",
            pretrained=False,
            arch=dict(TINY_LLAMA),
            use_lora=True,
            lora_rank=4,
            lora_alpha=8.0,
            max_caption_tokens=32,
        ),
        lexical=LexicalConfig(pool_chunk_size=1024),
    )
    # A random tiny model starts with near-uniform vectors (loss = log B): it needs a high lr to move.
    train = TrainConfig(
        steps=20,
        batch_size=8,
        lr=1e-2,
        warmup_steps=2,
        log_every=1,
        save_every=10,
        cache_features=False,
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(path="synthetic:64"),
        train=train,
        loss=LossConfig(penalty_warmup_steps=5),
    )


@register_preset(
    "small-offline", "DINOv2-S/14 + SmolLM2-135M from the offline cache; runs on a CPU"
)
def small_offline() -> ExperimentConfig:
    # The Flickr8k recipe (docs/method.md, "The small-offline recipe"; every try in docs/results.md):
    # frozen towers with the frozen features cached, a trained residual text head instead of LoRA
    # (LoRA on SmolLM2 costs about 40x per step here), the "words" vocabulary (whole words, no stop
    # words), a learnt scale and offset per modality that start every logit at -5 (sparse at step 0),
    # a sharp temperature (50), the overuse penalty on the activations, a caption-word loss (weight
    # 1) that names what is in the photo, the caption's own words in its text vector (weight 2,
    # SPLADE-style), a random quarter of the patches per step (FLIP-style), and the frozen features
    # cached in bf16 where the CPU multiplies it natively (about 3x faster caching), 4,500 steps
    # validated every 1,500 (image caption-word precision on Flickr8k val 36.9% at 1,800 steps,
    # 39.4% at 3,000, 40.0-40.2% at 4,000, see docs/results.md for 4,500; 59 min from nothing on
    # 2 CPU cores).
    model = ModelConfig(
        vision=VisionConfig(backbone="offline:dinov2-small"),
        text=TextConfig(
            backbone="offline:smollm2-135m", use_lora=False, head="mlp", input_words_weight=2.0
        ),
        lexical=LexicalConfig(
            pool_search_dtype="auto",
            vocab_rule="words",
            logit_affine=True,
            logit_offset_init=-5.0,
        ),
        logit_scale_init=50.0,
    )
    train = TrainConfig(
        steps=4500,
        batch_size=32,
        lr=1e-3,
        codebook_lr=1e-4,
        warmup_steps=20,
        patch_keep=0.25,
        feature_cache_compute="auto",
        eval_every=1500,
        save_every=300,
    )
    loss = LossConfig(
        penalty="overuse", penalty_on="activations", penalty_weight=0.1, caption_words_weight=1.0
    )
    return ExperimentConfig(model=model, train=train, loss=loss, data=DataConfig(holdout=16))


@register_preset("paper", "DINOv2-L/14 + Llama-2-7B with LoRA r=20, as in the paper (GPUs, hub)")
def paper() -> ExperimentConfig:
    model = ModelConfig(
        vision=VisionConfig(backbone="facebook/dinov2-large", arch=dict(DINOV2_LARGE)),
        text=TextConfig(
            backbone="meta-llama/Llama-2-7b-hf",
            arch=dict(LLAMA2_7B),
            use_lora=True,
            lora_rank=20,
            lora_alpha=40.0,
            dtype="bfloat16",
        ),
        # Chunks of 2,048 of the 17,182 words keep the pool's extra memory at 1/8 of the naive path.
        lexical=LexicalConfig(pool_chunk_size=2048),
    )
    # Not public in the paper: standard CLIP fine-tuning values (global batch 64 per step by default;
    # raise it with --set train.batch_size=... on 8 x A100-40GB).
    train = TrainConfig(
        steps=20000,
        batch_size=64,
        lr=2e-4,
        codebook_lr=2e-5,
        warmup_steps=1000,
        grad_checkpointing=True,
        precision="bf16",
        log_every=20,
        save_every=1000,
        cache_features=False,
    )
    return ExperimentConfig(
        model=model,
        train=train,
        loss=LossConfig(penalty_warmup_steps=2000),
        data=DataConfig(num_workers=8),
    )
