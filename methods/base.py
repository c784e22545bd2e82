"""The contract every method implements, and the training hyperparameters all methods share.

A method is an ``nn.Module`` subclass of ``PromptMethod`` that owns only what it learns (prompts,
fusion modules, heads) plus non-persistent frozen buffers (e.g. template text features). The frozen
backbone is held by reference and is *not* a submodule, so ``method.parameters()`` and
``method.state_dict()`` contain the method's own tensors only and an optimizer built from
``param_groups`` can never touch the backbone.

Life of a method inside a trial (``orchestrator.trial``):

1. ``cls(backbone, classnames, dataset, cfg)``, ``cfg`` an instance of ``cls.Config``;
2. ``prepare(train_loader)`` for data-dependent initialisation (SPT prototypes, SEP's class
   prototypes, TGP-T's per-image captions); default: nothing. The trial's training loader yields
   ``(images, labels, indices)`` (``indices``: each sample's position in ``train_loader.dataset``, whose
   ``items`` name the images), so a method's own loops over it unpack ``images, labels, *_``;
3. gradient training: ``training_loss(images, labels, indices=...)`` per step with an optimizer over
   ``param_groups(train_cfg)`` — the trial always passes the batch's ``indices``; a method that pairs a sample
   with per-image data read in ``prepare`` uses them, every other method ignores them —; or, when
   ``trains_by_gradient`` is False, one call to ``fit(train_loader, val_loader)`` (linear probe);
4. evaluation: ``forward(images)`` gives logits over the current classnames; before each test set the
   trial calls ``set_classnames(names, dataset)`` — base-to-novel's novel classes, or a cross-dataset /
   domain-generalization target — and every hand-crafted template is then that dataset's own
   (``hand_templates``), as the reference code evaluates each target with its own configuration.

A method whose classifier is a head over its training classes (``tied_to_training_classes``: TGP-T,
a linear head) can score only those classes or a subset of them, selected by name
(``training_class_rows``), as the domain-generalization literature scores ImageNet-A/R's 200 classes
with a 1,000-class ImageNet head; the planner refuses any other evaluation before a trial starts.

A method that inserts, reads or fuses image tokens sets ``needs_image_tokens``; building it on a backbone
family without image tokens (ResNet, ConvNeXt: ``methods.families``) is a ConfigError, and spec validation
refuses such a cell before any trial starts.

Shared rules every method uses (one implementation each): ``template_text_features`` (frozen CLIP text
features of hand-crafted templates), ``clip_depth`` / ``clip_layers`` (a prompt depth or layer set clipped to
the backbone), ``clip_logits`` (CLIP's scaled cosine logits, plus the logit bias of SigLIP backbones) and
``clones`` (fused-layer modules that start as copies of one module, as the references' ``_get_clones``).

Per-method defaults (training schedule and method hyperparameters, per dataset / shots / protocol)
live in ``methods/defaults/<name>.yaml`` and are resolved by ``methods.defaults``.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Iterable, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn import functional as F

from fewshot.errors import ConfigError
from fewshot.protocols import PROTOCOLS  # noqa: F401 (the methods name their protocols from here)
from methods.backbone import Backbone


class StrictModel(BaseModel):
    """Pydantic base for configuration: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # no inf / NaN anywhere


class TrainConfig(StrictModel):
    """Optimisation and schedule shared by all methods (defaults overridable by YAML / --set)."""

    epochs: int = Field(10, ge=0, le=100_000, description="training epochs (ignored when max_iters is set)")
    max_iters: Optional[int] = Field(
        None, ge=1, le=100_000_000, description="iteration-based schedule (TGP-T); overrides epochs"
    )
    batch_size: int = Field(32, ge=1, le=65_536)
    eval_batch_size: int = Field(100, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    min_lr: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(
        1.0, ge=0, description="warm-up length in epochs (or in iterations when warmup_iters is set)"
    )
    warmup_iters: Optional[int] = Field(None, ge=0)
    warmup_type: Literal["constant", "linear"] = "constant"
    warmup_lr: float = Field(1e-5, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0)
    selection: Literal["last", "best_val"] = Field(
        "last", description="final model: last step (CoOp family) or best on the few-shot val split (TGP-T)"
    )
    eval_every_iters: Optional[int] = Field(
        None, ge=1, description="validation period in iterations for best_val selection (default: every epoch)"
    )
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader workers (sized to the trial's CPUs by the sweep)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")
    drop_last: bool = True
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0),
        description="area range (fractions of the image) of the "
        "training augmentation's RandomResizedCrop; CoOp's (0.08, 1) for natural "
        "images, narrower for the offline sets (methods/defaults/_datasets.yaml)",
    )
    feature_cache: bool = Field(
        True,
        description="methods with frozen_image_features: evaluate on cached frozen image "
        "features (exact; orchestrator.feature_cache)",
    )
    train_feature_views: Optional[int] = Field(
        None,
        ge=1,
        le=1000,
        description="train on k cached augmented views (epoch e uses "
        "view e mod k) instead of fresh augmentations (None, the exact default)",
    )
    oom_retry: bool = Field(
        False,
        description="on out-of-memory, halve the micro-batch and accumulate gradients "
        "(same effective batch) instead of failing the trial with error class oom",
    )
    max_trial_s: Optional[float] = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="wall-time limit of one run of a trial in seconds (None: no "
        "limit); past it the trial fails with error class timeout",
    )
    fault: Optional[Literal["nan_loss", "inf_loss", "oom"]] = Field(
        None,
        description="fault injection for reliability tests: from optimizer step fault_step on, the loss becomes "
        "NaN/inf, or a micro-batch larger than fault_oom_batch raises out-of-memory",
    )
    fault_step: int = Field(1, ge=1, description="first optimizer step (1-based) at which the injected fault fires")
    fault_oom_batch: int = Field(0, ge=0, description="with fault: oom, micro-batches up to this size still fit")

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_is_a_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("crop_scale must be [low, high] with 0 < low <= high <= 1 (fractions of the image area)")
        return v


class MethodConfig(StrictModel):
    """Base class of each method's own hyperparameters."""


class PromptMethod(nn.Module):
    """Base class of all methods. Subclasses set the class attributes and implement ``forward``."""

    #: registry name (``coop``, ``sep``...)
    name: ClassVar[str] = ""
    #: protocols this method supports (subset of ``PROTOCOLS``)
    protocols: ClassVar[tuple[str, ...]] = ("fewshot",)
    #: the method's own hyperparameters
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: True when the method leaves the image tower untouched, so what it reads from the tower may be cached
    frozen_image_features: ClassVar[bool] = False
    #: what ``frozen_image_output`` returns (part of the feature cache's key): the pooled feature by default
    frozen_output_kind: ClassVar[str] = "pooled"
    #: False for closed-form methods (zero-shot, linear probe): the trial calls ``fit`` instead
    trains_by_gradient: ClassVar[bool] = True
    #: True when the method inserts, reads or fuses image tokens (refused on families without them)
    needs_image_tokens: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: MethodConfig):
        super().__init__()
        from methods.families import refusal

        why = refusal(type(self), backbone.arch, backbone.family)
        if why:
            raise ConfigError(why)
        type(self).check_settings(cfg, backbone)  # before anything is built
        # held by reference, deliberately not a submodule (not in parameters()/state_dict())
        object.__setattr__(self, "_backbone", backbone)
        self.dataset = dataset  # the training dataset
        self.eval_dataset = dataset  # the dataset whose classes are scored now (set_classnames)
        self.cfg = cfg
        self.classnames = list(classnames)
        self.train_classnames = list(classnames)

    def run_notes(self) -> dict[str, str]:
        """Facts about this run worth recording beside its metrics (e.g. TGP-T's content loss on or off, and why):
        the trial puts them in its result (``run_notes``), trials.arrow, the MLflow trial run (``note.*`` tags)
        and the report. None by default."""
        return {}

    @classmethod
    def check_training(cls, train: "TrainConfig", cfg: MethodConfig) -> None:
        """One ``ConfigError`` line when these training settings cannot serve these method settings (checked
        with every cell's configuration before a sweep starts, and by the trial). Nothing by default."""

    @classmethod
    def check_settings(cls, cfg: MethodConfig, backbone: Backbone) -> None:
        """One ``ConfigError`` line when ``backbone`` cannot take these settings (a context init that is not
        ``n_ctx`` tokens for its tokenizer, more tokens than its text context or its image holds, ...). Each
        method's constructor calls it before it builds anything, and the sweep calls it for every proposal a
        search space can make (``orchestrator.space_check``), on a random-init backbone of the sweep's arch."""

    @classmethod
    def tied_to_training_classes(cls, cfg: MethodConfig) -> bool:
        """True when, with ``cfg``, the classifier is a head over the training classes: it can then score
        those classes or a subset of them (by name), never other class names (base2novel, cross-dataset)."""
        return False

    @property
    def backbone(self) -> Backbone:
        return self._backbone  # type: ignore[attr-defined]

    @classmethod
    def frozen_image_output(cls, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        """What a ``frozen_image_features`` method reads from the frozen image tower, per image, in the form
        the feature cache stores and the method's ``forward`` / ``training_loss`` accept in place of images:
        the unnormalised pooled feature [B, D] (``Backbone.encode_image`` passes a 2-D input through)."""
        return backbone.encode_image(images, normalize=False)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # --- hooks subclasses override ---------------------------------------------------------
    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        """Switch the classifier to ``classnames`` of ``dataset`` (default: the training dataset), whose
        hand-crafted templates then score them. Subclasses rebuild their class state."""
        self.classnames = list(classnames)
        self.eval_dataset = dataset or self.dataset
        self.__dict__.pop("_eval_text_cache", None)

    def hand_templates(self, kind: str) -> list[str]:
        """The hand-crafted templates of the dataset being scored (``eval_dataset``): its single template of
        ``kind`` (coop | kgcoop | sep), or CoOp's ensemble for ``kind="ensemble"``."""
        from fewshot.templates import ensemble_templates, template

        return (
            list(ensemble_templates(self.eval_dataset)) if kind == "ensemble" else [template(self.eval_dataset, kind)]
        )

    def template_text_features(
        self,
        templates: Sequence[str],
        names: Optional[Sequence[str]] = None,
        average: Literal["normalized", "raw"] = "normalized",
        clean: bool = True,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Frozen CLIP text features [C, E] of ``names`` (default: the current classnames) under hand-crafted
        ``templates``: each ``template.format(name)`` (``_`` in names becomes a space unless ``clean`` is False)
        through the frozen text tower; several templates are averaged after normalising each (``normalized``,
        CLIP's ensembling) or as raw features (``raw``, TGP-T's head init). A fresh tensor the method may keep."""
        names = self.classnames if names is None else list(names)
        return (
            self.backbone.template_text_features(
                names, list(templates), normalize=normalize, average=average, clean=clean
            )
            .detach()
            .clone()
        )

    def hand_text_features(self, kind: str) -> torch.Tensor:
        """Normalised ``template_text_features`` of the current classnames under ``hand_templates(kind)``."""
        return self.template_text_features(self.hand_templates(kind))

    def training_class_rows(self, classnames: list[str]) -> Optional[torch.Tensor]:
        """For a head over the training classes: the head rows that score ``classnames`` (None when they are
        the training classes in their order); ConfigError naming classes the method never trained on."""
        names = list(classnames)
        if names == self.train_classnames:
            return None
        row = {n: i for i, n in enumerate(self.train_classnames)}
        unseen = [n for n in names if n not in row]
        if unseen:
            shown = ", ".join(f"'{n}'" for n in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            raise ConfigError(
                f"{self.name}: its classifier is tied to its {len(row)} training classes and cannot "
                f"score {len(unseen)} class(es) it never trained on ({shown}); evaluate it only on "
                "those classes or a subset of them (fewshot; domain_generalization to ImageNet's "
                "variants), or use a text-based method"
            )
        return torch.tensor([row[n] for n in names], dtype=torch.long, device=self.device)

    def eval_text_features(self) -> torch.Tensor:
        """The subclass's ``text_features()`` (class text features [C, E] of a method with a learned text
        side), computed once per parameter state while gradients are off.

        Class text features do not depend on the images, so evaluation (no grad) reuses them across
        batches — C prompts through the text tower once per evaluation instead of once per batch —
        until a parameter changes (in-place updates bump ``_version``) or ``set_classnames`` runs.
        With gradients on (training) they are always recomputed.
        """
        if torch.is_grad_enabled():
            return self.text_features()
        key = tuple((id(p), p.data_ptr(), p._version) for p in self.parameters())
        cached = self.__dict__.get("_eval_text_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.text_features())
            self.__dict__["_eval_text_cache"] = cached
        return cached[1]

    def prepare(self, train_loader: Iterable) -> None:
        """Data-dependent initialisation before training (default: nothing)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Logits [B, C] over the current classnames."""
        raise NotImplementedError

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one training step and named float components for logging (default: CE). ``indices``: the
        samples' positions in the training loader's dataset (see the module docstring; unused here)."""
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": float(loss.detach())}

    def fit(self, train_loader: Iterable, val_loader: Optional[Iterable]) -> dict[str, float]:
        """Closed-form training for methods with ``trains_by_gradient = False``."""
        return {}

    def param_groups(self, train_cfg: TrainConfig) -> list[dict]:
        """Optimizer parameter groups (default: every trainable parameter, the shared weight decay)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []

    # --- shared helpers ---------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def param_breakdown(self) -> dict[str, int]:
        """Trainable parameter count per top-level submodule / parameter name."""
        out: dict[str, int] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = name.split(".")[0]
                out[key] = out.get(key, 0) + p.numel()
        return out

    def frozen_param_count(self) -> int:
        """Frozen parameters used by this method: the backbone plus any frozen tensors of its own."""
        own_frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return self.backbone.num_params() + own_frozen + self.extra_frozen_params()

    def extra_frozen_params(self) -> int:
        """Frozen parameters outside the backbone held by reference (e.g. a tied vocab head)."""
        return 0

    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale

    def logit_bias(self) -> torch.Tensor | float:
        """The backbone's logit bias (SigLIP), 0 for backbones without one."""
        b = self.backbone.logit_bias
        return 0.0 if b is None else b.float()

    def clip_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP's logits as open_clip computes them: scale · cos(image, text) (+ the logit bias of SigLIP)."""
        return cosine_logits(image_features, text_features, self.logit_scale()) + self.logit_bias()

    def clip_depth(self, depth: Optional[int], *towers: Literal["text", "vision"]) -> int:
        """The depth rule: a prompt depth (None = every block) clipped to the block count of each named tower, so
        a default written for ViT-B/16 (12 blocks) means every block of a 3-block test model."""
        bb = self.backbone
        blocks = min(bb.text_layers if t == "text" else bb.vision_layers for t in towers)
        return blocks if depth is None else max(1, min(depth, blocks))

    def clip_layers(self, layers: Iterable[int], tower: Literal["text", "vision"]) -> tuple[int, ...]:
        """Block indices clipped to the tower by the depth rule (an index beyond it becomes its last block),
        duplicates dropped, sorted."""
        return tuple(sorted({self.clip_depth(i + 1, tower) - 1 for i in layers}))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to restore this method (persistent state only)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)


def cosine_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """``scale * norm(img) @ norm(txt).T`` — the CLIP classifier (``PromptMethod.clip_logits`` adds the bias)."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    return scale * img @ txt.t()


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` identical copies of one (randomly initialised) module, as the references' ``_get_clones`` builds
    their per-layer modules: the copies start equal and are trained separately."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])
