"""The text tower's inference path: one lean forward over a Llama LLM's blocks, weights packed once.

Encoding a query is ~20 new tokens through the LLM, so its time is the 210 small matrix products of the
blocks plus, in the transformers forward, about as many small operations again (masks, cache objects,
per-projection calls, norms and rotary embedding in several passes each). :class:`PackedDecoder` runs
the same arithmetic with less around it:

- the query/key/value projections are concatenated into one product, and every weight is packed
  once for oneDNN (float32, or bfloat16 where the CPU
  multiplies it natively: AVX512-BF16/AMX); the residual stream, norms, rotary embedding and
  attention stay float32;
- in float32 the element-wise work around the products runs inside them as oneDNN post-ops: the
  SiLU of the gate, the gating product `up(x) * silu(gate(x))` and both residual sums; the norms are
  one fused `rms_norm` each, the rotary embedding one pass over queries and keys together, and each
  attention mask is built once per forward: about 25 operators per block instead of ~50;
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
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel, LlamaRMSNorm

from lexvla.layers.invariant import tiled_linear
from lexvla.layers.lexical import wants_bf16


def supports(decoder: nn.Module) -> bool:
    """Whether `decoder` (a transformers `LlamaModel`) can run packed: Llama blocks whose projections
    are plain linear layers without bias (no LoRA wrappers), RMS norms and a SiLU-gated MLP."""
    if not isinstance(decoder, LlamaModel) or decoder.config.hidden_act != "silu":
        return False
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")

    def plain(layer: nn.Module) -> bool:
        linears = [getattr(layer.self_attn, p) for p in projections] + list(_mlp_linears(layer.mlp))
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        return all(type(lin) is nn.Linear and lin.bias is None for lin in linears) and all(
            isinstance(norm, LlamaRMSNorm) for norm in norms
        )

    return isinstance(decoder.norm, LlamaRMSNorm) and all(
        isinstance(layer, LlamaDecoderLayer) and plain(layer) for layer in decoder.layers
    )


def packed_dtype(weights: str, device: torch.device) -> torch.dtype:
    """The packed weights' dtype for an `inference_weights` choice ("auto": bf16 where native)."""
    if wants_bf16(weights, device):
        return torch.bfloat16
    return torch.float32


def _onednn_linear(
    x: Tensor, packed: Tensor, attr: str = "none", other: Tensor | None = None
) -> Tensor:
    """x (M, K) · Wᵀ for a weight packed by `torch.ops.mkldnn._reorder_linear_weight`, then the
    unary post-op `attr` ("none", "swish") or, with `other` (M, N), the binary one ("add", "mul");
    in `x`'s dtype. Rows come out the same for any M: one row (which takes a kernel that rounds
    differently) is padded to two."""
    rows = x.shape[0]
    if rows == 1:
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
        other = None if other is None else torch.cat([other, other.new_zeros(other.shape)])
    if other is None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, attr, [], "")[:rows]
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, attr)[:rows]


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
        if self.packed is not None:
            out = _onednn_linear(flat, self.packed)
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


class _BlockProducts:
    """One decoder block's products, packed once, with the element-wise work around them fused in:
    `qkv(x)`, `attention_out(x, residual)` = residual + x·Woᵀ, and `mlp(x, residual)` =
    residual + down(silu(gate(x)) * up(x)). float32 (..., K) in, float32 out.

    With oneDNN in float32 the activation, the gating product and the residual sums run as the
    products' post-ops (no separate element-wise pass); in bfloat16 the inputs are rounded to bf16
    for each product and the residual stream stays float32. Elsewhere plain `F.linear`.
    """

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        attn, mlp = layer.self_attn, layer.mlp  # projections without bias (`supports`)
        self.dtype = dtype
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        self.weights = [
            w.detach().to(dtype).contiguous()
            for w in (qkv, attn.o_proj.weight, *(lin.weight for lin in _mlp_linears(mlp)))
        ]  # qkv, o, gate, up, down: (N, K) each (packed too)
        self.fused = self.weights[0].device.type == "cpu" and torch.backends.mkldnn.is_available()
        if self.fused:
            self.weights = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in self.weights]

    def _linear(self, x: Tensor, i: int, attr: str = "none", other: Tensor | None = None) -> Tensor:
        """x (M, K) · weight[i]ᵀ, then `attr` ("swish") or the binary post-op `attr` ("add", "mul")
        with `other` (M, N); the output in the products' dtype (`x` is already in it)."""
        if not self.fused:
            out = F.linear(x, self.weights[i])
            if attr == "swish":
                return F.silu(out)
            return out if other is None else (out + other if attr == "add" else out * other)
        return _onednn_linear(x, self.weights[i], attr, other)

    def qkv(self, x: Tensor) -> Tensor:  # (M, D) -> (M, (H + 2 H_kv) hd)
        return self._linear(x.to(self.dtype), 0).float()

    def attention_out(self, x: Tensor, residual: Tensor) -> Tensor:  # (M, H hd), (M, D) -> (M, D)
        if self.dtype == torch.float32:
            return self._linear(x, 1, "add", residual)
        return residual + self._linear(x.to(self.dtype), 1).float()

    def mlp(self, x: Tensor, residual: Tensor) -> Tensor:  # (M, D), (M, D) -> (M, D)
        x = x.to(self.dtype)
        gated = self._linear(x, 3, "mul", self._linear(x, 2, "swish"))  # up(x) * silu(gate(x))
        if self.dtype == torch.float32:
            return self._linear(gated, 4, "add", residual)
        return residual + self._linear(gated, 4).float()


def _mlp_linears(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


class _PackedBlock:
    """One Llama decoder block: its packed products and the parameters of its norms and attention."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        attn = layer.self_attn
        self.products = _BlockProducts(layer, dtype)
        self.input_norm = layer.input_layernorm.weight.detach()  # (D,)
        self.post_norm = layer.post_attention_layernorm.weight.detach()
        self.eps = layer.input_layernorm.variance_epsilon
        self.heads = attn.q_proj.out_features // attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.head_dim, self.scaling = attn.head_dim, attn.scaling


class _Groups:
    """Rows of equal real length, with the causal mask over prefix + new tokens of each length."""

    def __init__(self, lengths: Tensor | None, tokens: int, prefix_len: int, device) -> None:
        self.rows_and_lengths = _length_groups(lengths, tokens)
        self.masks = {
            n: torch.ones(n, prefix_len + n, dtype=torch.bool, device=device).tril(prefix_len)
            for _, n in self.rows_and_lengths
        }  # key j is visible to query i iff j <= K + i (everything over the prefix)


class PackedDecoder:
    """The final-normed hidden state of a Llama decoder at each row's last new token, after an
    optional cached prefix: `(ids (B, T), prefix [(keys, values)] per block or None, lengths (B,))
    -> (B, D)` in float32.

    Built once from the decoder's weights (a packed copy); the tower rebuilds it when they change.
    """

    def __init__(self, decoder: nn.Module, dtype: torch.dtype) -> None:
        self.decoder = decoder  # embeddings and rotary embedding are used in place
        self.dtype = dtype
        self.blocks = [_PackedBlock(layer, dtype) for layer in decoder.layers]
        self.norm, self.eps = decoder.norm.weight.detach(), decoder.norm.variance_epsilon

    def __call__(
        self,
        input_ids: Tensor,
        prefix: list[tuple[Tensor, Tensor]] | None,
        lengths: Tensor | None = None,
    ) -> Tensor:
        """`lengths` (B,): each row's real new tokens (right padding after them); None: all T.
        The last block computes its attention output and MLP only at those last tokens (the other
        positions feed no later block)."""
        B, T = input_ids.shape
        K = 0 if prefix is None else prefix[0][0].shape[2]
        hidden = self.decoder.embed_tokens(input_ids).float().view(B * T, -1)  # (B T, D)
        D = hidden.shape[1]
        positions = torch.arange(K, K + T, device=input_ids.device)[None]  # (1, T)
        cos, sin = self.decoder.rotary_emb(hidden, positions)  # (1, T, hd) each
        rotary = _rotary_tables(cos, sin)
        groups = _Groups(lengths, T, K, input_ids.device)
        last_rows = torch.arange(B, device=input_ids.device) * T + (
            T - 1 if lengths is None else lengths.to(input_ids.device).clamp(1, T) - 1
        )  # (B,) each row's last real token in (B T)
        for i, block in enumerate(self.blocks):
            x = F.rms_norm(hidden, (D,), block.input_norm, block.eps)
            past = None if prefix is None else prefix[i]
            attended = self._attention(block, x, B, rotary, groups, past)  # (B T, H hd)
            if i == len(self.blocks) - 1:  # only the last tokens go on
                attended, hidden = attended[last_rows], hidden[last_rows]  # (B, H hd), (B, D)
            hidden = block.products.attention_out(attended, hidden)
            x = F.rms_norm(hidden, (D,), block.post_norm, block.eps)
            hidden = block.products.mlp(x, hidden)
        return F.rms_norm(hidden, (D,), self.norm, self.eps)  # (B, D)

    @staticmethod
    def _attention(
        block: _PackedBlock,
        x: Tensor,
        batch: int,
        rotary: tuple[Tensor, Tensor],
        groups: _Groups,
        past: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """(B T, D) normed states -> (B T, H hd) attention outputs (padded positions 0)."""
        B, T, hd, H = batch, x.shape[0] // batch, block.head_dim, block.heads
        qkv = block.products.qkv(x)  # (B T, (H + 2 H_kv) hd)
        split = (H + block.kv_heads) * hd
        qk = _rotate(qkv[:, :split].view(B, T, -1, hd), *rotary)  # (B, T, H + H_kv, hd)
        qk = qk.transpose(1, 2)  # (B, H + H_kv, T, hd)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, split:].view(B, T, -1, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        if groups.rows_and_lengths == [(None, T)]:  # every row has all T tokens
            out = _attend(q, k, v, None, T, past, block.scaling, groups.masks[T])
            return out.transpose(1, 2).reshape(B * T, -1)
        out = q.new_zeros(q.shape)  # (B, H, T, hd); padded positions stay 0
        for rows, length in groups.rows_and_lengths:
            out_rows = _attend(q, k, v, rows, length, past, block.scaling, groups.masks[length])
            if rows is None:
                out[:, :, :length] = out_rows
            else:
                out[rows, :, :length] = out_rows
        return out.transpose(1, 2).reshape(B * T, -1)


def _rotary_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(1, T, hd) cos, sin -> (1, T, 1, hd) cos and the signed sin of `_rotate`."""
    half = cos.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[:, :, None], signed_sin[:, :, None]


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Llama's rotary embedding of (B, T, heads, hd) queries or keys: `x·cos + rotate_half(x)·sin`,
    with `rotate_half(x)·sin` = `roll(x, hd/2)·signed_sin` (one pass for queries and keys together)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


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
    mask: Tensor,
) -> Tensor:
    """Causal attention of the first `length` new tokens of `rows` (None: all) after the prefix:
    (b, H, length, hd); `mask` (length, K + length) says which keys each query sees."""
    if rows is not None:
        q, k, v = q[rows], k[rows], v[rows]
    q, k, v = q[:, :, :length], k[:, :, :length], v[:, :, :length]
    b = q.shape[0]
    if past is not None:
        k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True
    )  # (b, H, length, hd)
