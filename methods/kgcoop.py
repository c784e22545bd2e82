"""KgCoOp — knowledge-guided context optimisation (Yao et al., CVPR 2023; spec methods.md §5).

CoOp (``methods.coop.CoOp``, subclassed: same learned-context text path, same logits) plus a
knowledge-guidance term that keeps the learned class text features close to frozen CLIP's
hand-crafted ones:

    L = CE(logits, y) + λ · (1 − (1/C) Σ_c cos(w_c, w_c^clip))

where ``w_c^clip`` is the frozen CLIP text feature of the dataset's KgCoOp template
(``fewshot.templates.template(dataset, "kgcoop")``, e.g. DTD "a photo of a {}, a type of texture.")
and λ = ``kg_weight`` (8.0 in the reference). With λ = 0 it is exactly CoOp. Only the context
trains; the template features are a non-persistent buffer rebuilt on ``set_classnames``.
Defaults follow the reference: 4 context tokens initialised from "a photo of a".
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch.nn import functional as F

from methods.backbone import Backbone
from methods.coop import CoOp, CoOpConfig


class KgCoOpConfig(CoOpConfig):
    """CoOp's hyperparameters with KgCoOp's defaults, plus the guidance weight λ."""

    n_ctx: int = Field(4, ge=1, description="learned context tokens")
    ctx_init: Optional[str] = Field(
        "a photo of a", description="init words (must be n_ctx tokens), null = random N(0, 0.02^2)"
    )
    kg_weight: float = Field(
        8.0, ge=0, description="λ: weight of 1 - mean cos(learned, hand-crafted class text features)"
    )


class KgCoOp(CoOp):
    """CoOp with the knowledge-guidance regulariser against hand-crafted template text features."""

    name = "kgcoop"
    Config = KgCoOpConfig

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: KgCoOpConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        self.register_buffer("clip_text_features", self.hand_text_features("kgcoop"), persistent=False)

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        super().set_classnames(classnames, dataset)
        self.clip_text_features = self.hand_text_features("kgcoop")

    def guidance(self, text_features: torch.Tensor) -> torch.Tensor:
        """1 − mean_c cos(w_c, w_c^clip)."""
        return 1.0 - F.cosine_similarity(text_features.float(), self.clip_text_features.float(), dim=-1).mean()

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        text = self.text_features()
        logits = self.clip_logits(self.backbone.encode_image(images, normalize=True), text)
        ce = F.cross_entropy(logits, labels)
        kg = self.guidance(text)
        loss = ce + self.cfg.kg_weight * kg
        return loss, {"ce": float(ce.detach()), "kg": float(kg.detach())}
