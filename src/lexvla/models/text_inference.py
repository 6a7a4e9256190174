"""The text tower's inference path: one lean forward over a Llama LLM's blocks, weights packed once.

Encoding a query is ~20 new tokens through the LLM, so its time is the 210 small matrix products of the
blocks plus, in the transformers forward, about as many small operations again (masks, cache objects,
per-projection calls). :class:`PackedDecoder` runs the same arithmetic with less around it:

- the query/key/value projections and the gate/up projections are concatenated into one matrix each,
  and every weight is packed once for oneDNN (float32, or bfloat16 where the CPU multiplies it
  natively: AVX512-BF16/AMX); the residual stream, norms, rotary embedding and attention stay float32;
- right padding needs no padding mask: attention runs per group of rows of equal length, each at its
  own length (causal over its new tokens, everything over the prefix), which is also what makes a
  row's result independent of the other rows of its batch (with the products' own row-independence:
  oneDNN's packed float32 products give every row the same bits for any number of rows >= 2);
- the prompt prefix's keys/values come from the tower's prefix cache (computed by the transformers
  forward in float32), so both paths attend to the same prefix.

It applies to Llama-family decoders without LoRA (:func:`supports`); the tower uses the transformers
forward for anything else, and in training. Equality with the transformers forward is tested
(tests/test_text_inference.py) and measured on the real model (bench/text_latency.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaModel,
    apply_rotary_pos_emb,
)

from lexvla.layers.invariant import tiled_linear
from lexvla.layers.lexical import wants_bf16


def supports(decoder: nn.Module) -> bool:
    """Whether `decoder` (a transformers `LlamaModel`) can run packed: Llama blocks whose projections
    are plain linear layers (no LoRA wrappers) and a SiLU-gated MLP."""
    if not isinstance(decoder, LlamaModel) or decoder.config.hidden_act != "silu":
        return False
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    return all(
        isinstance(layer, LlamaDecoderLayer)
        and all(type(getattr(layer.self_attn, p)) is nn.Linear for p in projections)
        and all(
            type(getattr(layer.mlp, p)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj")
        )
        for layer in decoder.layers
    )


def packed_dtype(weights: str, device: torch.device) -> torch.dtype:
    """The packed weights' dtype for an `inference_weights` choice ("auto": bf16 where native)."""
    if wants_bf16(weights, device):
        return torch.bfloat16
    return torch.float32


class PackedLinear:
    """`x · Wᵀ (+ b)` for a frozen weight packed once: float32 (..., K) in, float32 (..., N) out.

    On a CPU with oneDNN the weight is reordered into its blocked layout ahead of time; in bfloat16 the
    input is rounded to bf16 for the product, which accumulates in float32. Elsewhere `F.linear`.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.weight = weight.detach().to(dtype).contiguous()  # (N, K)
        self.bias = None if bias is None else bias.detach().float()
        self.packed: Tensor | None = None
        if weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 32)

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype)
        rows = flat.shape[0]
        if self.packed is not None:
            if rows == 1:  # one row takes a kernel that rounds differently: pad it to two
                flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")[:rows]
        else:
            out = F.linear(flat, self.weight)
        out = out.float()
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


class InferenceProducts:
    """`linear(x, weight, bias)` for inference whose rows do not depend on their batch, fast for one row.

    On a CPU with oneDNN a float32 weight is packed once (remade when the weight changes: its version
    or storage) and every row gets the same bits for any number of rows (one row is padded to two);
    as fast as a matrix-vector product for one row and several times MKL's for a few. Elsewhere
    :func:`~lexvla.layers.invariant.tiled_linear`. Holds a packed copy of each weight it has seen.
    """

    def __init__(self) -> None:
        self._packed: dict[int, tuple[tuple, PackedLinear]] = {}

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()):
            return tiled_linear(x, weight, bias)
        key = tuple((t.data_ptr(), t._version) for t in (weight, bias) if t is not None)
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] != key:
            entry = (key, PackedLinear(weight, bias, torch.float32))
            self._packed[id(weight)] = entry
        return entry[1](x.float())

    def clear(self) -> None:
        self._packed.clear()


def _fused(*linears: nn.Linear, dtype: torch.dtype) -> PackedLinear:
    """One packed product for several projections of the same input (outputs concatenated)."""
    weight = torch.cat([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = (
        None
        if all(b is None for b in biases)
        else torch.cat(
            [
                b if b is not None else lin.weight.new_zeros(lin.out_features)
                for b, lin in zip(biases, linears)
            ]
        )
    )
    return PackedLinear(weight, bias, dtype)


class _PackedBlock:
    """One Llama decoder block's packed projections and its two norms (the module's own)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused(attn.q_proj, attn.k_proj, attn.v_proj, dtype=dtype)
        self.o = PackedLinear(attn.o_proj.weight, attn.o_proj.bias, dtype)
        self.gate_up = _fused(mlp.gate_proj, mlp.up_proj, dtype=dtype)
        self.down = PackedLinear(mlp.down_proj.weight, mlp.down_proj.bias, dtype)
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_width, self.kv_width = attn.q_proj.out_features, attn.k_proj.out_features
        self.head_dim, self.scaling = attn.head_dim, attn.scaling


class PackedDecoder:
    """The final-normed hidden states of a Llama decoder for new tokens after an optional cached
    prefix: `(ids (B, T), prefix [(keys, values)] per block or None) -> (B, T, D)` in float32.

    Built once from the decoder's weights (a packed copy); the tower rebuilds it when they change.
    """

    def __init__(self, decoder: nn.Module, dtype: torch.dtype) -> None:
        self.decoder = decoder  # embeddings, rotary embedding and final norm are used in place
        self.dtype = dtype
        self.blocks = [_PackedBlock(layer, dtype) for layer in decoder.layers]

    def __call__(
        self,
        input_ids: Tensor,
        prefix: list[tuple[Tensor, Tensor]] | None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        """`lengths` (B,): each row's real new tokens (right padding after them); None: all T.
        Padded positions come out as garbage that no real position has attended to."""
        T = input_ids.shape[1]
        K = 0 if prefix is None else prefix[0][0].shape[2]
        hidden = self.decoder.embed_tokens(input_ids).float()  # (B, T, D)
        positions = torch.arange(K, K + T, device=input_ids.device)[None]  # (1, T)
        cos, sin = self.decoder.rotary_emb(hidden, positions)  # (1, T, head_dim) each
        groups = _length_groups(lengths, T)
        for i, block in enumerate(self.blocks):
            past = None if prefix is None else prefix[i]
            hidden = hidden + self._attention(
                block, block.input_norm(hidden), cos, sin, groups, past
            )
            gate, up = block.gate_up(block.post_norm(hidden)).chunk(2, dim=-1)
            hidden = hidden + block.down(F.silu(gate) * up)
        return self.decoder.norm(hidden)

    @staticmethod
    def _attention(
        block: _PackedBlock,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        groups: list[tuple[Tensor | None, int]],
        past: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = block.qkv(x).split([block.q_width, block.kv_width, block.kv_width], dim=-1)
        q = q.view(B, T, -1, block.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, -1, block.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(B, T, -1, block.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # cos, sin: (1, T, hd)
        if groups == [(None, T)]:  # every row has all T tokens (one caption alone, or all equal)
            out = _attend(q, k, v, None, T, past, block.scaling)
            return block.o(out.transpose(1, 2).reshape(B, T, -1))
        out = q.new_zeros(q.shape)  # (B, H, T, hd); padded positions stay 0
        for rows, length in groups:
            out_rows = _attend(q, k, v, rows, length, past, block.scaling)  # (b, H, length, hd)
            if rows is None:
                out[:, :, :length] = out_rows
            else:
                out[rows, :, :length] = out_rows
        return block.o(out.transpose(1, 2).reshape(B, T, -1))


def _length_groups(lengths: Tensor | None, tokens: int) -> list[tuple[Tensor | None, int]]:
    """Rows of equal real length, as (row indices or None for all rows, length): attention then runs
    at each row's own length, the shape it has when the row is encoded alone, so a row's result does
    not depend on the longest row of its batch (the attention kernel blocks its keys by length)."""
    if lengths is None:
        return [(None, tokens)]
    lengths = lengths.clamp(1, tokens).cpu()
    distinct = lengths.unique().tolist()
    if len(distinct) == 1:
        return [(None, int(distinct[0]))]
    return [(torch.nonzero(lengths == n).flatten(), int(n)) for n in distinct]


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: Tensor | None,
    length: int,
    past: tuple[Tensor, Tensor] | None,
    scaling: float,
) -> Tensor:
    """Causal attention of the first `length` new tokens of `rows` (None: all) after the prefix:
    (b, H, length, hd). Key j is visible to query i iff j <= K + i (everything over the prefix)."""
    if rows is not None:
        q, k, v = q[rows], k[rows], v[rows]
    q, k, v = q[:, :, :length], k[:, :, :length], v[:, :, :length]
    b, K = q.shape[0], 0 if past is None else past[0].shape[2]
    if past is not None:
        k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
    mask = torch.ones(length, K + length, dtype=torch.bool, device=q.device).tril(K)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True
    )  # (b, H, length, hd)
