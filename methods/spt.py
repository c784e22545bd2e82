"""SPT — Self-Prompt Tuning (Wang et al., ICML 2024) on the CLIP image tower (spec methods.md §3, §7.2).

VPT-style visual prompts whose initial values are *downstream token prototypes*: statistics of the
patch tokens the frozen, prompt-free model produces on the training images at each prompted layer.

Where the prompts go (through ``methods.towers.encode_image``'s layer hook, the one insertion path):

* right after the class token: ``[CLS; P; patches]`` (a SigLIP tower has no class token: ``[P; patches]``),
  with no positional embedding on the prompts (no rotation on EVA: ``prompts_at="after_prefix"``);
* shallow (``deep: false``): M prompts inserted once, before block 0 — i.e. *after* ``ln_pre``,
  the spec's recommendation, so the prompts play the role of timm's "input of block 0" tokens and
  are not normalised by ``ln_pre``; they then flow through every block like patch tokens;
* deep (``deep: true``): inserted before block 0 and *replaced* by the layer's own M vectors before
  every later block ``i < depth`` (VPT-deep); blocks from ``depth`` on see the propagated prompt
  outputs. Depth rule: ``depth`` (default ``None`` = every block) is clipped to the backbone's number
  of vision blocks, so the default means 12 on ViT-B/16 and 3 on the tiny test model (as in VPT).

Initialisation (``prepare(train_loader)``, seeded; ``methods.prototypes`` does the statistics):
the frozen model runs over the training loader in batches; at the input of each prompted block
``i`` (block 0: the ``ln_pre`` output, i.e. exactly the tokens the prompts sit next to) the patch
tokens (CLS removed) are streamed into one collector per layer: ``random`` token sampling,
``mean_pool``, ``max_pool`` (the reference's window rule, see ``prototypes.pool_windows``) or
``kmeans`` (mini-batch k-means). ``xavier`` is VPT's init, U(-a, a) with
a = sqrt(6 / (3·patch² + D)), and needs no data. The seed is ``init_seed``, or when unset a number
drawn from torch's global generator at ``prepare`` time (which the trial seeds per trial seed).
``init_max_images`` caps the images used (the spec's "sample fraction").

``init_sampling`` (``random`` / ``mean_pool`` / ``max_pool``): ``streaming`` (default) samples uniformly
from the loader's stream by reservoir sampling (one pass, O(M·D) memory, batch-invariant); ``reference``
does what the reference's ``prompt_generator`` does, under the seed above: S image indices drawn with
replacement (``torch.randint``; S = ``init_max_images`` or the training set's size) from the training
set (its training transform), then per prompted layer ``argsort(torch.rand(rows))[:M]`` over the
flattened rows (``prototypes.ReferenceSampler``; capture points as above). Needs image tokens: refused
on ResNet / ConvNeXt backbones.

Heads: ``linear`` (the reference: Linear(E, C) on the pooled, projected image feature; trunc-normal
std 0.02, bias 0) and ``text`` (cosine similarity against frozen class-text features from the
dataset's hand-crafted template × CLIP's logit scale; no head parameters; a target is scored with
its own template). Only the text head can score classes it was not trained on, so all four
protocols are declared; the linear head (``tied_to_training_classes``) scores its training classes
or a subset of them by name (ImageNet → V2 / Sketch, and A / R through their rows), and the
planner refuses base2novel and cross-dataset cells that would need more.

Optimisation: ``param_groups`` gives prompts wd = ``train.weight_decay``, head weight wd =
``head_weight_decay``, head bias (1-D) wd 0; AdamW with linear warm-up then cosine comes from
``TrainConfig`` (see ``methods/defaults/spt.yaml``).
"""

from __future__ import annotations

from typing import Iterable, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from fewshot.errors import ConfigError
from methods import towers
from methods.backbone import Backbone
from methods.base import PROTOCOLS, MethodConfig, PromptMethod, TrainConfig
from methods.prototypes import Prototypes, ReferenceSampler, make_collector
from methods.vpt import VPT


class _StopForward(Exception):
    """Raised by the statistics hook once the last prompted layer's input has been seen."""


class SPTConfig(MethodConfig):
    """SPT's own hyperparameters (training schedule lives in ``TrainConfig``)."""

    n_prompts: int = Field(20, ge=1, description="prompt tokens per prompted layer (M)")
    deep: bool = Field(
        True, description="deep: replaced before every block < depth; shallow: inserted once before block 0"
    )
    depth: Optional[int] = Field(
        None,
        ge=1,
        description="deep: blocks 0..depth-1 get their own prompts (None = all; clipped to the backbone depth)",
    )
    init: Literal["random", "mean_pool", "max_pool", "kmeans", "xavier"] = Field(
        "random", description="prompt initialisation: token prototypes (random/mean_pool/max_pool/kmeans) or VPT xavier"
    )
    head: Literal["linear", "text"] = Field(
        "linear", description="linear head (reference, fewshot only) or frozen class-text cosine head"
    )
    head_weight_decay: float = Field(1.0, ge=0, description="AdamW weight decay of the linear head's weight")
    head_init_std: float = Field(0.02, gt=0, description="trunc-normal std of the linear head's weight")
    text_template: Literal["coop", "kgcoop", "sep", "ensemble"] = Field(
        "coop", description="text head: the dataset's hand-crafted template kind, or CoOp's template ensemble"
    )
    init_seed: Optional[int] = Field(
        None, description="seed of the prototype sampling; None = drawn from torch's seeded RNG"
    )
    init_max_images: Optional[int] = Field(
        None,
        ge=1,
        description="use at most this many training images for the statistics "
        "(reference sampling: the number of images drawn)",
    )
    kmeans_passes: int = Field(1, ge=1, description="passes over the training loader for kmeans")
    init_sampling: Literal["streaming", "reference"] = Field(
        "streaming",
        description="streaming: reservoir sampling over the training loader (O(M·D) memory); reference: "
        "the reference's images drawn with replacement and argsort(rand) row choice",
    )

    @model_validator(mode="after")
    def _reference_rules(self) -> "SPTConfig":
        if self.init_sampling == "reference" and self.init not in ("random", "mean_pool", "max_pool"):
            raise ValueError(
                f"init_sampling: reference covers init random, mean_pool and max_pool (got init: {self.init}); "
                "use init_sampling: streaming"
            )
        return self


class SPT(PromptMethod):
    """Self-Prompt Tuning: prototype-initialised visual prompts + linear or text head."""

    name = "spt"
    protocols = PROTOCOLS
    Config = SPTConfig
    frozen_image_features = False
    trains_by_gradient = True
    needs_image_tokens = True

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: SPTConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        width = backbone.vision_width
        self.num_layers = self.clip_depth(cfg.depth, "vision") if cfg.deep else 1
        self.prompts = nn.Parameter(torch.empty(self.num_layers, cfg.n_prompts, width, device=backbone.device))
        nn.init.uniform_(self.prompts, -self.xavier_bound(backbone), self.xavier_bound(backbone))
        #: which rule produced the current prompt values, and per layer the stream indices picked
        self.initialised_from = "xavier"
        self.init_prototypes: dict[int, Prototypes] = {}
        self.head_rows: Optional[torch.Tensor] = None  # the head's rows for the classes scored now (None: all)
        if cfg.head == "linear":
            self.head = nn.Linear(backbone.embed_dim, len(self.classnames), device=backbone.device)
            nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = None
            self.register_buffer("text_features", self.hand_text_features(cfg.text_template), persistent=False)

    # --- sizes / init ----------------------------------------------------------------------
    @staticmethod
    def xavier_bound(bb: Backbone) -> float:
        """VPT's bound a = sqrt(6 / (3·patch·patch + D)) (0.0625 for ViT-B/16): the same init as methods.vpt."""
        return VPT.xavier_bound(bb)

    def prompted_layers(self) -> list[int]:
        return list(range(self.num_layers))

    @torch.no_grad()
    def prepare(self, train_loader: Iterable) -> None:
        """Set the prompts to token prototypes of the frozen, prompt-free model (no-op for ``xavier``)."""
        cfg = self.cfg
        if cfg.init == "xavier":
            return
        seed = cfg.init_seed if cfg.init_seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        layers = self.prompted_layers()
        if cfg.init_sampling == "reference":
            collectors, batches = self._reference_stream(train_loader, layers, seed)
        else:
            collectors = {i: make_collector(cfg.init, cfg.n_prompts, seed * 1000 + i) for i in layers}
            passes = cfg.kmeans_passes if cfg.init == "kmeans" else 1
            batches = (images for _ in range(passes) for images in self._capped_images(train_loader))
        last, npt = max(layers), self.backbone.image_prefix_tokens

        def capture(i: int, x: torch.Tensor) -> torch.Tensor:
            if i in collectors:
                collectors[i].update(x[:, npt:].float())  # patch tokens only, class token removed
            if i == last:  # later blocks are not needed: stop the frozen forward here
                raise _StopForward
            return x

        for images in batches:
            try:
                towers.encode_image(self.backbone, images, hook=capture)
            except _StopForward:
                pass
        try:
            protos = {i: collectors[i].result() for i in layers}
        except ValueError as exc:
            raise ConfigError(f"SPT init '{cfg.init}' needs training images: {exc} (check the few-shot split)") from exc
        for i, p in protos.items():
            self.prompts.data[i] = p.vectors.to(self.prompts.dtype).to(self.prompts.device)
        self.init_prototypes = protos
        self.initialised_from = cfg.init

    def _capped_images(self, train_loader: Iterable):
        """The loader's image batches, at most ``init_max_images`` images in all (one pass)."""
        used, cap = 0, self.cfg.init_max_images
        for batch in train_loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if cap is not None:
                images = images[: cap - used]
            if len(images) == 0:
                break
            used += len(images)
            yield images

    def _reference_stream(self, train_loader, layers: list[int], seed: int):
        """``init_sampling: reference``: S = ``init_max_images`` (default: the training set's size) image
        indices drawn with replacement (``torch.randint``) from a generator seeded with ``seed``, the per-layer
        ``ReferenceSampler`` row choice from the same generator, and the sampled images in batches."""
        data = getattr(train_loader, "dataset", None)
        if data is None or not hasattr(data, "__getitem__") or not hasattr(data, "__len__") or len(data) == 0:
            raise ConfigError(
                "SPT init_sampling: reference samples images by index: the training loader needs a "
                "non-empty indexable dataset (use init_sampling: streaming)"
            )
        gen = torch.Generator().manual_seed(seed)
        n = len(data)
        index = torch.randint(n, (self.cfg.init_max_images or n,), generator=gen)
        collectors = {i: ReferenceSampler(self.cfg.init, self.cfg.n_prompts, len(index), gen) for i in layers}
        step = getattr(train_loader, "batch_size", None) or 32

        def batches():
            for start in range(0, len(index), step):
                yield torch.stack([data[int(j)][0] for j in index[start : start + step]])

        return collectors, batches()

    # --- forward --------------------------------------------------------------------------
    def _insert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        m, npt = self.cfg.n_prompts, self.backbone.image_prefix_tokens
        if i >= self.num_layers:
            return x
        p = self.prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        # block 0: insert after the class token; deeper blocks: replace the previous layer's prompt outputs
        return torch.cat([x[:, :npt], p, x[:, npt + (m if i else 0) :]], dim=1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image feature [B, E] of the prompted image tower (the family's pooling and projection)."""
        return towers.encode_image(self.backbone, images, hook=self._insert, prompts_at="after_prefix")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.image_features(images)
        if self.head is not None:
            logits = self.head(feats.to(self.head.weight.dtype))
            return logits if self.head_rows is None else logits[:, self.head_rows]
        return self.clip_logits(feats, self.text_features)

    # --- classes --------------------------------------------------------------------------
    @classmethod
    def tied_to_training_classes(cls, cfg: SPTConfig) -> bool:
        return cfg.head == "linear"

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        """Text head: that dataset's template features; linear head: its rows for ``classnames`` (a subset of
        the training classes, by name; ``training_class_rows``)."""
        rows = self.training_class_rows(classnames) if self.head is not None else None
        super().set_classnames(classnames, dataset)
        if self.head is not None:
            self.head_rows = rows
        else:
            self.text_features = self.hand_text_features(self.cfg.text_template)

    # --- optimisation ---------------------------------------------------------------------
    def param_groups(self, train_cfg: TrainConfig) -> list[dict]:
        """Prompts: wd = train.weight_decay; head weight: wd = head_weight_decay; biases / 1-D: wd 0."""
        groups = [{"params": [self.prompts], "weight_decay": train_cfg.weight_decay, "name": "prompts"}]
        if self.head is not None:
            groups.append({"params": [self.head.weight], "weight_decay": self.cfg.head_weight_decay, "name": "head"})
            groups.append({"params": [self.head.bias], "weight_decay": 0.0, "name": "head_bias"})
        return groups
