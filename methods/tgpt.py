"""TGP-T — Compound Text-Guided Prompt Tuning (Tan et al., AAAI 2024; spec methods.md §4, §7.3).

Two image-conditioned prompts per image, whatever the number of classes:

1. frozen image tower through ``towers.encode_image(return_tokens=True)``: ``F`` = the last block's
   tokens (all, CLS included, no ``ln_post``) @ ``visual.proj`` (``towers.project_image_tokens``),
   ``v`` = the pooled CLIP image feature; run under ``no_grad`` (nothing on the image side learns);
2. two Bonders (``methods.bonder``, one per branch) turn the learnable category (32) and content
   (64) queries into ``O_cat`` / ``O_con`` [B, N, D_t] conditioned on ``F``;
3. each becomes one text-encoder input, the tokenised pseudo-sentence "X X … X." with the X slots
   replaced by ``O_k`` (``[SOS; O_k; '.'; EOT]`` for CLIP BPE; the learned-context path
   ``methods.prompt_text``, so every tokenizer's layout is respected) through the frozen text tower
   (``towers.encode_text``) — 2·B sequences per step, never C. The reference pads to 77 tokens; on a
   causal tower the mask makes positions after EOT invisible, so the sequence is cut after EOT
   (identical feature, less work);
4. ``t = (t_cat + t_con) / 2``; logits = 100 · normalize([v; t]) @ Wᵀ (no bias, fixed scale 100), W
   [C, 2E] initialised to normalize([z_c; z_c]), z_c the mean of the *unnormalised* CLIP text features
   over a template set (``PromptMethod.template_text_features``, ``average="raw"``), per
   ``head_templates``: ``ensemble`` (default) = ``fewshot.templates.ensemble_templates(dataset)`` (8
   templates) over cleaned class names ('_', '(', ')' → spaces); ``reference`` = the reference's 21
   templates mined per dataset (``methods/tgpt_mined_templates.yaml``; the 11 datasets and ImageNet's
   variants) over the raw class names, as its ``get_zero_shot_weights`` does. The init runs on first use
   (``prepare`` or the first forward), not in ``__init__``, so building the method (``methods info``,
   1000 classes on ViT-B/16) takes seconds; a loaded checkpoint's head is kept as it is;
5. token supervision through a frozen head tied to CLIP's token embedding (``O @ Eᵀ``; ``E`` is the
   backbone's own ``token_embedding.weight``, used by reference, never copied, so it is already in
   the frozen backbone count and ``extra_frozen_params`` is 0): label-smoothed (0.1) CE against the
   tokens of "a photo of a {class}." (category; after the tokenizer's special prefix, EOT included,
   everything after it ignored) and of a description of the image (content). Loss = CE + λ_cat·L_cat +
   λ_con·L_con (λ = 1 in the reference).

Descriptions (content loss), as the reference pairs them: each training image's content queries are
supervised with the tokens of *that image's own* description. ``captions.txt`` (``fewshot.captions``) is
looked up in ``prepare``: ``cfg.captions_file`` when set, else the nearest ``captions.txt`` above the
training images. ``prepare`` reads the training loader's ``dataset.items`` (the split's images by position;
``ImageDataset`` and cached ``FeatureDataset`` views alike) and tokenises each image's caption into row
``i`` of ``_con_targets`` [N, n_con]; an image without a caption line gets an all-ignore row. Each step,
``training_loss(images, labels, indices)`` takes the rows of the batch's ``indices`` (each sample's
position in the split, which the trial's training batches carry), so a sample without a caption
contributes nothing to the content CE (averaged over the batch's non-ignored positions, as the
reference's); ``indices`` missing while the content loss is on is an error, never a silent fallback.
``run_notes()`` says how many training images are paired with their caption. With no captions file (or
no matching line) the content loss is OFF: ``content_loss_enabled`` is False, a warning is logged once
and ``run_notes()`` says so for the trial's params / the report.

Image tower: untouched and run under ``no_grad``, so what TGP-T reads from it — the pooled feature
``v`` and the projected token map ``F`` — is a fixed function of the image: ``frozen_image_output``
stacks them as ``[B, 1 + L, E]`` (row 0 = ``v``), which the frozen-feature cache stores
(``frozen_output_kind`` "pooled+tokens"; ``orchestrator.feature_cache``) and ``_image`` unpacks in
place of an image batch. Evaluation from the cache is exact; it is large (0.4 MB per image on
ViT-B/16). Cached training views (``train_feature_views``) keep the split's items, so the content loss
pairs them with their captions exactly as image batches.

Schedule: iteration-based (``max_iters`` in methods/defaults/tgpt.yaml). An explicit ``epochs`` override
without ``max_iters`` trains for those epochs instead; both at once is refused (``methods.defaults``).

Needs image tokens (the token map ``F``): refused on ResNet / ConvNeXt backbones.

Protocols: ``fewshot`` and ``domain_generalization``. The linear head is tied to the training classes
(``tied_to_training_classes``): ImageNet-V2 / -Sketch are scored with the whole head, ImageNet-A / -R
with its rows for their 200 classes (``set_classnames`` selects them by name); classes the head never
trained on are a ConfigError, and the planner refuses such cells before any trial starts.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from fewshot.errors import ConfigError
from methods import towers
from methods.backbone import Backbone
from methods.base import MethodConfig, PromptMethod, TrainConfig
from methods.bonder import Bonder
from methods.prompt_text import LearnedContextText, n_text_tokens

log = logging.getLogger(__name__)
IGNORE = -100
LOGIT_SCALE = 100.0


class TGPTConfig(MethodConfig):
    """TGP-T hyperparameters (schedule in TrainConfig / methods/defaults/tgpt.yaml)."""

    n_cat: int = Field(32, ge=1, le=74, description="category-wise queries (text-encoder prompt length)")
    n_con: int = Field(64, ge=1, le=74, description="content-wise queries")
    ctx_init: Optional[str] = Field(
        "a photo of a", description="words whose token embeddings initialise the first category queries"
    )
    bonder_heads: int = Field(
        8, ge=1, description="self-attention heads of each Bonder (cross-attention is single-head)"
    )
    lambda_cat: float = Field(1.0, ge=0, description="weight of the category token loss")
    lambda_con: float = Field(1.0, ge=0, description="weight of the content token loss (0 turns it off)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of both token losses")
    captions_file: Optional[str] = Field(
        None, description="captions.txt path (default: the nearest one above the training images)"
    )
    head_templates: Literal["ensemble", "reference"] = Field(
        "ensemble",
        description="head init: ensemble = CoOp's 8 ensemble templates over cleaned class names; reference = "
        "the reference's 21 mined templates per dataset over raw class names",
    )


class TGPT(PromptMethod):
    """Category + content queries -> two Bonders -> two text-encoder inputs per image -> linear head on [v; t]."""

    name = "tgpt"
    protocols = ("fewshot", "domain_generalization")
    Config = TGPTConfig
    frozen_image_features = True
    frozen_output_kind = "pooled+tokens"
    needs_image_tokens = True

    @classmethod
    def check_settings(cls, cfg: TGPTConfig, backbone: Backbone) -> None:
        limit = backbone.context_length - 3
        for field in ("n_cat", "n_con"):
            if getattr(cfg, field) > limit:
                raise ConfigError(
                    f"tgpt {field}={getattr(cfg, field)} does not fit the {backbone.context_length}-token "
                    f"text encoder: use at most {limit}"
                )

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: TGPTConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        dev, d, e = backbone.device, backbone.text_width, backbone.embed_dim
        self.q_cat = nn.Parameter(torch.randn(cfg.n_cat, d, device=dev) * 0.02)
        self.q_con = nn.Parameter(torch.randn(cfg.n_con, d, device=dev) * 0.02)
        if cfg.ctx_init:
            ids, p = backbone.tokenize([cfg.ctx_init])[0], backbone.token_rule.prefix
            n = min(n_text_tokens(backbone, cfg.ctx_init), cfg.n_cat)
            with torch.no_grad():
                self.q_cat[:n] = backbone.token_embedding(ids[p : p + n]).float()
        self.bonder_cat = Bonder(d, e, cfg.bonder_heads).to(dev)
        self.bonder_con = Bonder(d, e, cfg.bonder_heads).to(dev)
        # zero-shot init is deferred to first use (prepare / forward): encoding C x templates prompts
        # through the text tower takes minutes for 1000 classes on CPU, and counting needs no values
        self.head = nn.Parameter(torch.zeros(len(self.classnames), 2 * e, device=dev))
        self._head_ready = False
        self.head_rows: Optional[torch.Tensor] = None  # the head's rows for the classes scored now (None: all)
        head_templates(cfg.head_templates, dataset)  # no templates for this dataset: ConfigError now
        self._pseudo: dict[int, LearnedContextText] = {}  # "X X ... X." per query count (built on first use)
        self.register_buffer(
            "cat_targets",
            self._targets([f"a photo of a {_clean(c)}." for c in self.classnames], cfg.n_cat),
            persistent=False,
        )
        # content targets: row i = tokens of training image i's own caption, all-ignore without one (prepare)
        self._con_targets = torch.empty(0, cfg.n_con, dtype=torch.long, device=dev)
        self.content_loss_enabled = False
        self._content_note = "off: prepare() was not called, so no captions were read"
        self._warned = False

    # --- construction helpers ---------------------------------------------------------------
    def _zero_shot_head(self, classnames: list[str]) -> torch.Tensor:
        """normalize([z_c; z_c]), z_c = mean of unnormalised CLIP text features over the ``head_templates``."""
        reference = self.cfg.head_templates == "reference"
        names = list(classnames) if reference else [_clean(c) for c in classnames]
        z = self.template_text_features(
            head_templates(self.cfg.head_templates, self.dataset),
            names,
            average="raw",
            clean=not reference,
            normalize=False,
        )
        return F.normalize(torch.cat([z, z], dim=-1), dim=-1).to(self.device)

    def _ensure_head(self) -> None:
        if not self._head_ready:
            with torch.no_grad():
                self.head.copy_(self._zero_shot_head(self.classnames))
            self._head_ready = True

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state_dict(state)
        self._head_ready = True  # the checkpoint's head replaces the zero-shot init

    def _targets(self, texts: list[str], n: int) -> torch.Tensor:
        """Token ids after the tokenizer's prefix (CLIP's SOS), first ``n`` (EOT included), everything after the
        EOT -> ignore index: [len(texts), n]."""
        bb = self.backbone
        ids = bb.tokenize(texts)
        p = bb.token_rule.prefix
        after_eot = torch.arange(ids.shape[1], device=ids.device)[None] > bb.eot_positions(ids)[:, None]
        ids = ids.masked_fill(after_eot, IGNORE)[:, p : p + n].clone()
        if ids.shape[1] < n:  # a context shorter than n + prefix: the missing positions are ignored
            ids = torch.cat([ids, ids.new_full((ids.shape[0], n - ids.shape[1]), IGNORE)], dim=1)
        return ids.long()

    # --- captions -----------------------------------------------------------------------------
    def prepare(self, train_loader: Iterable) -> None:
        """Pair each training image (its position in the training loader's dataset) with its own caption."""
        from fewshot.captions import find_captions_file, match_captions, read_captions

        self._ensure_head()
        items = list(getattr(getattr(train_loader, "dataset", None), "items", None) or [])
        impaths = [it.impath for it in items]
        path = self.cfg.captions_file or (find_captions_file(impaths) if items else None)
        matched = {}
        if path is not None and items and self.cfg.lambda_con > 0:
            matched = match_captions(impaths, read_captions(path))
        self._con_targets = self._caption_targets([matched.get(p) for p in impaths])
        n_paired = int((self._con_targets != IGNORE).any(dim=1).sum())
        self.content_loss_enabled = n_paired > 0
        self._content_note = self._content_status(path, len(items), n_paired)
        if not self.content_loss_enabled and self.cfg.lambda_con > 0 and not self._warned:
            log.warning("TGP-T content loss is OFF for %s: %s", self.dataset, self._content_note)
            self._warned = True

    def _caption_targets(self, captions: list[Optional[str]]) -> torch.Tensor:
        """[N, n_con]: row i = the content targets of caption i, all-ignore where it is None."""
        out = torch.full((len(captions), self.cfg.n_con), IGNORE, dtype=torch.long, device=self.device)
        rows = [i for i, c in enumerate(captions) if c is not None]
        if rows:
            out[rows] = self._targets([captions[i] for i in rows], self.cfg.n_con).to(self.device)
        return out

    def _content_status(self, path: Optional[Path | str], n_items: int, n_paired: int) -> str:
        """The content loss on or off, and why (``run_notes``)."""
        if self.cfg.lambda_con == 0:
            return "off: lambda_con = 0"
        if not n_items:
            return "off: the training loader has no dataset items to match captions against"
        if path is None:
            return f"off: no captions.txt found for {self.dataset} (put one in the dataset folder or set method.captions_file)"
        if n_paired == 0:
            return f"off: {path} has no line for any of the {n_items} training images"
        return f"on: {n_paired}/{n_items} training images paired with their own caption from {path}"

    def run_notes(self) -> dict[str, str]:
        """Facts about this run the trial should record as params (content supervision on/off and why)."""
        return {"tgpt_content_loss": self._content_note}

    # --- forward --------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def frozen_image_output(cls, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + L, E]``: the pooled image feature ``v`` (row 0) on the projected last-block tokens ``F``."""
        pooled, tokens = towers.encode_image(backbone, images.to(backbone.device), return_tokens=True)
        feats = towers.project_image_tokens(backbone, tokens)
        return torch.cat([pooled.unsqueeze(1), feats], dim=1)

    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v [B, E], F [B, L, E])`` from an image batch, or from its cached ``frozen_image_output`` (3-D)."""
        packed = images if images.dim() == 3 else self.frozen_image_output(self.backbone, images)
        packed = packed.to(self.device).float()
        return packed[:, 0], packed[:, 1:]

    def _encode_prompts(self, out: torch.Tensor) -> torch.Tensor:
        """The pseudo-sentence with its X slots = ``out`` [B, N, D] through the frozen text tower -> [B, E]."""
        n = out.shape[1]
        if n not in self._pseudo:
            self._pseudo[n] = LearnedContextText(self.backbone, [""], n)
        return self._pseudo[n].encode_per_image(out)[:, 0].float()

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._ensure_head()
        v, feats = self._image(images)
        B = v.shape[0]
        o_cat = self.bonder_cat(self.q_cat.expand(B, -1, -1), feats)
        o_con = self.bonder_con(self.q_con.expand(B, -1, -1), feats)
        t = (self._encode_prompts(o_cat) + self._encode_prompts(o_con)) / 2
        z = F.normalize(torch.cat([v, t], dim=-1), dim=-1)
        return LOGIT_SCALE * z @ self.head.t(), o_cat, o_con

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self._run(images)[0]
        return logits if self.head_rows is None else logits[:, self.head_rows]

    def _token_loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        vocab = self.backbone.text_tower.token_embedding.weight  # tied, frozen, by reference
        logits = out @ vocab.t().to(out.dtype)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            label_smoothing=self.cfg.label_smoothing,
        )

    def training_loss(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CE + λ_cat·L_cat + λ_con·L_con; ``indices`` (the samples' positions in the training split) select each
        sample's own caption targets for L_con."""
        labels = labels.to(self.device)
        logits, o_cat, o_con = self._run(images)
        ce = F.cross_entropy(logits, labels)
        loss, parts = ce, {"ce": float(ce.detach())}
        if self.cfg.lambda_cat > 0:
            l_cat = self._token_loss(o_cat, self.cat_targets[labels])
            loss = loss + self.cfg.lambda_cat * l_cat
            parts["l_cat"] = float(l_cat.detach())
        if self.content_loss_enabled and self.cfg.lambda_con > 0:
            targets = self._content_targets(indices)
            if (targets != IGNORE).any():
                l_con = self._token_loss(o_con, targets)
                loss = loss + self.cfg.lambda_con * l_con
                parts["l_con"] = float(l_con.detach())
        return loss, parts

    def _content_targets(self, indices: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, n_con]: each sample's own caption targets by its position in the training split (all-ignore: no
        caption)."""
        if indices is None:
            raise ValueError(
                "tgpt: the content loss pairs each sample with its own image's caption, so training_loss "
                "needs indices (the samples' positions in the training loader's dataset read by prepare)"
            )
        return self._con_targets[indices.to(self._con_targets.device).long()]

    # --- protocol / optimisation -----------------------------------------------------------------
    @classmethod
    def tied_to_training_classes(cls, cfg) -> bool:
        return True

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        """Score ``classnames``, a subset of the training classes by name: the head's rows for them (ImageNet-A/R's
        200 classes out of ImageNet's 1,000, as the domain-generalization literature evaluates them)."""
        rows = self.training_class_rows(classnames)
        super().set_classnames(classnames, dataset)
        self.head_rows = rows

    def param_groups(self, train_cfg: TrainConfig) -> list[dict]:
        return [{"params": self.trainable_parameters(), "weight_decay": train_cfg.weight_decay}]

    def extra_frozen_params(self) -> int:
        """0: the tied vocabulary head *is* the backbone's token embedding, already in the backbone count."""
        return 0


@lru_cache(maxsize=None)
def _mined_templates() -> dict[str, list[str]]:
    import yaml

    return yaml.safe_load((Path(__file__).parent / "tgpt_mined_templates.yaml").read_text())


def head_templates(kind: str, dataset: str) -> list[str]:
    """The head-init templates of ``dataset``: CoOp's ensemble, or the reference's 21 mined ones (ConfigError for a
    dataset the reference has none for)."""
    if kind == "ensemble":
        from fewshot.templates import ensemble_templates

        return ensemble_templates(dataset)
    mined = _mined_templates()
    key = "imagenet" if dataset.startswith("imagenet") else dataset
    if key not in mined:
        raise ConfigError(
            f"tgpt head_templates: reference has the reference's mined templates for {', '.join(mined)} "
            f"(and ImageNet's variants) only, not '{dataset}': use head_templates: ensemble"
        )
    return list(mined[key])


def _clean(name: str) -> str:
    """The reference's class-name cleaning: '_', '(' and ')' become spaces."""
    return " ".join(name.replace("_", " ").replace("(", " ").replace(")", " ").split())
