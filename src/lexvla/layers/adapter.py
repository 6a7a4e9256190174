"""The vision adapter: one pre-norm transformer block at the backbone width, then a linear map to the LLM width.

At the paper's sizes (DINOv2-L width 1024, Llama-2 width 4096) it has about 16.8M parameters (the paper
reports ≈17M).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, P, D = x.shape
        qkv = self.qkv(x).view(B, P, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, P, D / H)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, P, D / H)
        return self.proj(out.transpose(1, 2).reshape(B, P, D))


class Adapter(nn.Module):
    """`x + attn(norm(x))`, `x + mlp(norm(x))`, then `linear(norm(x))` to the LLM width: (B, P, Dv) -> (B, P, D)."""

    def __init__(self, width: int, out_width: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_width)

    def forward(self, features: Tensor) -> Tensor:
        x = features + self.attn(self.norm1(features))
        x = x + self.mlp(self.norm2(x))
        return self.proj(self.norm_out(x))  # (B, P, D)
