"""Zero-shot CLIP: the frozen model classifying with hand-crafted prompts, nothing learned.

Class text features come from the dataset's CoOp template (``fewshot.templates.template(dataset,
"coop")``, e.g. "a photo of a {}, a type of pet.") or, with ``ensemble: true``, from the average of
the normalised features over ``ensemble_templates(dataset)`` (CLIP's prompt ensembling). Logits are
``logit_scale * norm(image) @ norm(text).T``. ``trains_by_gradient`` is False and ``fit`` does nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from methods.backbone import Backbone
from methods.base import PROTOCOLS, MethodConfig, PromptMethod


class ZeroShotConfig(MethodConfig):
    """Zero-shot CLIP options."""

    ensemble: bool = Field(False, description="average the text features over the dataset's template ensemble")


class ZeroShotCLIP(PromptMethod):
    name = "zeroshot"
    protocols = PROTOCOLS
    Config = ZeroShotConfig
    frozen_image_features = True
    trains_by_gradient = False

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: ZeroShotConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        super().set_classnames(classnames, dataset)
        self.register_buffer(
            "text_features", self.hand_text_features("ensemble" if self.cfg.ensemble else "coop"), persistent=False
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_logits(self.backbone.encode_image(images, normalize=True), self.text_features)
