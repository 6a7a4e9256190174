"""Typed configuration: dataclasses, JSON conversion and dotted overrides.

Stdlib only (no torch): configs are read by the CLI, the index and the tests without loading a model.
A model is described by :class:`ModelConfig` (saved inside every checkpoint); a run adds loss, data,
training and evaluation settings in :class:`ExperimentConfig`. Named presets live in
:mod:`lexvla.presets`.

Conversion is strict: an unknown key or a value of the wrong type raises :class:`LexVLAError` naming the
dotted key, so a typo never silently falls back to a default. Values are checked too, whenever a config
is built: a float must be finite, a number must lie in its :data:`RANGES` entry (`train.lr` > 0, ...) and
a string with a few meaningful values must be one of its :data:`CHOICES`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lexvla.errors import LexVLAError

DEFAULT_PROMPT = 'This image caption: "{caption}" means in one word:"'
FEW_SHOT_PROMPT = (
    'This image caption: "A man riding a wave on top of a surfboard." means in one word:"surfing".\n'
    'This image caption: "Two giraffes standing next to a tree in a field." means in one word:"giraffe".\n'
    'This image caption: "A plate with a sandwich and french fries." means in one word:"food".\n'
    'This image caption: "{caption}" means in one word:"'
)


class _Checked:
    """Base of the config dataclasses: every instance is checked against :data:`RANGES` when it is
    built (construction, `from_dict`, `apply_overrides`, presets), so a value outside its meaning is
    refused with the dotted key that names it."""

    def __post_init__(self) -> None:
        check_values(self)


@dataclass
class VisionConfig(_Checked):
    """The frozen image backbone (DINOv2) and the trained adapter on top of it."""

    # HF hub name, local folder, or `offline:NAME` for a model prepared by `lexvla assets prepare`.
    backbone: str = "facebook/dinov2-large"
    # False: build the backbone from `arch` with random weights (the `tiny` preset, meta-device builds).
    pretrained: bool = True
    # Dinov2Config fields used when the weights are not loaded (tests, meta device). Empty: from backbone.
    arch: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224  # input side in pixels; 224 / patch 14 = 16 x 16 patches
    # Preprocessing: resize shorter side to `resize_size`, centre-crop to image_size, normalise.
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet mean, as DINOv2 was trained
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet standard deviation
    freeze: bool = True  # the paper keeps DINOv2 frozen
    adapter_heads: int = 0  # heads of the adapter block; 0: the backbone's own head count
    adapter_mlp_ratio: float = 4.0  # MLP width of the adapter block / backbone width
    # Precision of the frozen backbone and the adapter when encoding images without gradients
    # (`encode_image`, `encode-corpus`, search): "float32"; "bfloat16" (autocast: matmuls in bf16,
    # norms and the lexical pool in float32; fast where bf16 is native: AVX512-BF16/AMX, recent GPUs;
    # the top-256 words overlap float32's by ~99%: docs/performance.md); "auto": bfloat16 where
    # native, else float32. Training (and its feature cache) always runs in the backbone's dtype.
    inference_dtype: str = "float32"


@dataclass
class TextConfig(_Checked):
    """The generative LLM that predicts a caption's words through an in-context prompt."""

    backbone: str = "meta-llama/Llama-2-7b-hf"  # HF hub name, local folder or `offline:NAME`
    # "llm": the LLM predicts the caption's words through the prompt (the paper's method). "bow": the
    # paper's bag-of-words ablation: the text vector is the caption's own words, i.e. 1 on every
    # lexical dimension whose token occurs in the lower-cased, tokenized caption, L2-normalised (the
    # LLM is not run; its LM head still initialises the image codebook; needs use_lora=false).
    encoder: str = "llm"
    tokenizer: str = ""  # empty: same as backbone
    pretrained: bool = (
        True  # False: random init from `arch` (the `tiny` preset, meta-device builds)
    )
    arch: dict[str, Any] = field(default_factory=dict)  # LlamaConfig fields when not loaded
    # The in-context lexical-prediction prompt; `{caption}` is replaced by the caption.
    prompt: str = DEFAULT_PROMPT
    max_caption_tokens: int = 64  # longer captions are truncated (never an error)
    # Run the prompt prefix (identical for every caption) once and reuse its keys/values.
    prefix_cache: bool = True
    use_lora: bool = True  # False: the LLM is fully frozen (its features can then be cached)
    lora_rank: int = 20  # r=20 on q,k,v,o gives the paper's ≈21M LoRA parameters on Llama-2-7B
    lora_alpha: float = 40.0  # LoRA scaling alpha / r = 2
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    )  # linear layers with LoRA
    dtype: str = "float32"  # dtype of the frozen LLM weights
    # A trained head on the last prompt position's state, before the frozen text codebook: "none" or
    # "mlp" (residual `h + W2·gelu(W1·norm(h))`, W2 zero-initialised so training starts from the LLM's
    # own prediction). With a frozen LLM (use_lora=false) it trains the text side on cached features.
    head: str = "none"
    head_mlp_ratio: float = 1.0  # hidden width of the "mlp" head / LLM width
    # Weight of the caption's own words in its text vector: `elu+1(logits) + w·bag`, where `bag` is
    # 1 on every vocabulary word the caption writes (stop words dropped; "dogs" lights dog and dogs).
    # SPLADE keeps the input terms this way; the LLM's prediction adds the words the caption implies.
    # 0: the paper's text side (the LLM's prediction alone). Only for encoder "llm".
    input_words_weight: float = 0.0
    # How a Llama LLM (without LoRA) encodes at inference (eval mode, no gradient): a lean forward
    # with its weights packed once (models/text_inference.py), "float32" (equal to the transformers
    # forward within float rounding) or "bfloat16" (1.4-1.6x faster where the CPU multiplies bf16
    # natively, AVX512-BF16/AMX; weights within ~6e-3, and near-tied top words may swap: the top-20
    # set stays for ~92% of captions on a trained head, docs/performance.md); "auto": bfloat16
    # where native, else float32; "transformers": the model's
    # own forward (the reference).
    inference_weights: str = "float32"


@dataclass
class LexicalConfig(_Checked):
    """The shared vocabulary, the two codebooks and sparsification."""

    # "pieces" (▁?[a-z]{2,}), "word-start" (▁[a-z]{2,}) or "words" (word-start without stop words)
    vocab_rule: str = "pieces"
    center_codebooks: bool = True  # subtract the mean codebook row (see docs/method.md)
    # A learnt scale and offset on each modality's logits before elu+1 (layers.lexical.LogitAffine);
    # the offset starts at `logit_offset_init` (0 with scale 1: the identity).
    logit_affine: bool = False
    logit_offset_init: float = 0.0
    # 0: the image codebook (V x D) is trained whole; r > 0: it stays the LM-head rows plus a trained
    # rank-r correction (V·r + r·D parameters instead of V·D: a small checkpoint, less to overfit).
    image_codebook_rank: int = 0
    pooling: str = "fused"  # "fused" (chunked, memory-lean) or "naive" (materialises (B, P, V))
    pool_chunk_size: int = 4096  # vocabulary chunk of the fused max-pool
    # Arg-max patch search of the fused pool: "float32" (exact) or "bfloat16" (about 2x faster where
    # bf16 matmuls are native: CPUs with AVX512-BF16/AMX, recent GPUs; the chosen patch's value is
    # recomputed in float32, only near-ties may pick another patch); "auto": bf16 where native.
    pool_search_dtype: str = "float32"
    # Inference sparsification (SPARSIFY_MODES): "threshold" (1/sqrt(V) unless `threshold` > 0), "topk"
    # or "none"; `lexvla eval --sparsify` takes "threshold", "none" (or "dense") or a top-k's number.
    sparsify: str = "threshold"
    threshold: float = 0.0  # threshold of "threshold" mode; 0: the paper's 1/sqrt(V)
    top_k: int = 512  # k of "topk" mode (512 matches CLIP's width)
    index_max_words: int = 256  # cap on active words per vector when indexing


@dataclass
class ModelConfig(_Checked):
    """Everything needed to rebuild a LexVLA model; saved as `config.json` in each checkpoint."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lexical: LexicalConfig = field(default_factory=LexicalConfig)
    logit_scale_init: float = 1.0 / 0.07  # contrastive inverse temperature at init (CLIP's 1/0.07)
    logit_scale_max: float = 100.0  # clamp of the learnt inverse temperature
    seed: int = 0  # seeds random initialisation (adapter, random towers): same weights every build


@dataclass
class LossConfig(_Checked):
    """The training objective: symmetric InfoNCE plus a sparsity penalty."""

    penalty: str = "overuse"  # the sparsity penalty (lexvla.losses)
    penalty_weight: float = 1e-3  # lambda, per modality
    penalty_warmup_steps: int = 50  # quadratic warm-up of lambda (SPLADE style)
    # What the penalty reads: "weights" (the L2-normalised vectors) or "activations" (elu+1 before
    # normalisation, as SPLADE's FLOPs). On unit vectors neither penalty can reward sparsity
    # (docs/results.md, experiment 1).
    penalty_on: str = "weights"
    # Weight of the caption-word loss (losses.caption_word_loss): image and text vectors are pulled
    # towards the content words of the image's captions. 0: off (the paper trains contrastively only).
    caption_words_weight: float = 0.0
    # Which vectors the caption-word loss pulls: "both", or "image" only (a text vector that holds
    # its caption's own words, `model.text.input_words_weight` > 0, is already anchored; pulling it
    # towards the other captions' words teaches it the set's priors, e.g. `man` for every caption).
    caption_words_on: str = "both"


@dataclass
class DataConfig(_Checked):
    """Training data: a path whose format is detected (COCO/Karpathy JSON, CSV/TSV, tar shards, synthetic)."""

    path: str = (
        ""  # caption JSON, Karpathy JSON, CSV/TSV, tar shards (dir or pattern), synthetic[:N]
    )
    images: str = ""  # image folder for caption JSON / CSV with relative paths
    split: str = "train"  # Karpathy split to use, when the file has splits
    # Karpathy split to validate on when the file has it (Flickr8k/30k, COCO: "val"); "": none.
    val_split: str = "val"
    # Keep the last N images (by key) out of training to validate on, when there is no val_split.
    holdout: int = 0
    captions_per_image: int = 1  # captions sampled per image per step
    num_workers: int = 0  # DataLoader workers for streaming shards
    synthetic_size: int = 512  # number of samples of the synthetic dataset


@dataclass
class TrainConfig(_Checked):
    """Optimisation and run settings."""

    steps: int = 100  # optimiser steps
    batch_size: int = 32  # GLOBAL batch (split across processes under DDP); negatives = the batch
    grad_accum: int = 1  # micro-batches per step (the contrastive loss sees one micro-batch)
    lr: float = 1e-3  # adapter, LoRA, temperature
    codebook_lr: float = 1e-4  # image codebook
    weight_decay: float = 0.05  # AdamW decay of weight matrices (not norms, biases, temperature)
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 0 at `steps`
    grad_clip: float = 1.0  # max global gradient norm; 0: off
    precision: str = "auto"  # autocast of training: "auto" is bf16 on CUDA, else fp32
    grad_checkpointing: bool = (
        False  # recompute LLM activations in backward (with LoRA): memory for time
    )
    # Compute what stays frozen once (DINOv2 patch features; with use_lora=false the LLM's caption
    # features) and keep it under $LEXVLA_CACHE/features: map-style data in whole tables before the
    # first step, streaming shards on first use.
    cache_features: bool = True
    feature_cache_dtype: str = "float16"  # storage of cached image features
    # Precision the frozen towers run at while their features are cached (not at inference): "float32",
    # "bfloat16", or "auto" (bf16 where the device multiplies it natively: the backbone under bf16
    # autocast, the LLM with packed bf16 weights; about 2-3x faster caching on a CPU with AMX).
    feature_cache_compute: str = "float32"
    # Share of each image's patches the trained heads see per step (a random subset, FLIP-style):
    # the fused pool's cost falls in proportion; evaluation always uses every patch.
    patch_keep: float = 1.0
    log_every: int = 5  # steps between metrics.jsonl / TensorBoard records
    eval_every: int = 0  # 0: only at the end
    save_every: int = 50  # steps between checkpoints (0: only the final model)
    keep_checkpoints: int = 2  # newest checkpoints kept in run_dir/checkpoints
    seed: int = 0  # data order, caption choice and dropout are functions of (seed, step)
    device: str = "auto"  # "auto" (the local CUDA device under torchrun, else CPU), "cpu", "cuda:1"
    distributed: str = "ddp"  # many processes: DDP, or FSDP2 (shards each LLM layer)
    # A step whose loss or gradient norm is NaN/inf is skipped (no update) and counted; after this many
    # in a row the run stops with an error naming the last finite loss and the last good checkpoint.
    max_nonfinite_steps: int = 5


RECALL_KS = (1, 5, 10)  # K of recall@K wherever none is given (lexvla.eval, training's validation)


@dataclass
class EvalConfig(_Checked):
    """Evaluation settings."""

    batch_size: int = 32  # encoding batch
    recall_ks: tuple[int, ...] = RECALL_KS  # K of recall@K (training's validation)
    patchdis_threshold: float = 0.1  # unused (old configs load): see eval patchdis --threshold


@dataclass
class ExperimentConfig:
    """A whole run: model plus loss, data, training and evaluation settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n"


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build config `cls` from a plain dict, rejecting unknown keys and wrong types.

    Missing keys keep their defaults, so configs saved by older versions still load.
    """
    if not isinstance(data, dict):
        raise LexVLAError(
            f"config {where or cls.__name__}: expected an object, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in known:
            raise LexVLAError(
                f"unknown config key '{dotted}'. Known keys here: {', '.join(sorted(known))}"
            )
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against type `tp` (converting lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, where)
            except LexVLAError:
                continue
        raise _type_error(where, tp, value)
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _type_error(where, tp, value)
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise LexVLAError(
                f"config key '{where}': expected {len(item_types)} values, got {len(value)}"
            )
        return tuple(
            _coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(where, tp, value)
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(where, tp, value)
        return float(value)
    if tp is int or tp is bool or tp is str:
        # bool is a subclass of int: an int field must not accept True, a bool field not 1.
        if type(value) is not tp:
            raise _type_error(where, tp, value)
        return value
    if tp is type(None):
        if value is not None:
            raise _type_error(where, tp, value)
        return None
    raise LexVLAError(f"config key '{where}': unsupported type {tp}")  # pragma: no cover


def _type_error(where: str, tp: Any, value: Any) -> LexVLAError:
    name = getattr(tp, "__name__", str(tp))
    return LexVLAError(
        f"config key '{where}': expected {name}, got {type(value).__name__} ({value!r})"
    )


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a config JSON file into `cls`, with errors that name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LexVLAError(f"config file not found: {path}") from None
    except OSError as err:  # a directory, no permission, ...
        raise LexVLAError(f"cannot read the config file {path}: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise LexVLAError(f"config file {path} is not valid JSON: {err}") from None
    try:
        return from_dict(cls, data)
    except LexVLAError as err:
        raise LexVLAError(f"{path}: {err}") from None


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of `cfg` with dotted `key=value` overrides applied (values parsed as JSON).

    `train.steps=40`, `model.text.prompt="{caption} is"`, `eval.recall_ks=[1,5]`. A value that is not
    valid JSON is taken as a string, so `--set data.path=/x/y.json` needs no quotes.
    """
    items = overrides.items() if isinstance(overrides, dict) else map(_split_override, overrides)
    data = to_dict(cfg)
    for key, value in items:
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise LexVLAError(
                    f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{key}'"
                )
            node = node[part]
        if parts[-1] not in node:
            raise LexVLAError(
                f"unknown config key '{key}'. Known keys here: {', '.join(sorted(node))}"
            )
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise LexVLAError(f"override '{text}' must look like key=value (e.g. train.steps=40)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise LexVLAError(f"override '{key}': the value is nested too deeply") from None
    return key.strip(), value


# ----------------------------------------------------------------------------------- value ranges
@dataclass(frozen=True)
class Range:
    """The allowed values of a number (of each item, for a tuple field): `low` up to `high`."""

    low: float
    high: float = math.inf
    low_included: bool = True
    high_included: bool = False

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_included else value > self.low
        below = value <= self.high if self.high_included else value < self.high
        return above and below

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"{'>=' if self.low_included else '>'} {self.low:g}"
        opening, closing = "[" if self.low_included else "(", "]" if self.high_included else ")"
        return f"in {opening}{self.low:g}, {self.high:g}{closing}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_included=False)
FRACTION = Range(0, 1)  # [0, 1)

# Where each config class sits in an ExperimentConfig (the dotted keys of --set and of errors).
SECTIONS: dict[type, str] = {
    VisionConfig: "model.vision",
    TextConfig: "model.text",
    LexicalConfig: "model.lexical",
    ModelConfig: "model",
    LossConfig: "loss",
    DataConfig: "data",
    TrainConfig: "train",
    EvalConfig: "eval",
}

# Numeric fields whose meaning bounds them. Every float value of any config must also be finite.
RANGES: dict[str, Range] = {
    "model.vision.image_size": AT_LEAST_1,
    "model.vision.resize_size": AT_LEAST_1,
    "model.vision.std": POSITIVE,
    "model.vision.adapter_heads": AT_LEAST_0,
    "model.vision.adapter_mlp_ratio": POSITIVE,
    "model.text.max_caption_tokens": AT_LEAST_1,
    "model.text.lora_rank": AT_LEAST_1,
    "model.text.lora_alpha": POSITIVE,
    "model.text.lora_dropout": FRACTION,
    "model.text.head_mlp_ratio": POSITIVE,
    "model.text.input_words_weight": AT_LEAST_0,
    "model.lexical.pool_chunk_size": AT_LEAST_1,
    "model.lexical.threshold": FRACTION,
    "model.lexical.top_k": AT_LEAST_1,
    "model.lexical.index_max_words": AT_LEAST_0,
    "model.logit_scale_init": POSITIVE,
    "model.logit_scale_max": POSITIVE,
    "loss.penalty_weight": AT_LEAST_0,
    "loss.caption_words_weight": AT_LEAST_0,
    "model.lexical.image_codebook_rank": AT_LEAST_0,
    "loss.penalty_warmup_steps": AT_LEAST_0,
    "data.holdout": AT_LEAST_0,
    "data.captions_per_image": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0,
    "data.synthetic_size": AT_LEAST_1,
    "train.steps": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.patch_keep": Range(0, 1, low_included=False, high_included=True),
    "train.codebook_lr": AT_LEAST_0,
    "train.weight_decay": AT_LEAST_0,
    "train.warmup_steps": AT_LEAST_0,
    "train.grad_clip": AT_LEAST_0,
    "train.log_every": AT_LEAST_1,
    "train.eval_every": AT_LEAST_0,
    "train.save_every": AT_LEAST_0,
    "train.keep_checkpoints": AT_LEAST_0,
    "train.max_nonfinite_steps": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
    "eval.recall_ks": AT_LEAST_1,
}


# The library's one vocabulary of sparsification (`model.lexical.sparsify`, `LexVLA.sparsify(mode=)`).
# Evaluation operating points take the same words plus a top-k as its number, and write "none" as
# "dense" in their results: `lexvla.eval.retrieval.parse_operating_point` is that one mapping.
SPARSIFY_MODES = ("threshold", "topk", "none")

# String fields that take one of a few values (checked like RANGES, whenever a config is built). The
# code that acts on a value imports its tuple from here: one list per option.
INFERENCE_WEIGHTS = ("float32", "bfloat16", "auto", "transformers")
IMAGE_INFERENCE_DTYPES = ("float32", "bfloat16", "auto")
TEXT_ENCODERS = ("llm", "bow")
TEXT_HEADS = ("none", "mlp")
TEXT_DTYPES = ("float32", "bfloat16", "float16")
VOCAB_RULES = ("pieces", "word-start", "words")
POOLING_IMPLS = ("fused", "naive")
POOL_SEARCH_DTYPES = ("float32", "bfloat16", "auto")
PENALTIES = ("overuse", "overuse-square", "flops", "l1", "none")
PENALTY_INPUTS = ("weights", "activations")
CAPTION_WORDS_ON = ("both", "image")
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
FEATURE_CACHE_DTYPES = ("float16", "float32")
FEATURE_CACHE_COMPUTE = ("float32", "bfloat16", "auto")
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")
CHOICES: dict[str, tuple[str, ...]] = {
    "model.vision.inference_dtype": IMAGE_INFERENCE_DTYPES,
    "model.text.encoder": TEXT_ENCODERS,
    "model.text.head": TEXT_HEADS,
    "model.text.dtype": TEXT_DTYPES,
    "model.text.inference_weights": INFERENCE_WEIGHTS,
    "model.lexical.vocab_rule": VOCAB_RULES,
    "model.lexical.pooling": POOLING_IMPLS,
    "model.lexical.pool_search_dtype": POOL_SEARCH_DTYPES,
    "model.lexical.sparsify": SPARSIFY_MODES,
    "loss.penalty": PENALTIES,
    "loss.penalty_on": PENALTY_INPUTS,
    "train.precision": TRAIN_PRECISIONS,
    "train.feature_cache_dtype": FEATURE_CACHE_DTYPES,
    "train.feature_cache_compute": FEATURE_CACHE_COMPUTE,
    "train.distributed": DISTRIBUTED_STRATEGIES,
    "loss.caption_words_on": CAPTION_WORDS_ON,
}


def check_values(cfg: Any) -> None:
    """Refuse a non-finite float or a number outside its :data:`RANGES` entry, or a string that is
    not one of its :data:`CHOICES`, naming the dotted key."""
    section = SECTIONS.get(type(cfg), type(cfg).__name__)
    for f in dataclasses.fields(cfg):
        key, value = f"{section}.{f.name}", getattr(cfg, f.name)
        if key in CHOICES and value not in CHOICES[key]:
            raise LexVLAError(
                f"config key '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}"
            )
    for name, value in _numbers(cfg):
        key = f"{section}.{name}"
        if isinstance(value, float) and not math.isfinite(value):
            raise LexVLAError(f"config key '{key}' must be a finite number, got {value!r}")
        allowed = RANGES.get(key)
        if allowed is not None and value not in allowed:
            raise LexVLAError(f"config key '{key}' must be {allowed}, got {value!r}")


def _numbers(cfg: Any) -> Iterator[tuple[str, float]]:
    """(field name, number) of each numeric field of `cfg`, once per item of a tuple field."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, int | float) and not isinstance(item, bool):
                yield f.name, item
