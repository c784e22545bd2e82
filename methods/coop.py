"""CoOp (Zhou et al., IJCV 2022): learned text context, frozen CLIP.

The class prompt is ``[SOT] v_1..v_M [CLASS] . [EOT]`` with M = ``n_ctx`` learned vectors, built and
encoded by ``methods.prompt_text.LearnedContextText``. Context: one shared [M, D] (default) or
class-specific [C, M, D] (``csc``); initialised from ``ctx_init`` words (which must tokenise to n_ctx
tokens) or N(0, 0.02^2). ``class_token_position``: end | middle | front. Only the context trains;
the image tower is untouched (``frozen_image_features``). Logits = scale * cos(image, text).

Base-to-novel with ``csc``: class-specific context has no vectors for unseen classes, so
``set_classnames`` to a different class list falls back to the mean context over the trained classes
(documented choice; CoOp's paper evaluates novel classes with shared context only).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from methods.backbone import Backbone
from methods.base import PROTOCOLS, MethodConfig, PromptMethod
from methods.prompt_text import LearnedContextText, check_context


class CoOpConfig(MethodConfig):
    """CoOp hyperparameters (schedule in TrainConfig / methods/defaults/coop.yaml)."""

    n_ctx: int = Field(16, ge=1, description="learned context tokens")
    ctx_init: Optional[str] = Field(None, description="init words (must be n_ctx tokens), null = random N(0, 0.02^2)")
    class_token_position: Literal["end", "middle", "front"] = "end"
    csc: bool = Field(False, description="class-specific context (one [n_ctx, D] per class)")


class CoOp(PromptMethod):
    name = "coop"
    protocols = PROTOCOLS
    Config = CoOpConfig
    frozen_image_features = True

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: CoOpConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        self.text = self._text(self.classnames)
        self.ctx = nn.Parameter(self.text.initial_context(class_specific=cfg.csc))

    @classmethod
    def check_settings(cls, cfg: CoOpConfig, backbone) -> None:
        check_context(backbone, cfg.n_ctx, cfg.ctx_init)

    def _text(self, classnames: list[str]) -> LearnedContextText:
        c = self.cfg
        return LearnedContextText(self.backbone, classnames, c.n_ctx, c.ctx_init, c.class_token_position)

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        super().set_classnames(classnames, dataset)
        self.text = self._text(self.classnames)

    def context(self) -> torch.Tensor:
        ctx = self.ctx
        if self.cfg.csc and ctx.shape[0] != self.text.n_classes:
            ctx = ctx.mean(0)  # unseen classes: mean of the class-specific contexts
        return ctx

    def text_features(self) -> torch.Tensor:
        return self.text.encode(self.context())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_logits(self.backbone.encode_image(images, normalize=True), self.eval_text_features())
