"""Tiny random-init backbones of every supported tower family, for the family tests.

Each keeps its family's structural flags at reduced width and depth (``tests/model_configs/pstest-*.json``):

* ``promptsweep-tiny`` — clip-vit (the project's own config);
* ``pstest-siglip`` — a timm ViT registered here with ``vit_base_patch16_siglip_224``'s flags (no class
  token, MAP attention-pool head), a non-causal text tower pooled at the last token, tanh-GELU, a logit
  bias; its tokenizer is ``SentencepieceLayoutTokenizer`` (SigLIP's T5 / Gemma vocabularies need the
  Hugging Face hub, which tests cannot reach);
* ``pstest-eva`` — a timm EVA registered here with ``eva02_base_patch16_clip_224``'s flags (rotary
  embeddings, SwiGLU, scaled MLP / attention, separate q/k/v), joint width 48 != trunk width 64 so the
  trunk's head is a real projection;
* ``pstest-resnet`` — open_clip's ModifiedResNet with one block per stage;
* ``pstest-convnext`` — a timm ConvNeXt registered here with one block per stage.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
FAMILY_ARCH = {
    "clip-vit": "promptsweep-tiny",
    "siglip": "pstest-siglip",
    "eva": "pstest-eva",
    "resnet": "pstest-resnet",
    "convnext": "pstest-convnext",
}
_registered = False


def _timm_kwargs(kw: dict) -> dict:
    """What timm's create_model passes that the model classes themselves do not take."""
    return {k: v for k, v in kw.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


def register() -> None:
    """Register the tiny timm trunks and the tiny open_clip configs (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip
    from timm.models import register_model
    from timm.models.convnext import ConvNeXt
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    @register_model
    def vit_pstest_patch8_siglip_32(pretrained=False, **kw):
        kw = _timm_kwargs(kw)
        return VisionTransformer(
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=2,
            class_token=False,
            global_pool=kw.pop("global_pool", "map"),
            **kw,
        )

    @register_model
    def eva02_pstest_patch8_clip_32(pretrained=False, **kw):
        kw = _timm_kwargs(kw)
        return Eva(
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=2,
            qkv_fused=False,
            mlp_ratio=4 * 2 / 3,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(4, 4),
            global_pool=kw.pop("global_pool", "token"),
            **kw,
        )

    @register_model
    def convnext_pstest(pretrained=False, **kw):
        model = ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), **_timm_kwargs(kw))
        model.default_cfg = {}  # open_clip's TimmModel reads its pool_size
        return model

    open_clip.add_model_config(CONFIG_DIR)
    _registered = True


class SentencepieceLayoutTokenizer:
    """SigLIP's tokenizer layout without its vocabulary: canonicalised words -> ids (CLIP BPE pieces folded into
    ``vocab_size``, all >= 3), then EOS (1), then padding (1 like T5's, or 0 like Gemma's); no BOS. Word ids are
    larger than EOS, so ``argmax`` of the ids never finds it."""

    def __init__(self, context_length: int = 16, vocab_size: int = 32000, pad_id: int = 1):
        from open_clip.tokenizer import SimpleTokenizer

        self.bpe = SimpleTokenizer()
        self.context_length, self.vocab_size, self.pad_id = context_length, vocab_size, pad_id
        self.tokenizer = SimpleNamespace(eos_token_id=1, bos_token_id=2 if pad_id == 0 else None, pad_token_id=pad_id)

    def __call__(self, texts, context_length=None) -> torch.Tensor:
        from open_clip.tokenizer import basic_clean, canonicalize_text

        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [3 + i % (self.vocab_size - 3) for i in self.bpe.encode(canonicalize_text(basic_clean(text)))]
            ids = ids[: length - 1] + [1]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def family_backbone(family: str, pad_id: int = 1):
    """The tiny random-init backbone of ``family`` (loaded once per process by load_backbone's cache)."""
    from methods.backbone import load_backbone

    register()
    tokenizer = (
        _tokenizers.setdefault(pad_id, SentencepieceLayoutTokenizer(pad_id=pad_id)) if family == "siglip" else None
    )
    return load_backbone(FAMILY_ARCH[family], None, tokenizer=tokenizer)


_tokenizers: dict[int, SentencepieceLayoutTokenizer] = {}


def random_images(bb, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(seed))
