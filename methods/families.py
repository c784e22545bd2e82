"""Backbone families: which open_clip model configs the prompt path runs exactly, and which methods each allows.

A family is read from an open_clip model config (the JSON dict: ``vision_cfg`` / ``text_cfg``), never from
weights, so the sweep driver can refuse a spec before any trial starts and without importing open_clip.
Supported families (each one's prompt-free path through ``methods.towers`` equals open_clip's own encoders):

=========== =============================================== ============================================
family      image tower                                     text tower
=========== =============================================== ============================================
clip-vit    open_clip ViT, class-token pooling              causal, CLIP BPE, pooled at EOT (argmax)
siglip      timm ViT (``vit_*siglip*``), attention-pool     non-causal, SigLIP sentencepiece, pooled at
            (MAP) head, no class token                      the last position; logits carry a bias
eva         timm EVA / EVA-02 (``eva*``), class-token pool  causal, CLIP BPE, pooled at EOT
resnet      open_clip ModifiedResNet (no image tokens)      causal, CLIP BPE, pooled at EOT
convnext    timm ConvNeXt (no image tokens)                 causal, CLIP BPE, pooled at EOT
=========== =============================================== ============================================

Methods that insert, read or fuse image tokens (``PromptMethod.needs_image_tokens``: VPT, MaPLe, SEP, SPT,
TGP-T) need a family with image tokens; the others (zero-shot, linear probe, CoOp, CoCoOp, KgCoOp) read only
the pooled image feature, which open_clip computes itself, and run on every family. Every other config
(CLIPA's average pooling, Hugging Face text towers, CoCa, MobileCLIP / ViTamin / PE / Swin trunks, EOS-pooled
multilingual text towers, ...) is refused with one line saying why.

The timm trunk kinds are recognised by their timm model names (the loader then checks the built trunk's class:
``methods.towers.check_family``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: supported family -> (has image tokens, one-line description)
FAMILIES: dict[str, tuple[bool, str]] = {
    "clip-vit": (True, "open_clip ViT (class-token pooling) + causal CLIP-BPE text tower"),
    "siglip": (
        True,
        "SigLIP / SigLIP 2: timm ViT with attention-pool head + non-causal text pooled at the last token, logit bias",
    ),
    "eva": (True, "EVA / EVA-02: timm EVA trunk (class-token pooling, rotary embeddings) + causal CLIP-BPE text"),
    "resnet": (False, "OpenAI ModifiedResNet (no image tokens) + causal CLIP-BPE text"),
    "convnext": (False, "timm ConvNeXt (no image tokens) + causal CLIP-BPE text"),
}
#: image kind + text kind -> family
_COMBOS = {
    ("clip-vit", "clip"): "clip-vit",
    ("siglip-vit", "siglip"): "siglip",
    ("eva", "clip"): "eva",
    ("resnet", "clip"): "resnet",
    ("convnext", "clip"): "convnext",
}


@dataclass(frozen=True)
class Family:
    """The family of one model config: ``name`` is None when the config is refused (``why`` says why)."""

    name: Optional[str]
    why: str = ""

    @property
    def image_tokens(self) -> bool:
        return self.name is not None and FAMILIES[self.name][0]


def _image_kind(v: dict) -> tuple[Optional[str], str]:
    timm_name = v.get("timm_model_name")
    if timm_name:
        name, pool = str(timm_name).lower(), v.get("timm_pool", "avg")
        if name.startswith("vit_") and "siglip" in name and pool == "map":
            return "siglip-vit", ""
        if name.startswith(("eva02_", "eva_")) and pool == "token":
            return "eva", ""
        if name.startswith("convnext"):
            return "convnext", ""
        return None, f"timm image trunk '{timm_name}' (pool '{pool or 'none'}') is not a supported family"
    if isinstance(v.get("layers"), (list, tuple)):
        return "resnet", ""
    pool = v.get("pool_type", "tok")
    if v.get("attentional_pool"):
        return None, "its ViT pools with an attentional pooler (CoCa)"
    if pool != "tok":
        what = " without ln_pre (CLIPA)" if v.get("no_ln_pre") else ""
        return None, f"its ViT pools with pool_type '{pool}'{what}, not the class token"
    return "clip-vit", ""


def _text_kind(cfg: dict, t: dict) -> tuple[Optional[str], str]:
    if t.get("hf_model_name"):
        return None, f"its text tower is a Hugging Face model ({t['hf_model_name']})"
    if "multimodal_cfg" in cfg or t.get("embed_cls"):
        return None, "it is a CoCa captioner (text tower with an appended class token)"
    if t.get("use_pad_mask"):
        return None, "its text tower masks padding tokens"
    tok = str(t.get("hf_tokenizer_name") or "")
    causal, pool = not t.get("no_causal_mask", False), t.get("pool_type", "argmax")
    if not tok and causal and pool == "argmax":
        return "clip", ""
    if "siglip" in tok.lower() and not causal and pool == "last":
        return "siglip", ""
    return None, (
        f"its text tower ({'causal' if causal else 'non-causal'}, pooled by '{pool}', tokenizer "
        f"{tok or 'CLIP BPE'}) is not a supported family"
    )


def family_of_config(cfg: Optional[dict]) -> Family:
    """The family of an open_clip model config dict (``Family(None, why)`` when refused)."""
    if not cfg:
        return Family(None, "its model config cannot be read")
    image, why_image = _image_kind(cfg.get("vision_cfg") or {})
    text, why_text = _text_kind(cfg, cfg.get("text_cfg") or {})
    if image is None or text is None:
        return Family(None, why_image or why_text)
    name = _COMBOS.get((image, text))
    if name is None:
        return Family(None, f"its {image} image tower with a {text} text tower is not a supported combination")
    return Family(name)


def family_of_arch(arch: str) -> Family:
    """The family of an open_clip arch name, from its config file (no open_clip import)."""
    from methods.backbone import model_config

    return family_of_config(model_config(arch))


def supported_line() -> str:
    return "supported families: " + ", ".join(FAMILIES) + " (docs/backbones.md; python -m methods families)"


def refusal(method_cls, arch: str, family: Family) -> Optional[str]:
    """Why ``method_cls`` (None: any method) cannot run on ``arch`` of ``family`` (one line), or None when it can."""
    if family.name is None:
        return f"backbone '{arch}' is not supported: {family.why}; {supported_line()}"
    if getattr(method_cls, "needs_image_tokens", False) and not family.image_tokens:
        from methods.registry import get_method, method_names

        allowed = [m for m in method_names() if not get_method(m).needs_image_tokens]
        return (
            f"method '{method_cls.name}' needs image tokens, which backbone '{arch}' (family {family.name}) does "
            f"not have; on this backbone run: {', '.join(allowed)}"
        )
    return None


def matrix() -> dict[str, dict[str, bool]]:
    """method -> family -> allowed."""
    from methods.registry import get_method, method_names

    return {
        m: {f: not get_method(m).needs_image_tokens or tokens for f, (tokens, _) in FAMILIES.items()}
        for m in method_names()
    }
