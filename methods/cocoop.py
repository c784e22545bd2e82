"""CoCoOp — conditional context optimisation (Zhou et al., CVPR 2022; spec methods.md §5).

CoOp's learned context plus a per-image shift: a meta-network π = Linear(E → E//16)–ReLU–Linear(→ D_t)
(512→32→512 on ViT-B/16) maps the normalised frozen image feature f(x) to a bias added to every
context token, v_m(x) = v_m + π(x). Each image therefore gets its own prompts for all C classes
("{ctx} {name}.", context initialised from ``ctx_init``, by default "a photo of a" with n_ctx 4),
encoded through the learned-context text path (``methods.prompt_text``), and is scored against its
own class features: logits_b = scale · f(x_b) · norm(g_{b,c}) (+ the logit bias of SigLIP backbones).

The image tower is untouched (``frozen_image_features``). The text tower runs on B·C prompts per
batch; ``batched`` does that in one pass (chunks of ``images_per_pass`` images bound the memory),
and ``batched: false`` loops over the images one at a time as the reference does — both give the same
logits (tested).
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from methods.backbone import Backbone
from methods.base import PROTOCOLS, MethodConfig, PromptMethod
from methods.prompt_text import LearnedContextText, check_context


class CoCoOpConfig(MethodConfig):
    """CoCoOp hyperparameters (schedule in TrainConfig / methods/defaults/cocoop.yaml)."""

    n_ctx: int = Field(4, ge=1, description="learned context tokens")
    ctx_init: Optional[str] = Field(
        "a photo of a", description="words initialising the context (None = random N(0, 0.02²))"
    )
    meta_reduction: int = Field(16, ge=1, description="meta-net hidden width = embed_dim // meta_reduction")
    batched: bool = Field(
        True, description="encode all images' prompts in one text-tower pass (False: one image at a time)"
    )
    images_per_pass: Optional[int] = Field(
        None, ge=1, description="batched mode: images per text-tower pass (None = whole batch)"
    )


class CoCoOp(PromptMethod):
    """Instance-conditioned context: shared context + meta-net(image feature) shift."""

    name = "cocoop"
    protocols = PROTOCOLS
    Config = CoCoOpConfig
    frozen_image_features = True

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: CoCoOpConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        self.text = LearnedContextText(backbone, self.classnames, cfg.n_ctx, cfg.ctx_init)
        self.ctx = nn.Parameter(self.text.initial_context())
        e, d_t, dev = backbone.embed_dim, backbone.text_width, backbone.device
        hidden = max(1, e // cfg.meta_reduction)
        self.meta_net = nn.Sequential(
            nn.Linear(e, hidden, device=dev), nn.ReLU(inplace=True), nn.Linear(hidden, d_t, device=dev)
        )

    @classmethod
    def check_settings(cls, cfg: CoCoOpConfig, backbone) -> None:
        check_context(backbone, cfg.n_ctx, cfg.ctx_init)

    @staticmethod
    def expected_trainable(n_ctx: int, e: int, d_t: int, reduction: int = 16) -> int:
        h = e // reduction
        return n_ctx * d_t + (e * h + h) + (h * d_t + d_t)

    def conditioned_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image context [B, n_ctx, D_t] = ctx + π(f(x))."""
        shift = self.meta_net(image_features.to(self.ctx.dtype))
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)

    def logits_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] from normalised frozen image features [B, E]."""
        f = F.normalize(image_features.float(), dim=-1)
        ctx = self.conditioned_context(f)
        scale = self.logit_scale()
        if not self.cfg.batched:
            rows = [scale * F.normalize(self.text.encode(ctx[b]), dim=-1) @ f[b] for b in range(len(f))]
            return torch.stack(rows) + self.logit_bias()
        step = self.cfg.images_per_pass or len(f)
        out = []
        for s in range(0, len(f), step):
            g = F.normalize(self.text.encode_per_image(ctx[s : s + step]), dim=-1)  # [b, C, E]
            out.append(scale * torch.einsum("be,bce->bc", f[s : s + step], g))
        return torch.cat(out) + self.logit_bias()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.backbone.encode_image(images, normalize=True))

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        super().set_classnames(classnames, dataset)
        self.text = LearnedContextText(self.backbone, self.classnames, self.cfg.n_ctx, self.cfg.ctx_init)
