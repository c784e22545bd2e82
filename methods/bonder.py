"""TGP-T's Bonder: learnable queries that read image tokens (spec methods.md §4.2 step 3).

One block, pre-LayerNorm residuals, exactly the reference layout (EricTan7/TGP-T
``models/bonder/attn.py``):

* ``Q <- Q + SA(LN1 Q)``: multi-head (8) self-attention, qkv projection without bias, output
  projection with bias;
* ``Q <- Q + CA(LN2 Q, LN3 F)``: **single-head** attention over all dims; the LayerNorm'd image
  tokens ``F`` are the keys *and* the values directly (no K/V projections); ``W_q`` without bias,
  ``W_o`` with bias. Scale: the reference's ``qk_scale or head_dim ** -0.5`` with
  ``head_dim = dim // heads`` -> 1/8 on ViT-B/16 (512 dims, 8 heads), even though the attention is
  single-head (spec §4.2: "scale 1/8");
* ``Q <- Q + MLP(LN4 Q)``: Linear(dim, dim) - GELU - Linear(dim, dim) (hidden = dim, not 4·dim).

``dim`` is the query width (the text token width, since queries become text-encoder inputs) and
``kv_dim`` the width of ``F`` (CLIP's joint embedding); they are equal on every OpenAI CLIP, and
``W_q``: dim -> kv_dim, ``W_o``: kv_dim -> dim otherwise. The reference's unused ``norm_text`` /
``norm_img`` LayerNorms (they receive no gradient, spec §8) are not replicated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Bonder width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale (D/heads)^-0.5
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Single-head attention with the image tokens as keys and values (no K/V projections)."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.scale = (kv_dim // heads) ** -0.5
        self.q = nn.Linear(dim, kv_dim, bias=False)
        self.proj = nn.Linear(kv_dim, dim)

    def forward(self, query: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        attn = (self.q(query) @ feats.transpose(1, 2)) * self.scale  # [B, N, L]
        return self.proj(attn.softmax(dim=-1) @ feats)


class Bonder(nn.Module):
    """One Bonder block: queries [B, N, dim] x image tokens [B, L, kv_dim] -> [B, N, dim]."""

    def __init__(self, dim: int, kv_dim: int, heads: int = 8):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.ln3 = nn.LayerNorm(kv_dim)
        self.cross_attn = CrossAttention(dim, kv_dim, heads)
        self.ln4 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, queries: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        q = queries + self.self_attn(self.ln1(queries))
        q = q + self.cross_attn(self.ln2(q), self.ln3(feats))
        return q + self.mlp(self.ln4(q))
