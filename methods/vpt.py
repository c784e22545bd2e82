"""VPT on the CLIP image tower ("deep vision prompting", MaPLe repo; spec methods.md §5).

Learned visual prompt tokens only; the text side is the frozen CLIP classifier built from the
dataset's hand-crafted template (cosine similarity × CLIP's logit scale), so the method can score
classes it never trained on (base-to-novel, cross-dataset, DG).

Prompt placement (the MaPLe/SEP convention, through ``methods.towers.encode_image``):

* layer 0: M prompts are **appended after the patch tokens** before ``ln_pre`` (``pre_ln`` hook; no
  positional embedding), so the class token stays at index 0 for pooling;
* deep: before each block ``1 <= i < depth`` the last M positions are **replaced** by that layer's own
  fresh prompts (``hook``); blocks ``>= depth`` see the propagated prompt outputs;
* shallow (``deep: false``) = depth 1: only the layer-0 prompts.

Depth rule (``PromptMethod.clip_depth``): ``depth`` (default ``None`` = every block) is clipped to the
backbone's number of vision blocks, so the default means 12 on ViT-B/16 and 3 on the tiny test model.
Needs image tokens (``methods.families``): refused on ResNet / ConvNeXt backbones.

Initialisation: VPT's Xavier uniform U(-a, a), a = sqrt(6 / (3·patch² + D)) (≈ 0.0625 on ViT-B/16).
``prompt_dropout`` applies dropout to the prompt vectors each time they are inserted (training only).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from methods import towers
from methods.backbone import Backbone
from methods.base import PROTOCOLS, MethodConfig, PromptMethod


class VPTConfig(MethodConfig):
    """VPT hyperparameters (schedule in TrainConfig / methods/defaults/vpt.yaml)."""

    n_prompts: int = Field(8, ge=1, description="prompt tokens per prompted layer")
    deep: bool = Field(
        True, description="deep: fresh prompts replaced before every block < depth; shallow: layer 0 only"
    )
    depth: Optional[int] = Field(
        None, ge=1, description="prompted blocks for deep VPT (None = all; clipped to the backbone depth)"
    )
    prompt_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the prompt vectors (training)")
    text_template: Literal["coop", "kgcoop", "sep", "ensemble"] = Field(
        "coop", description="frozen text classifier: the dataset's hand-crafted template kind, or CoOp's ensemble"
    )


class VPT(PromptMethod):
    """Visual prompts (shallow or deep) on the frozen CLIP image tower with a frozen text classifier."""

    name = "vpt"
    protocols = PROTOCOLS
    Config = VPTConfig
    frozen_image_features = False
    needs_image_tokens = True

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: VPTConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        self.n_layers = self.clip_depth(cfg.depth, "vision") if cfg.deep else 1
        d = backbone.vision_width
        a = self.xavier_bound(backbone)
        self.prompts = nn.ParameterList(
            [
                nn.Parameter(torch.empty(cfg.n_prompts, d, device=backbone.device).uniform_(-a, a))
                for _ in range(self.n_layers)
            ]
        )
        self.dropout = nn.Dropout(cfg.prompt_dropout)
        self.register_buffer("text_features", self.hand_text_features(cfg.text_template), persistent=False)

    @staticmethod
    def xavier_bound(bb: Backbone) -> float:
        """VPT's Xavier-uniform bound sqrt(6 / (3·patch² + D))."""
        return math.sqrt(6.0 / (3 * bb.patch_size**2 + bb.vision_width))

    # --- image side -------------------------------------------------------------------------
    def _prompt(self, i: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.dropout(self.prompts[i]).to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def _append(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self._prompt(0, x.shape[0], x.dtype)], dim=1)

    def _replace(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0 or i >= self.n_layers:
            return x
        return torch.cat([x[:, : -self.cfg.n_prompts], self._prompt(i, x.shape[0], x.dtype)], dim=1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return towers.encode_image(self.backbone, images, hook=self._replace, pre_ln=self._append)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_logits(self.image_features(images), self.text_features)

    # --- text side --------------------------------------------------------------------------
    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        super().set_classnames(classnames, dataset)
        self.text_features = self.hand_text_features(self.cfg.text_template)
