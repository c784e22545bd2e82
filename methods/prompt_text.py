"""The learned-context text path shared by CoOp, CoCoOp, KgCoOp, MaPLe and SEP.

CoOp's prompt for class ``c`` is ``[SOT] v_1 ... v_M [CLASS c] . [EOT] pad...``: M learned context
vectors ``v`` (token-embedding width ``D``) replace the embeddings of placeholder words. This module
builds everything frozen about that prompt once per class list and assembles it with a given context.

Usage::

    text = LearnedContextText(backbone, classnames, n_ctx=16, ctx_init=None, position="end")
    ctx = nn.Parameter(text.initial_context())          # [M, D]: init words' embeddings or N(0, 0.02^2)
    feats = text.encode(ctx)                            # [C, E] class text features (unnormalised)
    feats = text.encode(ctx_cls)                        # class-specific context [C, M, D] (CoOp csc)
    feats = text.encode_per_image(ctx_img)              # per-image context [B, M, D] -> [B, C, E] (CoCoOp)
    feats = text.encode(ctx, hook=my_layer_hook)        # deep prompts (MaPLe): towers.LayerHook

Tokenisation: the placeholder is ``"X X ... X {classname}."`` (``_`` in names becomes a space), or
``"{ctx_init} {classname}."`` when ``ctx_init`` words are given; the placeholder / init words must
tokenise to exactly ``n_ctx`` tokens (else ``ConfigError`` naming both numbers). The frozen embeddings
are split into ``prefix`` [C, p, D] (the tokenizer's special tokens before the text: CLIP's SOT, p = 1;
none for SigLIP, p = 0 — ``methods.token_rules``), the placeholder ctx slots, and ``suffix``
[C, L-p-M, D] (class tokens, '.', EOT, padding). ``position``:

* ``end``    — ``SOT ctx CLASS . EOT`` (the default; ctx occupies positions ``p .. p+M-1``, ``ctx_start`` = p);
* ``middle`` — ``SOT ctx[:M//2] CLASS ctx[M//2:] . EOT``;
* ``front``  — ``SOT CLASS ctx . EOT``.

Every arrangement keeps the sequence length, so each class's EOT index (``eot_index`` [C], by the
tokenizer's rule) is the one of its tokenised placeholder. On a causal text tower, sequences stop at the
last class's EOT (``cut_after_eot``, default): under the causal mask the padding after it never reaches
an EOT feature, so the features are those of the full 77-token sequences at a fraction of the cost; a
method whose hooks read tokens past the EOT (SEP's positional selection) keeps the full length with
``cut_after_eot=False``. A bidirectional tower (SigLIP) always gets the full-length sequences, padding
included, exactly as its tokenizer produced them. Assembly is differentiable w.r.t. the context only;
everything else is a frozen tensor. The text tower always runs through ``methods.towers.encode_text``.

``LearnedContextText`` is a plain object (not an ``nn.Module``): it holds no learnable or
persistent state, so a method's ``state_dict`` only carries its own context parameters. Rebuild it
on ``set_classnames``.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from fewshot.errors import ConfigError
from methods import towers
from methods.backbone import Backbone

ClassTokenPosition = Literal["end", "middle", "front"]
CTX_INIT_STD = 0.02


def n_text_tokens(bb: Backbone, text: str) -> int:
    """Number of tokens of ``text`` (without the tokenizer's special tokens), by the tokenizer's rule."""
    return int(bb.token_rule.n_tokens(bb.tokenize([text]))[0])


def check_context(backbone: Backbone, n_ctx: int, ctx_init: Optional[str] = None) -> str:
    """The text the ``n_ctx`` learned context tokens start from (``ctx_init``, or one placeholder word per token);
    ConfigError when it is not exactly ``n_ctx`` tokens for ``backbone``'s tokenizer. Methods call it from their
    ``check_settings`` (the dry run of a search space) and ``LearnedContextText`` when it builds the prompts."""
    if n_ctx < 1:
        raise ConfigError(f"n_ctx must be >= 1 (got {n_ctx})")
    ctx_init = ctx_init.strip().replace("_", " ") if ctx_init else None
    prefix_text = ctx_init or " ".join(["X"] * n_ctx)
    n_init = n_text_tokens(backbone, prefix_text)
    if n_init != n_ctx and ctx_init:
        raise ConfigError(
            f"ctx_init '{ctx_init}' is {n_init} tokens but n_ctx={n_ctx}: set n_ctx={n_init} "
            "or ctx_init to null (random init)"
        )
    if n_init != n_ctx:  # each placeholder X must be one token for the context to replace it
        raise ConfigError(
            f"the placeholder '{prefix_text}' is {n_init} tokens for the tokenizer of {backbone.arch}, "
            f"not n_ctx={n_ctx}: this tokenizer does not fit the learned-context prompt path"
        )
    return prefix_text


class LearnedContextText:
    """Frozen prompt pieces for ``classnames`` and the assembly/encoding of learned context."""

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        n_ctx: int,
        ctx_init: Optional[str] = None,
        position: ClassTokenPosition = "end",
        cut_after_eot: bool = True,
    ):
        if position not in ("end", "middle", "front"):
            raise ConfigError(f"class_token_position must be end, middle or front (got {position!r})")
        self.backbone = backbone
        self.classnames = list(classnames)
        self.n_ctx = n_ctx
        self.position = position
        self.ctx_init = ctx_init.strip().replace("_", " ") if ctx_init else None
        self.prefix_text = prefix_text = check_context(backbone, n_ctx, ctx_init)
        names = [c.replace("_", " ") for c in self.classnames]
        self.name_lens = [n_text_tokens(backbone, n) for n in names]
        self.prompts = [f"{prefix_text} {n}." for n in names]
        ids = backbone.tokenize(self.prompts)  # [C, context length]
        self.eot_index = backbone.eot_positions(ids)  # [C]
        if cut_after_eot and backbone.text_tower.causal:  # padding after the last EOT never reaches an EOT feature
            ids = ids[:, : int(self.eot_index.max()) + 1]
        self.token_ids = ids  # [C, L]
        p = self.ctx_start = backbone.token_rule.prefix  # special tokens before the text
        with torch.no_grad():
            emb = towers.text_token_embeddings(backbone, ids).detach()  # [C, L, D]
        self.prefix = emb[:, :p]  # SOT (CLIP BPE) or nothing (SigLIP)
        self.ctx_slots = emb[:, p : p + n_ctx]  # placeholder / init-word embeddings
        self.suffix = emb[:, p + n_ctx :]  # CLASS . EOT pad

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def initial_context(self, class_specific: bool = False) -> torch.Tensor:
        """Initial context: the init words' embeddings, else N(0, 0.02^2); [M, D] or [C, M, D] (csc)."""
        if self.ctx_init:
            ctx = self.ctx_slots[0].clone()
            return ctx.unsqueeze(0).repeat(self.n_classes, 1, 1) if class_specific else ctx
        shape = (
            (self.n_classes, self.n_ctx, self.backbone.text_width)
            if class_specific
            else (self.n_ctx, self.backbone.text_width)
        )
        return torch.randn(shape, device=self.backbone.device) * CTX_INIT_STD

    # ------------------------------------------------------------------------------------ assembly
    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings [C, L, D] of every class prompt with context ``ctx`` ([M, D] or [C, M, D])."""
        C = self.n_classes
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(C, -1, -1)
        if ctx.shape[0] != C or ctx.shape[1] != self.n_ctx:
            raise ValueError(f"context of shape {tuple(ctx.shape)} does not fit {C} classes x {self.n_ctx} tokens")
        prefix = self.prefix.to(ctx.dtype)
        suffix = self.suffix.to(ctx.dtype)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            cls_tok, rest = suffix[i : i + 1, :n], suffix[i : i + 1, n:]
            c = ctx[i : i + 1]
            if self.position == "middle":
                rows.append(torch.cat([prefix[i : i + 1], c[:, :half], cls_tok, c[:, half:], rest], dim=1))
            else:  # front
                rows.append(torch.cat([prefix[i : i + 1], cls_tok, c, rest], dim=1))
        return torch.cat(rows, dim=0)

    def encode(self, ctx: torch.Tensor, hook: Optional[towers.LayerHook] = None) -> torch.Tensor:
        """Class text features [C, E] (not normalised) for shared [M, D] or class-specific [C, M, D] context."""
        return towers.encode_text(self.backbone, self.assemble(ctx), self.eot_index, hook)

    def encode_per_image(self, ctx: torch.Tensor, hook: Optional[towers.LayerHook] = None) -> torch.Tensor:
        """Per-image context [B, M, D] -> text features [B, C, E]: each image's context for all C classes."""
        B, C = ctx.shape[0], self.n_classes
        if self.position == "end":  # one concatenation: every image's context in front of every class's suffix
            rows = ctx.unsqueeze(1).expand(B, C, *ctx.shape[1:]).reshape(B * C, *ctx.shape[1:])
            embeds = torch.cat(
                [self.prefix.to(ctx.dtype).repeat(B, 1, 1), rows, self.suffix.to(ctx.dtype).repeat(B, 1, 1)], dim=1
            )  # [B*C, L, D]
        else:
            embeds = torch.cat([self.assemble(ctx[b]) for b in range(B)], dim=0)  # [B*C, L, D]
        eot = self.eot_index.repeat(B)
        return towers.encode_text(self.backbone, embeds, eot, hook).view(B, C, -1)
