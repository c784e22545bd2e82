"""SEP's Token Fusion Module (TFM) and its token selection rules (spec methods.md §2.3).

``TokenFusion(R, P) -> Z`` merges the learnable prompt tokens ``P`` [N, M, d] with ``K`` selected
pre-trained tokens ``R`` [N, K, d] of the same input (N = images, or classes on the text side):

    Z1 = s1 * base + (1 - s1) * MHA(q = LN_a(P), k = v = LN_a(R))
    Z  = s2 * Z1   + (1 - s2) * MLP(LN_b(Z1))        MLP: d -> hidden -> d, no bias, QuickGELU

``s1, s2`` are learnable scalars (init 0.75); one LayerNorm ``LN_a`` serves query and key/value; the
attention has ``d / 64`` heads (at least 1) with biased q/k/v/out projections. ``base`` is the
selected tokens ``R`` when ``K == M`` (the reference: the residual adds R to an M-long output), and the
prompt ``P`` when ``K != M`` (only allowed with per-sample attention, where the output length is M).

Attention axis:

* ``batch`` — the reference's behaviour, reproduced on purpose: it feeds [N, K, d] into a
  sequence-first attention, so the N axis is the *sequence* and the slot axis is the batch: prompt
  slot j of sample n attends over selected token j of **every** sample in the batch (text: every
  class). Outputs therefore depend on the batch's composition. Needs K == M.
* ``sample`` — per-sample cross-attention: each sample's M prompt tokens attend over its own K
  selected tokens; outputs are independent of the rest of the batch.

Selection helpers: ``select_top_energy`` scores pre-trained tokens by their mean squared activation
(the reference's rule) and takes the top K, either one index set from the batch-mean score
(``batch_mean``, reference) or per sample (``per_sample``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

AttentionAxis = Literal["batch", "sample"]
TopKScope = Literal["batch_mean", "per_sample"]


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TokenFusion(nn.Module):
    """One TFM (one fused layer of one branch)."""

    def __init__(
        self, width: int, hidden: int = 256, scale_init: float = 0.75, axis: AttentionAxis = "batch", device=None
    ):
        super().__init__()
        if axis not in ("batch", "sample"):
            raise ValueError(f"attention axis must be batch or sample (got {axis!r})")
        self.axis = axis
        heads = max(1, width // 64)
        while width % heads:
            heads -= 1
        self.ln_a = nn.LayerNorm(width, device=device)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, device=device)
        self.ln_b = nn.LayerNorm(width, device=device)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden, bias=False, device=device),
            QuickGELU(),
            nn.Linear(hidden, width, bias=False, device=device),
        )
        self.s1 = nn.Parameter(torch.tensor(float(scale_init), device=device))
        self.s2 = nn.Parameter(torch.tensor(float(scale_init), device=device))

    @staticmethod
    def param_count(width: int, hidden: int) -> int:
        """MHA 4d²+4d, two LayerNorms 4d, MLP 2·d·hidden, two scalars."""
        return 4 * width * width + 4 * width + 4 * width + 2 * width * hidden + 2

    def forward(self, selected: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        K, M = selected.shape[1], prompt.shape[1]
        q, kv = self.ln_a(prompt), self.ln_a(selected)
        if self.axis == "batch":
            if K != M:
                raise ValueError(f"batch-axis attention needs K == M (got K={K}, M={M})")
            # slot axis as batch, sample axis as sequence: slot j attends over slot j of all samples
            out = self.attn(q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), need_weights=False)[0]
            out = out.transpose(0, 1)
        else:
            out = self.attn(q, kv, kv, need_weights=False)[0]
        base = selected if K == M else prompt
        z = self.s1 * base + (1 - self.s1) * out
        return self.s2 * z + (1 - self.s2) * self.mlp(self.ln_b(z))


def select_top_energy(tokens: torch.Tensor, k: int, scope: TopKScope) -> torch.Tensor:
    """The ``k`` tokens [N, k, d] of ``tokens`` [N, L, d] with the largest mean squared activation.

    ``batch_mean``: scores averaged over the batch, one index set for all samples (reference);
    ``per_sample``: each sample's own top-k. Indices are kept in descending score order.
    """
    if k > tokens.shape[1]:
        raise ValueError(f"cannot select {k} of {tokens.shape[1]} tokens")
    energy = tokens.float().pow(2).mean(dim=-1)  # [N, L]
    if scope == "batch_mean":
        idx = energy.mean(dim=0).topk(k).indices  # [k]
        return tokens[:, idx]
    if scope == "per_sample":
        idx = energy.topk(k, dim=1).indices  # [N, k]
        return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    raise ValueError(f"topk scope must be batch_mean or per_sample (got {scope!r})")
