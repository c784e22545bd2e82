"""Frozen CLIP backbones: loading through open_clip, once per process, and their basic encoders.

A backbone is named by ``arch`` (an open_clip model name, e.g. ``ViT-B-16``) and ``pretrained``
(an open_clip tag such as ``openai``, a local checkpoint path, or ``None`` for random init).
``promptsweep-tiny`` is a project-registered random-init config small enough for CPU tests.
``promptsweep-mini`` with ``pretrained='promptsweep'`` is the project's own pretrained CLIP
(``methods.pretrain``): the tag resolves to a cached checkpoint file (trained on first use), which is
then loaded exactly like a user's local checkpoint path.

QuickGELU: an open_clip tag gets it exactly where open_clip's pretrained registry says its weights were
trained with it (``openai``, ``yfcc15m``, ``cc12m``, ViT-B-32's ``laion400m_e31/e32``, MetaCLIP, DFN, ...);
a local checkpoint file of an OpenAI-shaped family (``clip-vit``, ``resnet``) is taken to be OpenAI-format
and gets it unless ``PROMPTSWEEP_QUICKGELU=0``; other families' files and random init never do (their
config's own ``quick_gelu`` still applies).

The family (``methods.families``) is read from the model config before anything is built: a config the
prompt path does not run exactly is refused with one line, and the built towers are checked against it
(``methods.towers.check_family``).

Loaded backbones are cached per (arch, pretrained, device, precision) for the life of the
process: a Ray worker that runs many trials loads its weights once. Every parameter is frozen
(``requires_grad=False``) and the model is kept in eval mode. Random init is drawn under a fixed
seed (``RANDOM_INIT_SEED``), so every process builds the same random backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from fewshot.errors import CheckpointError, ConfigError
from methods.families import Family, family_of_config, refusal

TINY_ARCH = "promptsweep-tiny"
MINI_ARCH = "promptsweep-mini"
#: the pretrained tag of the project's own pretrained weights (``methods.pretrain``)
PROJECT_TAG = "promptsweep"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_lock = threading.Lock()
_CACHE: dict[tuple, "Backbone"] = {}
#: how many times weights were actually built/loaded in this process (benchmarks read it)
LOAD_COUNT = 0
#: random-init backbones (``pretrained=None``) are drawn under this torch seed, so every process —
#: every Ray worker — builds the same weights: a trial's result does not depend on which trial its
#: worker happened to run first, and frozen features can be shared across processes
RANDOM_INIT_SEED = 0

#: families whose local checkpoint files are taken to be OpenAI-format (trained with QuickGELU)
_OPENAI_FAMILIES = ("clip-vit", "resnet")


def register_configs() -> None:
    """Register the project's own open_clip model configs (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def available_archs() -> list[str]:
    """Every arch name ``load_backbone`` accepts: open_clip's model configs plus the project's.

    Read from the config files' names (open_clip registers one model per ``model_configs/*.json``),
    so the sweep driver can check a spec's arch without importing open_clip (1.5 s with torchvision).
    Falls back to ``open_clip.list_models()`` where open_clip keeps its configs elsewhere."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(d) / "model_configs" for d in (spec.submodule_search_locations or [])] if spec else []
    if not any(d.is_dir() for d in dirs):
        register_configs()
        import open_clip

        return list(open_clip.list_models())
    return sorted({p.stem for d in [*dirs, _CONFIG_DIR] if d.is_dir() for p in d.glob("*.json")})


def model_config(arch: str) -> Optional[dict]:
    """The open_clip model config dict of ``arch`` read from its JSON file (the project's, then open_clip's), with
    no open_clip import; None where no config file names it or it cannot be read."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(d) / "model_configs" for d in (spec.submodule_search_locations or [])] if spec else []
    for d in [_CONFIG_DIR, *dirs]:
        p = d / f"{arch}.json"
        if p.is_file():
            try:
                cfg = json.loads(p.read_text())
            except (ValueError, OSError):
                return None
            return cfg if isinstance(cfg, dict) else None
    return None


def text_context_length(arch: str) -> Optional[int]:
    """The text encoder's context length (tokens) of ``arch`` from its model config file (no open_clip
    import); None where the config cannot be found or read."""
    try:
        return int(model_config(arch)["text_cfg"].get("context_length", 77))  # type: ignore[index]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(eq=False)
class Backbone:
    """A frozen open_clip CLIP model plus its tokenizer, its family and the sizes methods need."""

    model: nn.Module
    tokenizer: object
    arch: str
    pretrained: Optional[str]
    device: torch.device
    precision: str = "fp32"
    family: Optional["Family"] = None  # set by load_backbone from the model config (methods.families)
    _text_feature_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.family is None:  # built by hand (not load_backbone): the family of its registered config
            import open_clip

            self.family = family_of_config(open_clip.get_model_config(self.arch))

    # --- towers (methods.towers: the one place that knows each family's modules) ----------------
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def text_tower(self):
        from methods.towers import TextTower

        tower = self.__dict__.get("_text_tower")
        if tower is None:
            tower = self.__dict__["_text_tower"] = TextTower(self.model)
        return tower

    @property
    def image_tower(self):
        """The image-token adapter of this family (ConfigError for families without image tokens)."""
        from methods.towers import image_tower

        return image_tower(self)

    @property
    def token_rule(self):
        """How the tokenizer lays out a sequence (``methods.token_rules``)."""
        from methods.token_rules import TokenRule

        rule = self.__dict__.get("_token_rule")
        if rule is None:
            rule = self.__dict__["_token_rule"] = TokenRule.of(self.tokenizer)
        return rule

    # --- sizes --------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space (the text tower's output)."""
        proj = self.text_tower.text_projection
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        return int(proj.shape[1]) if proj is not None else self.text_width

    @property
    def text_width(self) -> int:
        return self.text_tower.width

    @property
    def vision_width(self) -> int:
        return self.image_tower.width

    @property
    def text_layers(self) -> int:
        return self.text_tower.layers

    @property
    def vision_layers(self) -> int:
        return len(self.image_tower.blocks)

    @property
    def patch_size(self) -> int:
        return self.image_tower.patch_size

    @property
    def image_prefix_tokens(self) -> int:
        """Class / register tokens before the patch tokens (1 for CLIP ViT and EVA, 0 for SigLIP)."""
        return self.image_tower.prefix_tokens

    @property
    def image_tokens(self) -> int:
        """Prefix + patch tokens of one image."""
        return self.image_tower.num_tokens

    @property
    def context_length(self) -> int:
        return self.text_tower.context_length

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), detached (100 for OpenAI CLIP)."""
        return self.model.logit_scale.detach().exp()

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        """The learned logit bias added to CLIP logits (SigLIP), detached; None for the other families."""
        b = getattr(self.model, "logit_bias", None)
        return None if b is None else b.detach()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- text ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [N, context_length] on the backbone's device (CLIP BPE: SOT ... EOT, zero padded)."""
        return self.tokenizer(list(texts)).to(self.device)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_tower.token_embedding(ids.to(self.device))

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """End-of-text position of each tokenised row, by the tokenizer's rule (``methods.token_rules``)."""
        return self.token_rule.eot_positions(ids)

    @torch.no_grad()
    def encode_text(self, texts: list[str], normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        """Frozen CLIP text features of ``texts`` [N, embed_dim] (fp32)."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenize(texts[i : i + batch_size])
            feats = self.model.encode_text(ids).float()
            out.append(feats)
        feats = torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def template_text_features(
        self,
        classnames: list[str],
        templates: list[str],
        normalize: bool = True,
        average: str = "normalized",
        clean: bool = True,
    ) -> torch.Tensor:
        """Class text features from hand-crafted templates, averaged over templates when several.

        ``template.format(name)`` for each class (``_`` in names becomes a space when ``clean``); with several
        templates the per-template features are averaged after normalising each (``average="normalized"``,
        CLIP's ensembling) or as they are (``"raw"``), then normalised when ``normalize``. Cached per arguments
        on this backbone; methods reach it through ``PromptMethod.template_text_features``.
        """
        if average not in ("normalized", "raw"):
            raise ValueError(f"average must be normalized or raw (got {average!r})")
        key = (tuple(classnames), tuple(templates), normalize, average, clean)
        hit = self._text_feature_cache.get(key)
        if hit is not None:
            return hit
        names = [c.replace("_", " ") for c in classnames] if clean else list(classnames)
        per_template = [
            self.encode_text([t.format(n) for n in names], normalize=average == "normalized") for t in templates
        ]
        feats = torch.stack(per_template).mean(0)
        feats = nn.functional.normalize(feats, dim=-1) if normalize else feats
        if len(self._text_feature_cache) > 64:
            self._text_feature_cache.clear()
        self._text_feature_cache[key] = feats
        return feats

    # --- image --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Frozen CLIP image features [B, embed_dim] (fp32).

        A 2-D ``[B, embed_dim]`` input is taken as features already encoded by this backbone (served
        by ``orchestrator.feature_cache``) and only normalised; image batches are 4-D.
        """
        if images.dim() == 2:
            feats = images.to(self.device).float()
        else:
            feats = self.model.encode_image(images.to(self.device)).float()
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    def identity(self) -> str:
        """What determines this backbone's weights (the feature cache's key): arch, weights, model config."""
        import open_clip

        src = self.pretrained
        p = os.path.expanduser(str(src)) if src else ""
        if p and os.path.isfile(p):
            st = os.stat(p)
            src = f"{os.path.realpath(p)}:{st.st_size}:{st.st_mtime_ns}"
        elif not src:
            src = f"random-init-seed{RANDOM_INIT_SEED}"
        cfg = open_clip.get_model_config(self.arch) or {}
        blob = json.dumps(
            {
                "arch": self.arch,
                "weights": src,
                "config": cfg,
                "precision": self.precision,
                "quickgelu_env": os.environ.get("PROMPTSWEEP_QUICKGELU", "1"),
                "open_clip": getattr(open_clip, "__version__", "?"),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _resolve_pretrained(arch: str, pretrained: Optional[str]) -> tuple[Optional[str], bool]:
    """Return (pretrained argument for open_clip, whether it is a local file); CheckpointError for a missing file."""
    if pretrained in (None, "", "none", "random"):
        return None, False
    p = os.path.expanduser(str(pretrained))
    looks_like_path = os.sep in p or p.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path:
        if not os.path.isfile(p):
            raise CheckpointError(
                f"checkpoint file not found: {p} (pass an existing open_clip/OpenAI CLIP checkpoint path "
                f"as backbone.pretrained, or an open_clip tag such as 'openai')"
            )
        return p, True
    return pretrained, False


def quick_gelu_for(arch: str, pretrained: Optional[str], is_file: bool, family: Family) -> bool:
    """Whether to force QuickGELU activations (see the module docstring)."""
    if pretrained is None:
        return False
    if is_file:
        return family.name in _OPENAI_FAMILIES and os.environ.get("PROMPTSWEEP_QUICKGELU", "1") == "1"
    import open_clip

    return bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))


def load_backbone(
    arch: str = TINY_ARCH,
    pretrained: Optional[str] = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    tokenizer: Optional[object] = None,
) -> Backbone:
    """Load (or reuse) a frozen backbone. Raises ``ConfigError``/``CheckpointError`` with a fix.

    ``pretrained``: ``None`` = random init; an open_clip tag (``openai``) = open_clip's own
    download/cache (unavailable offline: the error says how to provide a local file); a path to
    a checkpoint file (an open_clip state dict, loaded with ``weights_only=True``); or
    ``'promptsweep'``: the project-pretrained checkpoint of ``arch`` (``methods.pretrain``; built on
    first use, then loaded as that local checkpoint path). ``tokenizer`` replaces
    ``open_clip.get_tokenizer(arch)`` (tests: SigLIP's sentencepiece vocabularies need the Hugging Face hub).
    """
    global LOAD_COUNT
    register_configs()
    import open_clip

    if pretrained == PROJECT_TAG:
        from methods.pretrain import pretrained_checkpoint

        pretrained = str(pretrained_checkpoint(arch))  # from here on: a user's local checkpoint file
    device = torch.device(device)
    key = (arch, pretrained, str(device), precision, None if tokenizer is None else id(tokenizer))
    with _lock:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        known = open_clip.list_models()
        if arch not in known:
            close = [m for m in known if arch.lower().split("-")[0] in m.lower()][:8]
            raise ConfigError(
                f"unknown backbone arch '{arch}' (open_clip model names, e.g. ViT-B-16, ViT-B-32, "
                f"{TINY_ARCH}{'; similar: ' + ', '.join(close) if close else ''})"
            )
        family = family_of_config(open_clip.get_model_config(arch))
        if family.name is None:
            raise ConfigError(refusal(None, arch, family))
        pt, is_file = _resolve_pretrained(arch, pretrained)
        quick = quick_gelu_for(arch, pt, is_file, family)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)  # random init is the same in every process
                model = open_clip.create_model(
                    arch,
                    pretrained=pt,
                    device="cpu",
                    precision=precision,
                    force_quick_gelu=quick,
                    weights_only=True,
                    require_pretrained=pt is not None,
                ).to(device)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - turned into one clear message
            if pt is not None and os.path.isfile(str(pt)):
                raise CheckpointError(
                    f"could not load checkpoint {pt} into {arch}: {type(exc).__name__}: {str(exc)[:300]} "
                    f"(the file must be a state dict for this architecture, loadable with torch.load(weights_only=True))"
                ) from exc
            if pt is not None:
                raise CheckpointError(
                    f"could not obtain pretrained weights '{pt}' for {arch}: {type(exc).__name__}: {str(exc)[:200]} "
                    f"(this machine may be offline: download the checkpoint elsewhere and set backbone.pretrained "
                    f"to its local file path)"
                ) from exc
            raise
        from methods.towers import check_family

        check_family(model, family.name, arch)
        model.requires_grad_(False)
        model.eval()
        if tokenizer is None:
            try:
                tokenizer = open_clip.get_tokenizer(arch)
            except Exception as exc:  # noqa: BLE001 - e.g. SigLIP's tokenizer without transformers / the hub
                raise ConfigError(
                    f"could not load the tokenizer of {arch}: {type(exc).__name__}: {str(exc)[:200]} "
                    "(SigLIP tokenizers need the transformers package and the Hugging Face hub or its "
                    "cache)"
                ) from exc
        bb = Backbone(
            model=model,
            tokenizer=tokenizer,
            arch=arch,
            pretrained=pretrained,
            device=device,
            precision=precision,
            family=family,
        )
        _CACHE[key] = bb
        LOAD_COUNT += 1
        return bb


def clear_cache() -> None:
    """Drop every cached backbone (frees memory; the next load builds again)."""
    with _lock:
        _CACHE.clear()
