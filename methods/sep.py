"""SEP — Self-Enhanced Prompt Tuning (Yao et al., arXiv 2405.15549; spec methods.md §2, §7.1, §8).

Learnable text prompts (``n_ctx_text`` M_t = 6, prompt "X X X X X X {name}.", N(0, 0.02²), through the
shared learned-context text path ``methods.prompt_text``) and visual prompts (``n_ctx_visual`` M_v = 4,
N(0, 0.02²), appended after the patch tokens before ``ln_pre``). Before every block in the fusion
set, a Token Fusion Module (``methods.token_fusion``) per branch and per fused layer rewrites the
prompt hidden states from K selected pre-trained tokens of the same input:

* text: positional selection — the K tokens right after the prompt (positions p+M_t .. p+M_t+K-1, p the
  tokenizer's special tokens before the text: 1 for CLIP's SOT);
* vision: the top-K pre-trained tokens (CLS + patches, not prompts) by mean squared activation,
  scored over the batch mean (``topk_scope: batch_mean``, reference) or per sample.

``tfm_attention_axis``: ``batch`` reproduces the reference's batch-axis attention (slot j of a
sample attends over slot j of all samples / classes, so logits depend on the batch); ``sample`` is
per-sample cross-attention. K defaults to M (``selected_text``/``selected_visual`` null); a K != M
is allowed only with ``sample`` attention, and then the TFM residual base is the prompt P instead of
the selected tokens R (the reference adds R to an M-long output, which needs K == M).

Fusion layers (both branches): ``fusion_layers`` (explicit set), ``fusion_depth`` d (layers 1..d)
or ``fusion_preset`` (the reference's ``L_IND`` 0..19, default 0 = layers 1..11); at most one may be
set. Depth rule (``PromptMethod.clip_layers``): a layer index beyond the tower is clipped to its last
block and duplicates are dropped (so preset 0 is {1..11} on ViT-B/16 and {1, 2} on the 3-block tiny
model). The module used at a fused layer is the one at that layer's position in the sorted fused-layer
list (§8). Init as the reference's ``_get_clones``: per branch, one TFM is drawn (under the trial's seed)
and every fused layer's module starts as a copy of it (``base.clones``); they are trained separately.

Residual ensembling with frozen CLIP: f̂ = norm(norm(f) + norm(f₀)), ĝ_c = norm(norm(g_c) + norm(g⁰_c))
where f₀ is the prompt-free image feature and g⁰ the text feature of the dataset's SEP template
(``fewshot.templates.template(dataset, "sep")``); logits = CLIP logit scale (detached) · f̂ ĝᵀ (+ the
logit bias of SigLIP backbones). Needs image tokens: refused on ResNet / ConvNeXt backbones.
Loss: CE + W_t (1 − mean cos(ĝ, g⁰)) + W_v (1 − mean cos(f̂, f₀)) + ½ [CE(10 cos(f̂, μ)) + CE(10 cos(f₀, μ))];
the prototype head μ [C, E] is trained, set in ``prepare`` to the normalised per-class mean of f₀,
and never used for logits (``set_classnames`` leaves it alone: it belongs to the training classes).

Parameter count: we create TFMs **only for the fused layers** and each has two LayerNorms (the
reference's unused third LN and its two unused clone templates are not built). Trainable =
M_t·d_t + M_v·d_v + |S_t|·T(d_t) + |S_v|·T(d_v) + C·E with T(d) = 4d² + 8d + 2·d·hidden + 2; on
ViT-B/16 with layers 1..11: 44,814,380 + 512·C. (The reference registers 13 modules per branch with
3 LNs each: 52,994,612 + 512·C; its used-only count is 44,842,540 + 512·C.)
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from fewshot.errors import ConfigError
from methods import towers
from methods.backbone import Backbone
from methods.base import PROTOCOLS, MethodConfig, PromptMethod, clones
from methods.prompt_text import LearnedContextText, check_context
from methods.token_fusion import AttentionAxis, TokenFusion, TopKScope, select_top_energy

#: the reference's L_IND presets (SEP_main/trainers/sep.py), fusion layer sets for both branches
LAYER_PRESETS: dict[int, tuple[int, ...]] = {
    0: tuple(range(1, 12)),
    1: tuple(range(1, 9)),
    2: tuple(range(5, 12)),
    3: (1, 3, 5, 7, 9, 11),
    4: (2, 4, 6, 8, 10),
    5: (3, 6, 9),
    6: (4, 8, 10),
    7: (4, 8),
    8: (4, 10),
    9: (4, 6),
    10: (8, 10),
    11: (2,),
    12: (6,),
    13: (1,),
    14: (3,),
    15: (5,),
    16: (7,),
    17: (9,),
    18: (10,),
    19: (11,),
}
PROTOTYPE_SCALE = 10.0
CTX_STD = 0.02


class SEPConfig(MethodConfig):
    """SEP hyperparameters (schedule in TrainConfig / methods/defaults/sep.yaml)."""

    n_ctx_text: int = Field(6, ge=1, description="M_t: learnable text prompt tokens")
    n_ctx_visual: int = Field(4, ge=1, description="M_v: learnable visual prompt tokens")
    selected_text: Optional[int] = Field(
        None, ge=1, description="K_t selected text tokens (null = M_t; != M_t needs sample attention)"
    )
    selected_visual: Optional[int] = Field(
        None, ge=1, description="K_v selected visual tokens (null = M_v; != M_v needs sample attention)"
    )
    fusion_layers: Optional[list[int]] = Field(
        None, description="explicit fusion layer set (block indices, clipped to the tower)"
    )
    fusion_depth: Optional[int] = Field(None, ge=1, description="fuse layers 1..depth")
    fusion_preset: Optional[int] = Field(
        None, ge=0, le=19, description="the reference's L_IND preset (default 0: layers 1..11)"
    )
    tfm_attention_axis: AttentionAxis = Field(
        "batch", description="batch = reference batch-axis attention; sample = per-sample"
    )
    topk_scope: TopKScope = Field("batch_mean", description="visual top-K scores: batch mean (reference) or per sample")
    tfm_hidden: int = Field(256, ge=1, description="TFM MLP hidden width")
    tfm_scale_init: float = Field(0.75, description="initial s1, s2")
    text_consistency_weight: float = Field(8.0, ge=0, description="W_t")
    visual_consistency_weight: float = Field(6.0, ge=0, description="W_v")
    prototype_loss_weight: float = Field(0.5, ge=0, description="weight of the two prototype-head CE terms")

    @model_validator(mode="after")
    def _check(self) -> "SEPConfig":
        chosen = [k for k in ("fusion_layers", "fusion_depth", "fusion_preset") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(
                f"set only one of fusion_layers, fusion_depth, fusion_preset (got {', '.join(chosen)}); "
                f"set the others to null"
            )
        if self.fusion_layers is not None and (not self.fusion_layers or min(self.fusion_layers) < 0):
            raise ValueError("fusion_layers must be a non-empty list of block indices >= 0")
        if self.tfm_attention_axis == "batch":
            for k, m, name in (
                (self.selected_text, self.n_ctx_text, "selected_text"),
                (self.selected_visual, self.n_ctx_visual, "selected_visual"),
            ):
                if k is not None and k != m:
                    raise ValueError(
                        f"{name}={k} differs from the prompt length {m}: batch-axis attention needs "
                        f"K == M; set tfm_attention_axis: sample or {name}: null"
                    )
        return self

    def layer_set(self) -> tuple[int, ...]:
        if self.fusion_layers is not None:
            return tuple(sorted(set(self.fusion_layers)))
        if self.fusion_depth is not None:
            return tuple(range(1, self.fusion_depth + 1))
        return LAYER_PRESETS[0 if self.fusion_preset is None else self.fusion_preset]


class SEP(PromptMethod):
    """Self-enhanced text/visual prompts with token fusion, residual-ensembled with frozen CLIP."""

    name = "sep"
    protocols = PROTOCOLS
    Config = SEPConfig
    frozen_image_features = False
    needs_image_tokens = True

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: SEPConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        bb, dev = backbone, backbone.device
        self.k_text = cfg.selected_text or cfg.n_ctx_text
        self.k_visual = cfg.selected_visual or cfg.n_ctx_visual
        self.text_layers = self.clip_layers(cfg.layer_set(), "text")
        self.visual_layers = self.clip_layers(cfg.layer_set(), "vision")
        self.text = self._build_text(self.classnames)
        self.ctx_text = nn.Parameter(self.text.initial_context())
        self.ctx_visual = nn.Parameter(torch.randn(cfg.n_ctx_visual, bb.vision_width, device=dev) * CTX_STD)
        tfm = dict(hidden=cfg.tfm_hidden, scale_init=cfg.tfm_scale_init, axis=cfg.tfm_attention_axis, device=dev)
        self.text_fusion = clones(TokenFusion(bb.text_width, **tfm), len(self.text_layers))
        self.visual_fusion = clones(TokenFusion(bb.vision_width, **tfm), len(self.visual_layers))
        self.prototypes = nn.Parameter(torch.zeros(len(self.classnames), bb.embed_dim, device=dev))
        from fewshot.templates import template

        template(dataset, "sep")  # unknown dataset: ConfigError now, not at first use
        object.__setattr__(self, "_template", None)  # frozen g⁰, computed on first use (not state)

    @classmethod
    def check_settings(cls, cfg: SEPConfig, backbone: Backbone) -> None:
        k_text, k_visual = cfg.selected_text or cfg.n_ctx_text, cfg.selected_visual or cfg.n_ctx_visual
        if k_visual > backbone.image_tokens:
            raise ConfigError(
                f"selected_visual={k_visual} exceeds the {backbone.image_tokens} pre-trained image tokens: "
                f"choose at most {backbone.image_tokens}"
            )
        check_context(backbone, cfg.n_ctx_text)
        room = backbone.context_length - backbone.token_rule.prefix
        if cfg.n_ctx_text + k_text > room:
            raise ConfigError(
                f"n_ctx_text + selected_text = {cfg.n_ctx_text + k_text} exceeds the text context "
                f"{room}: use fewer tokens"
            )

    # --- construction helpers ---------------------------------------------------------------
    def _build_text(self, classnames: list[str]) -> LearnedContextText:
        return LearnedContextText(self.backbone, classnames, self.cfg.n_ctx_text, cut_after_eot=False)

    @property
    def template_features(self) -> torch.Tensor:
        """Frozen CLIP text features g⁰ [C, E] of the scored dataset's SEP template (lazy: building stays cheap)."""
        if self._template is None:
            object.__setattr__(self, "_template", self.hand_text_features("sep"))
        return self._template

    @staticmethod
    def expected_trainable(
        n_ctx_text: int,
        n_ctx_visual: int,
        n_text_layers: int,
        n_visual_layers: int,
        d_t: int,
        d_v: int,
        embed_dim: int,
        n_classes: int,
        hidden: int = 256,
    ) -> int:
        """M_t·d_t + M_v·d_v + |S_t|·T(d_t) + |S_v|·T(d_v) + C·E (TFMs only for the fused layers)."""
        return (
            n_ctx_text * d_t
            + n_ctx_visual * d_v
            + n_text_layers * TokenFusion.param_count(d_t, hidden)
            + n_visual_layers * TokenFusion.param_count(d_v, hidden)
            + n_classes * embed_dim
        )

    def param_breakdown(self) -> dict[str, int]:
        """Counts per part; the TFM keys name the fused layers (modules exist only for those)."""

        def count(mod):
            return sum(p.numel() for p in mod.parameters())

        return {
            "ctx_text": self.ctx_text.numel(),
            "ctx_visual": self.ctx_visual.numel(),
            f"text_fusion[used layers {list(self.text_layers)}]": count(self.text_fusion),
            f"visual_fusion[used layers {list(self.visual_layers)}]": count(self.visual_fusion),
            "prototypes": self.prototypes.numel(),
        }

    # --- towers -----------------------------------------------------------------------------
    def _text_hook(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i not in self.text_layers:
            return x
        M, K, s = self.cfg.n_ctx_text, self.k_text, self.text.ctx_start
        tfm = self.text_fusion[self.text_layers.index(i)]
        z = tfm(x[:, s + M : s + M + K], x[:, s : s + M])
        return torch.cat([x[:, :s], z.to(x.dtype), x[:, s + M :]], dim=1)

    def text_features(self) -> torch.Tensor:
        """Prompted class text features g [C, E] (unnormalised)."""
        return self.text.encode(self.ctx_text, hook=self._text_hook)

    def _append_visual(self, x: torch.Tensor) -> torch.Tensor:
        p = self.ctx_visual.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x, p], dim=1)

    def _visual_hook(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i not in self.visual_layers:
            return x
        n0 = x.shape[1] - self.cfg.n_ctx_visual
        selected = select_top_energy(x[:, :n0], self.k_visual, self.cfg.topk_scope)
        z = self.visual_fusion[self.visual_layers.index(i)](selected, x[:, n0:])
        return torch.cat([x[:, :n0], z.to(x.dtype)], dim=1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted image features f [B, E] (unnormalised)."""
        return towers.encode_image(self.backbone, images, hook=self._visual_hook, pre_ln=self._append_visual)

    def frozen_image(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt-free CLIP image features f₀ [B, E] (no gradient)."""
        with torch.no_grad():
            return towers.encode_image(self.backbone, images).float()

    def fused_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f̂ [B, E], ĝ [C, E], f₀ [B, E]): residual ensembles with the frozen features, all normalised."""
        f0 = F.normalize(self.frozen_image(images), dim=-1)
        f = F.normalize(self.image_features(images).float(), dim=-1)
        g = F.normalize(self.eval_text_features().float(), dim=-1)
        g0 = F.normalize(self.template_features.float(), dim=-1)
        return F.normalize(f + f0, dim=-1), F.normalize(g + g0, dim=-1), f0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f_hat, g_hat, _ = self.fused_features(images)
        return self.logit_scale() * f_hat @ g_hat.t() + self.logit_bias()

    # --- training ---------------------------------------------------------------------------
    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        if self.prototypes.shape[0] != len(self.classnames):
            raise ConfigError(
                f"SEP's prototype head has {self.prototypes.shape[0]} classes but the method now has "
                f"{len(self.classnames)}: train on the classes the method was built with"
            )
        labels = labels.to(self.device)
        f_hat, g_hat, f0 = self.fused_features(images)
        ce = F.cross_entropy(self.logit_scale() * f_hat @ g_hat.t() + self.logit_bias(), labels)
        g0 = F.normalize(self.template_features.float(), dim=-1)
        text_cons = 1 - F.cosine_similarity(g_hat, g0, dim=-1).mean()
        vis_cons = 1 - F.cosine_similarity(f0, f_hat, dim=-1).mean()
        mu = F.normalize(self.prototypes.float(), dim=-1)
        proto = F.cross_entropy(PROTOTYPE_SCALE * f_hat @ mu.t(), labels) + F.cross_entropy(
            PROTOTYPE_SCALE * f0 @ mu.t(), labels
        )
        loss = (
            ce
            + cfg.text_consistency_weight * text_cons
            + cfg.visual_consistency_weight * vis_cons
            + cfg.prototype_loss_weight * proto
        )
        return loss, {
            "ce": float(ce.detach()),
            "text_consistency": float(text_cons.detach()),
            "visual_consistency": float(vis_cons.detach()),
            "prototype_ce": float(proto.detach()),
        }

    def prepare(self, train_loader) -> None:
        """μ ← the L2-normalised per-class mean of the frozen image features over the training loader."""
        C, E = len(self.classnames), self.backbone.embed_dim
        sums = torch.zeros(C, E, device=self.device)
        counts = torch.zeros(C, device=self.device)
        for images, labels, *_ in train_loader:
            labels = labels.to(self.device)
            f0 = F.normalize(self.frozen_image(images), dim=-1)
            sums.index_add_(0, labels, f0)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        if bool((counts == 0).any()):
            missing = [self.classnames[i] for i in (counts == 0).nonzero().flatten().tolist()[:5]]
            raise ConfigError(
                f"SEP prepare: no training images for class(es) {missing}: the training loader must cover every class"
            )
        with torch.no_grad():
            self.prototypes.copy_(F.normalize(sums / counts[:, None], dim=-1))

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        """Rebuild the text prompts and the frozen template features g⁰ (from ``dataset``'s SEP template);
        μ (training-only) is kept."""
        super().set_classnames(classnames, dataset)
        self.text = self._build_text(self.classnames)
        object.__setattr__(self, "_template", None)
