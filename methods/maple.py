"""MaPLe — multi-modal prompt learning (Khattak et al., CVPR 2023; spec methods.md §5, §8).

Coupled deep prompts on both towers:

* text: the learned context ``P_t^0`` ∈ R^{n_ctx×D_t} replaces the first ``n_ctx`` word tokens of
  "{ctx_init} {name}." — with ``n_ctx`` 2 and ``ctx_init`` "a photo of a" that is
  "[ctx][ctx] of a {name}." (context initialised from "a photo"); without ``ctx_init`` the prompt is
  "X X {name}." with N(0, 0.02²) context. Deeper text prompts ``P_t^l`` (l = 1..J-1, N(0, 0.02²))
  **replace** positions 1..n_ctx before text block l;
* vision: ``P_v^l = Linear_l(P_t^l)`` (coupling D_t → D_v, 512→768 on ViT-B/16). ``P_v^0`` is
  **appended after the patch tokens before ln_pre**; ``P_v^l`` replaces the last n_ctx positions before
  vision block l (1 <= l < J); blocks >= J see the propagated prompt outputs;
* logits: CLIP's logit scale × cosine(image feature, class text feature).

The coupling layers 1..J-1 start as identical copies of one randomly initialised Linear, as the
reference builds them with ``_get_clones`` (``base.clones``); coupling 0 is initialised independently.

Depth rule (``PromptMethod.clip_depth``): the prompt depth J is clipped to min(J, text blocks, vision
blocks), so the default 9 is 9 on ViT-B/16 and 3 on the 3-block tiny test model. Needs image tokens
(``methods.families``): refused on ResNet / ConvNeXt backbones. Trainable parameters:
J·n_ctx·D_t + J·(D_t·D_v + D_v) (ViT-B/16, n_ctx 2, J 9: 9,216 + 3,545,856 = 3,555,072).
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from fewshot.errors import ConfigError
from methods import towers
from methods.backbone import Backbone
from methods.base import PROTOCOLS, MethodConfig, PromptMethod, clones
from methods.prompt_text import LearnedContextText, check_context, n_text_tokens


def split_ctx_init(bb: Backbone, ctx_init: Optional[str], n_ctx: int) -> tuple[Optional[str], str]:
    """Split ``ctx_init`` into (leading words of exactly ``n_ctx`` BPE tokens, remaining words).

    "a photo of a" with n_ctx 2 -> ("a photo", "of a"). ``None`` -> (None, ""): random context.
    """
    if not ctx_init:
        return None, ""
    words = ctx_init.strip().replace("_", " ").split()
    for k in range(1, len(words) + 1):
        head = " ".join(words[:k])
        n = n_text_tokens(bb, head)
        if n == n_ctx:
            return head, " ".join(words[k:])
        if n > n_ctx:
            break
    raise ConfigError(
        f"ctx_init '{ctx_init}': no leading words tokenise to exactly n_ctx={n_ctx} tokens "
        f"(use fewer/more context tokens or another ctx_init, or ctx_init: null)"
    )


class MaPLeConfig(MethodConfig):
    """MaPLe hyperparameters (schedule in TrainConfig / methods/defaults/maple.yaml)."""

    n_ctx: int = Field(2, ge=1, description="learned context tokens per layer (text), = visual prompt tokens")
    ctx_init: Optional[str] = Field(
        "a photo of a",
        description="prompt prefix whose first n_ctx words initialise the context; None = random 'X' context",
    )
    prompt_depth: int = Field(
        9, ge=1, description="J: layers 0..J-1 get coupled prompts (clipped to the backbone depth)"
    )


class MaPLe(PromptMethod):
    """Coupled deep text/vision prompts; visual prompts are linear maps of the text prompts."""

    name = "maple"
    protocols = PROTOCOLS
    Config = MaPLeConfig
    frozen_image_features = False
    needs_image_tokens = True

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: MaPLeConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        self.depth = self.clip_depth(cfg.prompt_depth, "text", "vision")
        self.text = self._build_text(self.classnames)
        d_t, d_v, dev = backbone.text_width, backbone.vision_width, backbone.device
        self.ctx = nn.Parameter(self.text.initial_context())
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(cfg.n_ctx, d_t, device=dev) * 0.02) for _ in range(self.depth - 1)]
        )
        self.proj = nn.Linear(d_t, d_v, device=dev)
        self.deep_proj = clones(nn.Linear(d_t, d_v, device=dev), self.depth - 1)

    @classmethod
    def check_settings(cls, cfg: MaPLeConfig, backbone: Backbone) -> None:
        init, _rest = split_ctx_init(backbone, cfg.ctx_init, cfg.n_ctx)
        check_context(backbone, cfg.n_ctx, init)

    def _build_text(self, classnames: list[str]) -> LearnedContextText:
        """The shared learned-context text path with MaPLe's prompt "[ctx]*n_ctx {rest of ctx_init} {name}."

        ``ctx_init``'s leading words that tokenise to exactly ``n_ctx`` tokens initialise the context;
        its remaining words stay as frozen text in front of every class name.
        """
        init, rest = split_ctx_init(self.backbone, self.cfg.ctx_init, self.cfg.n_ctx)
        names = [f"{rest} {c.replace('_', ' ')}" if rest else c for c in classnames]
        return LearnedContextText(self.backbone, names, self.cfg.n_ctx, init)

    @staticmethod
    def expected_trainable(n_ctx: int, depth: int, d_t: int, d_v: int) -> int:
        """J·n_ctx·D_t (text prompts) + J·(D_t·D_v + D_v) (coupling layers)."""
        return depth * n_ctx * d_t + depth * (d_t * d_v + d_v)

    # --- prompts ----------------------------------------------------------------------------
    def text_prompts(self) -> list[torch.Tensor]:
        return [self.ctx, *self.deep_text]

    def visual_prompts(self) -> list[torch.Tensor]:
        return [self.proj(self.ctx), *[lin(p) for lin, p in zip(self.deep_proj, self.deep_text)]]

    # --- towers -----------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        n, s = self.cfg.n_ctx, self.text.ctx_start

        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            if i == 0 or i >= self.depth:
                return x
            p = self.deep_text[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :s], p, x[:, s + n :]], dim=1)

        return self.text.encode(self.ctx, hook=hook)

    def image_features(self, images: torch.Tensor, visual: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        visual = self.visual_prompts() if visual is None else visual
        n = self.cfg.n_ctx

        def expand(p, x):
            return p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)

        def pre_ln(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, expand(visual[0], x)], dim=1)

        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            if i == 0 or i >= self.depth:
                return x
            return torch.cat([x[:, :-n], expand(visual[i], x)], dim=1)

        return towers.encode_image(self.backbone, images, hook=hook, pre_ln=pre_ln)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_logits(self.image_features(images), self.eval_text_features())

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        super().set_classnames(classnames, dataset)
        self.text = self._build_text(self.classnames)
