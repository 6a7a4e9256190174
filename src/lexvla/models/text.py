"""The text tower: caption → in-context prompt → causal LLM (+ LoRA) → last hidden state → text codebook.

The last prompt position's final hidden state is what the LM head reads to predict "the next word", i.e.
the words that describe the caption; the frozen text codebook (the LM-head rows of the kept ids) maps it
onto the lexical vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lexvla import assets
from lexvla.config import LexicalConfig, TextConfig
from lexvla.data.sample import utf8_text
from lexvla.errors import LexVLAError
from lexvla.layers.invariant import rowwise
from lexvla.layers.lexical import LogitAffine, lexical_activation
from lexvla.layers.lora import apply_lora
from lexvla.models._quiet import quiet_loading
from lexvla.models.text_inference import (
    InferenceProducts,
    PackedDecoder,
    packed_dtype,
    supports,
)
from lexvla.vocab import LexicalVocabulary, caption_tokens

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
CAPTION_SLOT = "{caption}"


def build_llm(cfg: TextConfig, device: torch.device | None = None) -> PreTrainedModel:
    """The causal LM from pretrained weights, or randomly initialised from `cfg.arch`."""
    dtype = _DTYPES[cfg.dtype]
    on_meta = device is not None and device.type == "meta"
    if cfg.pretrained and not on_meta:
        path = assets.resolve_reference(cfg.backbone)
        try:
            from transformers import AutoModelForCausalLM

            with quiet_loading():
                return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as err:
            raise LexVLAError(f"cannot load text backbone '{cfg.backbone}': {err}") from None
    if not cfg.arch:
        raise LexVLAError(
            f"text backbone '{cfg.backbone}' is not loaded (pretrained=false or meta device) and "
            "model.text.arch is empty: give the LlamaConfig fields in model.text.arch"
        )
    with torch.device(device or "cpu"):
        return LlamaForCausalLM(LlamaConfig(**cfg.arch)).to(dtype)


def clean_caption(caption: str, index: int = 0) -> str:
    """Normalise whitespace and control characters and replace what UTF-8 cannot encode (a lone
    surrogate) by "?"; an empty caption is an error naming its position."""
    if not isinstance(caption, str):
        raise LexVLAError(f"caption {index} is a {type(caption).__name__}, expected a string")
    text = " ".join(_CONTROL.sub(" ", utf8_text(caption)).split())
    if not text:
        raise LexVLAError(f"caption {index} is empty or whitespace only: give some text to encode")
    return text


def _starts_with(input_ids: Tensor, prefix_ids: Tensor) -> bool:
    """Whether every row of (B, T) ids begins with the (K,) prefix ids and has a token after them."""
    K = len(prefix_ids)
    return input_ids.shape[1] > K and bool((input_ids[:, :K] == prefix_ids).all())


@dataclass
class TokenizedPrompts:
    """Right-padded prompt ids. `last_index[b]` is the position of row b's last real token."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    last_index: Tensor  # (B,)


class TextTower(nn.Module):
    """Captions → (B, D) last-prompt-token features → (B, V) text weights through the frozen codebook."""

    def __init__(
        self,
        cfg: TextConfig,
        tokenizer: PreTrainedTokenizerBase,
        vocab: LexicalVocabulary,
        lexical: LexicalConfig | None = None,
        *,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        lexical = lexical or LexicalConfig()
        if cfg.encoder == "bow" and cfg.input_words_weight > 0:
            raise LexVLAError(
                "model.text.input_words_weight adds the caption's words to the LLM's prediction; "
                "encoder='bow' is those words alone: set it to 0"
            )
        if cfg.encoder == "bow" and cfg.use_lora:
            raise LexVLAError("model.text.encoder='bow' runs no LLM: set model.text.use_lora=false")
        if CAPTION_SLOT not in cfg.prompt:
            raise LexVLAError(f"model.text.prompt must contain {CAPTION_SLOT}: got {cfg.prompt!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        llm = build_llm(cfg, device)
        llm.requires_grad_(False)
        if llm.config.vocab_size < vocab.tokenizer_size:
            raise LexVLAError(
                f"the LLM has {llm.config.vocab_size} output rows but the tokenizer has "
                f"{vocab.tokenizer_size} ids: tokenizer and model do not match"
            )
        head = llm.get_output_embeddings().weight.detach()  # (vocab, D)
        rows = head[torch.tensor(vocab.token_ids, device=head.device)].float()  # (V, D)
        if lexical.center_codebooks:
            # Remove the shared offset: every caption's logits over the kept words share a large
            # positive mean, which makes all text vectors nearly parallel (docs/method.md).
            rows = rows - rows.mean(dim=0, keepdim=True)
        self.codebook = nn.Parameter(rows, requires_grad=False)  # (V, D), frozen
        width = rows.shape[1]
        with torch.device(rows.device):
            self.head = TextHead(width, cfg.head_mlp_ratio) if cfg.head == "mlp" else None
            llm_side = cfg.encoder == "llm"
            self.affine = (
                LogitAffine(offset=lexical.logit_offset_init)
                if lexical.logit_affine and llm_side
                else None
            )
        if cfg.use_lora:
            llm = apply_lora(
                llm,
                rank=cfg.lora_rank,
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                targets=cfg.lora_targets,
            )
        self.llm = llm
        self._cache_kwarg = _cache_argument(self._decoder())  # the KV-cache argument's name
        self.vocab = vocab
        self._prefix_token_ids: Tensor | None = None
        self._prefix_cache: list[tuple[Tensor, Tensor]] | None = None
        self._prefix_cache_key: tuple | None = None
        self._packable = cfg.encoder == "llm" and supports(self._decoder())
        self._packed: dict[tuple, PackedDecoder] = {}  # (dtype, device) -> packed LLM weights
        self._packed_key: tuple | None = None  # the LLM weights' versions the copies were made from
        self._inference_products = InferenceProducts()  # head and codebook products, packed

    def train(self, mode: bool = True) -> TextTower:
        """Set the mode, and drop the inference copies (packed products, packed LLM, prefix keys and
        values) when it changes. They are remade from the weights when the weights' version counters
        change, but fused optimizers (`torch.optim.AdamW(fused=True)`) update parameters in place
        without bumping them: switching mode (as the trainer does around each validation, and as
        `model.eval()` after training does) is the point where the weights may have moved."""
        if mode != self.training:
            self.drop_inference_copies()
        return super().train(mode)

    def drop_inference_copies(self) -> None:
        """Forget every copy made for inference; the next no-gradient forward remakes what it needs.
        Call it after changing the weights in a way their version counters do not see."""
        self._inference_products.clear()
        self._packed, self._packed_key = {}, None
        self._prefix_cache, self._prefix_cache_key = None, None

    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's transformer blocks (the units FSDP shards)."""
        return self._decoder().layers

    def _decoder(self) -> nn.Module:
        return self.llm.get_base_model().model if self.cfg.use_lora else self.llm.model

    def tokenize(self, captions: list[str]) -> TokenizedPrompts:
        """Wrap each caption in the prompt (caption truncated to `max_caption_tokens`) and tokenize."""
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise LexVLAError("no captions given to encode")
        rows = self._prompt_ids(captions)
        length = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention_mask[b, : len(row)] = 1
        return TokenizedPrompts(input_ids, attention_mask, attention_mask.sum(1) - 1)

    def prompt_lengths(self, captions: list[str]) -> list[int]:
        """Tokens of each caption's full prompt (what `tokenize` pads to the longest of a batch)."""
        return [len(ids) for ids in self._prompt_ids(captions)]

    def _prompt_ids(self, captions: list[str]) -> list[list[int]]:
        """The token ids of each caption's full prompt."""
        return [self.tokenizer(self.prompt_for(c, i))["input_ids"] for i, c in enumerate(captions)]

    def prompt_for(self, caption: str, index: int = 0) -> str:
        """The full prompt text of one caption (cleaned, truncated to `max_caption_tokens` tokens)."""
        text = clean_caption(caption, index)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) > self.cfg.max_caption_tokens:
            text = text[: offsets[self.cfg.max_caption_tokens - 1][1]]
        return self.cfg.prompt.replace(CAPTION_SLOT, text)

    def forward_features(self, captions: list[str]) -> Tensor:
        """Final hidden state at each caption's last prompt position: list of B captions -> (B, D).

        With `prefix_cache`, the prompt prefix is run once and its keys/values reused; the result equals
        the uncached path (rows whose tokens do not start with the prefix tokens fall back to it).
        """
        if self.cfg.encoder == "bow":
            return self.bag_of_words(captions)
        batch = self.tokenize(captions)
        use_prefix = self.cfg.prefix_cache and not self._checkpointing()
        prefix_ids = self._prefix_ids() if use_prefix else None
        if prefix_ids is not None and not _starts_with(batch.input_ids, prefix_ids):
            prefix_ids = None
        if self._inference_path():
            return self._forward_packed(batch, prefix_ids)
        if prefix_ids is not None:
            return self._forward_with_prefix(batch, prefix_ids)
        return self._forward_full(batch)

    @contextlib.contextmanager
    def frozen_inference(self, weights: str) -> Iterator[None]:
        """For the block: eval mode with `inference_weights` = `weights` ("float32", "bfloat16",
        "auto"), so a frozen LLM's `forward_features` runs the packed path (feature caching); mode and
        setting are restored after, and the packed copies made for the block are freed."""
        was_training, previous, kept = self.training, self.cfg.inference_weights, set(self._packed)
        self.cfg.inference_weights = weights
        self.train(False)
        try:
            yield
        finally:
            self.cfg.inference_weights = previous
            self.train(was_training)
            for key in set(self._packed) - kept:
                del self._packed[key]

    def _inference_path(self) -> bool:
        """Whether this forward may run the packed decoder (`inference_weights`): in eval mode, with no
        gradient to the LLM, on a Llama decoder without LoRA."""
        if self.cfg.inference_weights == "transformers" or self.training or not self._packable:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.llm.parameters()))

    def _forward_packed(self, batch: TokenizedPrompts, prefix_ids: Tensor | None) -> Tensor:
        device = self.codebook.device
        K = 0 if prefix_ids is None else len(prefix_ids)
        parameters = list(self.llm.parameters())  # listed once per forward (0.3 ms on SmolLM2)
        prefix = None if prefix_ids is None else self._prefix_kv(prefix_ids, parameters)
        lengths = (batch.last_index - K + 1).to(device)  # (B,) each row's real new tokens
        decoder = self._packed_decoder(parameters)
        return decoder(batch.input_ids[:, K:].to(device), prefix, lengths)  # (B, D)

    def _packed_decoder(self, parameters: list[nn.Parameter] | None = None) -> PackedDecoder:
        """The packed copy of the LLM's weights for the current `inference_weights` dtype and device.

        One copy is kept per dtype (a caller switching between paths, as bench/text_latency.py does,
        does not repack 540 MB per call); all are dropped when the LLM's weights change.
        `parameters`: the LLM's, when the caller has listed them already."""
        dtype = packed_dtype(self.cfg.inference_weights, self.codebook.device)
        parameters = list(self.llm.parameters()) if parameters is None else parameters
        versions = tuple(p._version for p in parameters)
        if self._packed_key != versions:
            self._packed = {}  # free the old copies first
            self._packed_key = versions
        key = (dtype, self.codebook.device)
        if key not in self._packed:
            self._packed[key] = PackedDecoder(self._decoder(), dtype)
        return self._packed[key]

    def _checkpointing(self) -> bool:
        """Whether the LLM's blocks recompute their activations in this forward (gradient
        checkpointing, training mode, gradients on): transformers then runs them without a KV cache,
        so the prefix keys/values can be neither returned nor used and the uncached path runs."""
        return torch.is_grad_enabled() and any(
            getattr(layer, "gradient_checkpointing", False) and layer.training
            for layer in self.decoder_layers()
        )

    def bag_of_words(self, captions: list[str]) -> Tensor:
        """The "bow" text side: B captions -> (B, V) 0/1 presence of each of the caption's words.

        A written word counts for every vocabulary word of its folded form (`LexicalVocabulary.
        word_dims`: "dogs" for "dog" and "dogs"); stop words and words outside the vocabulary are
        dropped.
        """
        if isinstance(captions, str):
            captions = [captions]
        bags = torch.zeros(len(captions), self.codebook.shape[0], device=self.codebook.device)
        for b, caption in enumerate(captions):
            words = caption_tokens(clean_caption(caption, b))
            bags[b, [d for word in words for d in self.vocab.word_dims(word)]] = 1.0
        return bags  # (B, V)

    def _forward_full(self, batch: TokenizedPrompts) -> Tensor:
        device = self.codebook.device
        out = self._decoder()(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        )
        hidden = out.last_hidden_state  # (B, T, D), after the final norm: what the LM head reads
        rows = torch.arange(hidden.shape[0], device=device)
        return hidden[rows, batch.last_index.to(device)]  # (B, D)

    def _prefix_ids(self) -> Tensor | None:
        """Token ids of the prompt text before the caption (with the tokenizer's leading specials)."""
        if self._prefix_token_ids is None:
            prefix = self.cfg.prompt.split(CAPTION_SLOT, 1)[0]
            self._prefix_token_ids = torch.tensor(
                self.tokenizer(prefix)["input_ids"], dtype=torch.long
            )
        return self._prefix_token_ids if len(self._prefix_token_ids) > 0 else None

    def _prefix_kv(
        self, prefix_ids: Tensor, parameters: list[nn.Parameter] | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """Per-layer (keys, values) of the prefix, each (1, H_kv, K, D/H). Reused while the LLM's
        trainable weights are unchanged and no gradient is needed; recomputed (once per batch) otherwise.
        `parameters`: the LLM's, when the caller has listed them already."""
        parameters = list(self.llm.parameters()) if parameters is None else parameters
        trainable = [p for p in parameters if p.requires_grad]
        key = (
            tuple(prefix_ids.tolist()),
            tuple(p._version for p in trainable),
            self.codebook.device,
        )
        needs_grad = torch.is_grad_enabled() and bool(trainable)
        if not needs_grad and self._prefix_cache_key == key and self._prefix_cache is not None:
            return self._prefix_cache
        out = self._decoder()(input_ids=prefix_ids[None].to(self.codebook.device), use_cache=True)
        layers = [(layer.keys, layer.values) for layer in _returned_cache(out).layers]
        if not needs_grad:
            self._prefix_cache, self._prefix_cache_key = (
                [(k.detach(), v.detach()) for k, v in layers],
                key,
            )
        return layers

    def _forward_with_prefix(self, batch: TokenizedPrompts, prefix_ids: Tensor) -> Tensor:
        device = self.codebook.device
        B, K = batch.input_ids.shape[0], len(prefix_ids)
        cache = DynamicCache(
            ddp_cache_data=[
                (k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
                for k, v in self._prefix_kv(prefix_ids)
            ],
            config=self.llm.config,
        )
        rest_ids = batch.input_ids[:, K:].to(device)  # (B, T - K): caption and suffix tokens
        T_rest = rest_ids.shape[1]
        attention_mask = torch.cat(
            [torch.ones(B, K, dtype=torch.long), batch.attention_mask[:, K:]], 1
        )
        position_ids = torch.arange(K, K + T_rest, device=device).expand(B, T_rest)
        out = self._decoder()(
            input_ids=rest_ids,
            attention_mask=attention_mask.to(device),
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        rows = torch.arange(B, device=device)
        return out.last_hidden_state[rows, (batch.last_index - K).to(device)]  # (B, D)

    def activations(self, features: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """(B, D) features -> (B, V) text activations before L2 normalisation: `elu+1` of the
        codebook logits, plus `input_words_weight` on the words each caption writes ("bow": the bags
        themselves). `captions` (the B captions of `features`) are needed when that weight is > 0."""
        if self.cfg.encoder == "bow":
            return features.float()
        logits = self.logits(features)  # (B, V)
        activations = (
            lexical_activation(logits)
            if torch.is_grad_enabled()
            else rowwise(lexical_activation, logits)  # as when encoded alone: docs in `rowwise`
        )
        weight = self.cfg.input_words_weight
        if weight == 0:
            return activations
        if captions is None or len(captions) != activations.shape[0]:
            raise LexVLAError(
                f"model.text.input_words_weight={weight} adds each caption's own words: pass the "
                f"{activations.shape[0]} captions of these features (got "
                f"{'none' if captions is None else len(captions)})"
            )
        return activations + weight * self.bag_of_words(list(captions))

    def logits(self, features: Tensor) -> Tensor:
        """(B, D) last-position states -> (B, V) lexical logits (head, frozen codebook, affine).

        Without gradients (encoding, search) the products are batch-invariant
        (:class:`~lexvla.models.text_inference.InferenceProducts`), so a caption's logits do not
        depend on the other captions encoded with it: a batched query answers as the query alone."""
        linear = F.linear if torch.is_grad_enabled() else self._inference_products
        hidden = features.float()
        if self.head is not None:
            hidden = self.head(hidden, linear)
        logits = linear(hidden, self.codebook)  # (B, V)
        return self.affine(logits) if self.affine is not None else logits

    def forward(self, features: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """(B, D) features -> (B, V) L2-normalised text weights ("bow": (B, V) bags, normalised)."""
        return F.normalize(self.activations(features, captions), dim=-1)


class TextHead(nn.Module):
    """A residual MLP on the LLM's last-position state: `h + W2·gelu(W1·norm(h))`, (B, D) -> (B, D).

    `W2` starts at zero, so an untrained head is the identity and the text side starts from the LLM's
    own word prediction; training moves it only as far as the contrastive loss asks.
    """

    def __init__(self, width: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, int(width * mlp_ratio))
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden: Tensor, linear: Callable[..., Tensor] = F.linear) -> Tensor:
        """`linear(x, weight, bias)` computes the two products (batch-invariant ones in inference:
        `TextTower.logits`)."""
        up = linear(self.norm(hidden), self.up.weight, self.up.bias)
        return hidden + linear(F.gelu(up), self.down.weight, self.down.bias)


def _cache_argument(decoder: nn.Module) -> str:
    """Name of the decoder's KV-cache argument: `cache` (transformers >= 5.x) or `past_key_values`."""
    return (
        "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    )


def _returned_cache(output: object) -> DynamicCache:
    """The KV cache of a decoder output, under its new (`cache`) or old (`past_key_values`) name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
