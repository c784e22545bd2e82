"""The one prompt-insertion path shared by every method: open_clip's towers run block by block, per family.

Methods never call ``model.encode_text``/``encode_image`` when they change tokens; they call the
functions here and pass hooks:

* ``LayerHook(i, x) -> x`` is called with the hidden states ``x`` [B, L, D] right **before**
  residual block ``i`` (``i = 0`` sees the output of the image tower's pre-norm — ``ln_pre`` /
  ``norm_pre`` — on the image side, the token + positional embeddings on the text side). A hook may
  insert, replace or fuse tokens and may change ``L`` (a causal text mask is sliced to the length).
* On the image side, ``pre_ln`` (``x -> x``) runs on the prefix (class) + patch + positional
  embeddings before the pre-norm (where SEP and MaPLe append their visual prompts).

This module is the one place that touches open_clip's and timm's tower internals, one adapter per
family (``methods.families``); the loader calls ``check_family`` once, so a model whose modules are not
what its family promises is refused, never run wrongly. Without hooks every path equals open_clip's own
``encode_image`` / ``encode_text`` (tested per family):

* image, ``clip-vit``: ``conv1`` → class token + positions → ``ln_pre`` → ``resblocks`` → ``ln_post`` of
  the class token → ``proj``;
* image, ``siglip`` (timm ViT): ``patch_embed`` → positions (no class token) → ``norm_pre`` → ``blocks`` →
  ``norm`` → attention-pool (MAP) head over **all** tokens → open_clip's head; prompts left in the
  sequence are pooled with the patches, as the class token attends to them in a CLIP ViT;
* image, ``eva`` (timm EVA): as the timm ViT with class-token pooling, and each block gets the rotary
  embedding of the patch tokens; prompt tokens get the identity rotation (no position), placed where the
  method put them (``prompts_at``: appended at the ``end`` — VPT, MaPLe, SEP — or ``after_prefix`` —
  SPT);
* ``resnet`` / ``convnext`` have no image tokens: only methods that leave the image tower untouched
  (``Backbone.encode_image``) run on them; ``image_tower`` raises a ConfigError;
* text (CLIP's own text attributes, or ``model.text`` of a CustomTextCLIP): token + positional
  embeddings → ``resblocks`` (causal mask, or none) → ``ln_final`` → pooled at the EOT position
  (causal CLIP, ``eot_index``) or at the last position (SigLIP: the sequence keeps the full context
  length, padding included, as the tokenizer produced it) → projection.

Text sequences carry their EOT position explicitly (``eot_index``), because prompt insertion moves it.
All functions are differentiable w.r.t. whatever the hooks add; the frozen weights never receive
gradients (``requires_grad=False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch
from torch import nn

from fewshot.errors import ConfigError

if TYPE_CHECKING:
    from methods.backbone import Backbone

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]
TokenHook = Callable[[torch.Tensor], torch.Tensor]
PromptsAt = Literal["end", "after_prefix"]


def _run_blocks(
    transformer: nn.Module, x: torch.Tensor, mask_full: Optional[torch.Tensor], hook: Optional[LayerHook]
) -> torch.Tensor:
    """open_clip's ``Transformer``: its residual blocks one by one (a causal mask sliced to the length)."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        if hook is not None:
            x = hook(i, x)
        mask = None if mask_full is None else mask_full[: x.shape[1], : x.shape[1]].to(x.dtype)
        x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return x


# --------------------------------------------------------------------------------------------- text
class TextTower:
    """open_clip's native text transformer: CLIP keeps its parts on the model, CustomTextCLIP on ``model.text``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.module = model.text if hasattr(model, "text") else model
        self.pool_type = self.module.pool_type if self.module is not model else model.text_pool_type

    def __getattr__(self, name: str):
        # token_embedding, positional_embedding, transformer, ln_final, text_projection, attn_mask (None:
        # bidirectional, SigLIP), read from the module at each use (a buffer is a new tensor after .to())
        if name in (
            "token_embedding",
            "positional_embedding",
            "transformer",
            "ln_final",
            "text_projection",
            "attn_mask",
        ):
            return getattr(self.__dict__["module"], name)
        raise AttributeError(name)

    @property
    def causal(self) -> bool:
        return self.attn_mask is not None

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def layers(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])


def text_token_embeddings(bb: "Backbone", ids: torch.Tensor) -> torch.Tensor:
    """Frozen token embeddings [N, L, D_t] of token ids (no positional embedding)."""
    return bb.text_tower.token_embedding(ids.to(bb.device))


def encode_text(
    bb: "Backbone",
    token_embeds: torch.Tensor,
    eot_index: torch.Tensor,
    hook: Optional[LayerHook] = None,
    project: bool = True,
) -> torch.Tensor:
    """Run the text tower on token embeddings [N, L, D_t] and return pooled features [N, E].

    ``token_embeds`` are token embeddings *without* positions (learned context already placed);
    positional embeddings for the first ``L`` positions are added here. A causal tower pools at
    ``eot_index``; a bidirectional one (SigLIP) at the last position, so its sequences must keep the
    full context length.
    """
    t = bb.text_tower
    L = token_embeds.shape[1]
    if not t.causal and L != t.context_length:
        raise ValueError(f"a bidirectional text tower needs full-length sequences ({t.context_length}), got {L}")
    x = token_embeds + t.positional_embedding[:L].to(token_embeds.dtype)
    x = _run_blocks(t.transformer, x, t.attn_mask, hook)
    x = t.ln_final(x)
    if t.pool_type == "last":
        x = x[:, -1]
    else:
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
    p = t.text_projection
    if project and p is not None:
        x = p(x) if isinstance(p, nn.Linear) else x @ p
    return x


# -------------------------------------------------------------------------------------------- image
class _ImageTower:
    """One family's image tower, run in steps: ``embed`` → (``pre_ln`` hook) → ``pre_norm`` → blocks → ``pool``."""

    prefix_tokens = 1  # class token(s) before the patch tokens

    def __init__(self, visual: nn.Module):
        self.visual = visual

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, object]:
        """(prefix + patch tokens with positions [B, prefix + P, D], per-call state for the blocks)."""
        raise NotImplementedError

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, x, state, hook: Optional[LayerHook], prompts_at: PromptsAt) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image feature [B, E] from the last block's tokens, as open_clip computes it."""
        raise NotImplementedError

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every token [B, L, D] mapped into the joint space [B, L, E] by the tower's projection (no final norm)."""
        raise NotImplementedError


class _ClipViT(_ImageTower):
    def embed(self, images):
        v = self.visual
        x = v.conv1(images.to(dtype=v.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.patch_dropout(x), None

    def pre_norm(self, x):
        return self.visual.ln_pre(x)

    def run_blocks(self, x, state, hook, prompts_at):
        return _run_blocks(self.visual.transformer, x, None, hook)

    def pool(self, tokens):
        v = self.visual
        pooled = v.ln_post(tokens[:, 0])
        return pooled @ v.proj if v.proj is not None else pooled

    def project_tokens(self, tokens):
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens

    @property
    def width(self) -> int:
        return int(self.visual.class_embedding.shape[-1])

    @property
    def blocks(self):
        return self.visual.transformer.resblocks

    @property
    def patch_size(self) -> int:
        k = self.visual.conv1.kernel_size
        return int(k[0] if isinstance(k, (tuple, list)) else k)

    @property
    def num_tokens(self) -> int:
        return int(self.visual.positional_embedding.shape[0])


class _TimmViT(_ImageTower):
    """timm ``VisionTransformer`` inside open_clip's ``TimmModel`` (SigLIP: no class token, MAP head)."""

    @property
    def trunk(self):
        return self.visual.trunk

    @property
    def prefix_tokens(self) -> int:  # type: ignore[override]
        return int(self.trunk.num_prefix_tokens)

    def embed(self, images):
        t = self.trunk
        x = t.patch_embed(images.to(dtype=t.patch_embed.proj.weight.dtype))
        return t.patch_drop(t._pos_embed(x)), None

    def pre_norm(self, x):
        return self.trunk.norm_pre(x)

    def run_blocks(self, x, state, hook, prompts_at):
        for i, block in enumerate(self.trunk.blocks):
            if hook is not None:
                x = hook(i, x)
            x = block(x)
        return x

    def pool(self, tokens):
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(tokens)))

    def project_tokens(self, tokens):
        return self.visual.head(self.trunk.head(tokens))

    @property
    def width(self) -> int:
        return int(self.trunk.embed_dim)

    @property
    def blocks(self):
        return self.trunk.blocks

    @property
    def patch_size(self) -> int:
        return int(self.trunk.patch_embed.patch_size[0])

    @property
    def num_tokens(self) -> int:
        return int(self.trunk.patch_embed.num_patches) + self.prefix_tokens


class _TimmEva(_TimmViT):
    """timm ``Eva`` (EVA-01 / EVA-02): its blocks take the rotary embedding of the patch tokens."""

    def embed(self, images):
        t = self.trunk
        x = t.patch_embed(images.to(dtype=t.patch_embed.proj.weight.dtype))
        return t._pos_embed(x)  # (tokens, rotary embedding [P, 2·d] or None); eval mode: no patch dropout

    def run_blocks(self, x, rope, hook, prompts_at):
        for i, block in enumerate(self.trunk.blocks):
            if hook is not None:
                x = hook(i, x)
            x = block(x, rope=self.rope_for(rope, x.shape[1], prompts_at))
        return x

    def rope_for(self, rope: Optional[torch.Tensor], length: int, prompts_at: PromptsAt) -> Optional[torch.Tensor]:
        """The rotary embedding of every non-prefix token of a sequence of ``length``: the patches' own, and the
        identity rotation (sin 0, cos 1) for the prompt tokens, on their side of the patches."""
        if rope is None:
            return None
        extra = length - self.prefix_tokens - rope.shape[-2]
        if extra == 0:
            return rope
        if extra < 0:
            raise ValueError(f"{length} tokens cannot hold the {rope.shape[-2]} patch tokens of this EVA tower")
        half = rope.shape[-1] // 2
        ident = torch.cat(
            [rope.new_zeros(*rope.shape[:-2], extra, half), rope.new_ones(*rope.shape[:-2], extra, half)], -1
        )
        return torch.cat([rope, ident] if prompts_at == "end" else [ident, rope], dim=-2)


def check_family(model: nn.Module, family: str, arch: str) -> None:
    """Refuse a built model whose towers are not what ``family`` promises (one ConfigError), so the adapters
    below never run on modules they were not written for."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import TextTransformer, VisionTransformer

    v = model.visual
    trunk = getattr(v, "trunk", None)
    kind = {
        "clip-vit": lambda: isinstance(v, VisionTransformer) and v.attn_pool is None and v.pool_type == "tok",
        "siglip": lambda: (
            type(trunk).__name__ == "VisionTransformer" and trunk.attn_pool is not None and hasattr(trunk, "_pos_embed")
        ),
        "eva": lambda: (
            type(trunk).__name__ == "Eva" and hasattr(trunk, "_pos_embed") and not getattr(trunk, "rope_mixed", False)
        ),
        "resnet": lambda: isinstance(v, ModifiedResNet),
        "convnext": lambda: type(trunk).__name__ == "ConvNeXt",
    }[family]
    text = getattr(model, "text", None)
    text_ok = (
        (isinstance(text, TextTransformer) and text.cls_emb is None)
        if text is not None
        else hasattr(model, "token_embedding")
    )
    if not (kind() and text_ok):
        raise ConfigError(
            f"backbone '{arch}' was built as {type(trunk or v).__name__} + "
            f"{type(text).__name__ if text is not None else 'CLIP text'}, not the {family} towers the "
            "prompt path runs (an open_clip / timm version this promptsweep does not know): use a "
            "backbone of another family or the open_clip_torch / timm versions of pyproject.toml"
        )


_ADAPTERS = {"clip-vit": _ClipViT, "siglip": _TimmViT, "eva": _TimmEva}


def image_tower(bb: "Backbone") -> _ImageTower:
    """The image tower adapter of ``bb``'s family; ConfigError for families without image tokens."""
    cls = _ADAPTERS.get(bb.family.name)
    if cls is None:
        raise ConfigError(
            f"backbone '{bb.arch}' (family {bb.family.name}) has no image tokens to prompt: use a "
            "method that leaves the image tower untouched (python -m methods list)"
        )
    return cls(bb.model.visual)


def image_embeddings(bb: "Backbone", images: torch.Tensor) -> torch.Tensor:
    """Prefix (class) + patch tokens with positions [B, prefix + P, D_v] (before the pre-norm)."""
    return image_tower(bb).embed(images.to(bb.device))[0]


def encode_image(
    bb: "Backbone",
    images: torch.Tensor,
    hook: Optional[LayerHook] = None,
    pre_ln: Optional[TokenHook] = None,
    return_tokens: bool = False,
    prompts_at: PromptsAt = "end",
):
    """Run the image tower with optional token hooks.

    Returns the image feature [B, E] (open_clip's pooling and projection); with ``return_tokens=True``
    returns ``(pooled, tokens)`` where ``tokens`` is the last block's output [B, L, D_v] (before the
    final norm, every position including prompts). ``prompts_at`` says where the hooks put extra tokens
    (``end`` or ``after_prefix``), for the towers whose blocks need each token's position (EVA's rotary
    embedding).
    """
    tower = image_tower(bb)
    x, state = tower.embed(images.to(bb.device))
    if pre_ln is not None:
        x = pre_ln(x)
    tokens = tower.run_blocks(tower.pre_norm(x), state, hook, prompts_at)
    pooled = tower.pool(tokens)
    return (pooled, tokens) if return_tokens else pooled


def project_image_tokens(bb: "Backbone", tokens: torch.Tensor) -> torch.Tensor:
    """Map visual hidden states [B, L, D_v] into the joint space [B, L, E] (the tower's projection, no final norm)."""
    return image_tower(bb).project_tokens(tokens)
