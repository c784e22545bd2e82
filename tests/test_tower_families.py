"""Backbone tower families (methods.families, methods.towers): every open_clip config is a supported family or
refused with a reason; on a tiny random-init model of each family the prompt-free path equals open_clip's own
encoders and logits (logit bias included); EOT is found by the tokenizer's rule; every method the capability
matrix allows builds, trains a step and leaves the backbone bit-identical; the rest is refused in one line."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from method_harness import assert_backbone_untouched, backbone_snapshot
from torch.utils.data import DataLoader, TensorDataset
from tower_families import FAMILY_ARCH, family_backbone, random_images

from fewshot.errors import ConfigError
from methods import towers
from methods.families import FAMILIES, family_of_arch, family_of_config, matrix
from methods.prompt_text import LearnedContextText
from methods.registry import get_method, method_names
from orchestrator.spec import parse_spec

TOKEN_FAMILIES = [f for f, (tokens, _) in FAMILIES.items() if tokens]
#: per-method settings that fit the tiny models' 16-token text context
SMALL = {"coop": {"n_ctx": 4}, "spt": {"n_prompts": 4}, "tgpt": {"n_cat": 4, "n_con": 6}, "linear_probe": {"c": 1.0}}
NAMES = ["cat", "golden_retriever", "seven"]


def test_open_clip_configs_are_a_supported_family_or_refused_with_a_reason():
    from methods.backbone import available_archs

    archs = [a for a in available_archs() if not a.startswith("promptsweep-")]
    families = {a: family_of_arch(a) for a in archs}
    assert len(archs) == 144
    assert Counter(f.name for f in families.values()) == {
        "clip-vit": 32,
        "siglip": 26,
        "eva": 7,
        "resnet": 10,
        "convnext": 11,
        None: 58,
    }
    for a, f in families.items():
        assert (f.name is None) == bool(f.why) and "\n" not in f.why, a
    assert [
        family_of_arch(a).name for a in ("ViT-B-16", "ViT-B-16-SigLIP2", "EVA02-B-16", "RN50", "convnext_base")
    ] == ["clip-vit", "siglip", "eva", "resnet", "convnext"]
    for arch, why in [
        ("ViT-L-14-CLIPA", "pool_type 'avg' without ln_pre (CLIPA)"),
        ("coca_ViT-B-32", "CoCa"),
        ("roberta-ViT-B-32", "Hugging Face model (roberta-base)"),
        ("MobileCLIP-S1", "fastvit_mci1"),
        ("ViT-H-14-worldwide", "pooled by 'eos'"),
        ("nllb-clip-base-siglip", "Hugging Face"),
    ]:
        assert why in family_of_arch(arch).why, arch
    # the case: a ViT pooled by averaging is refused, not run through class-token pooling
    assert family_of_config({"vision_cfg": {"pool_type": "avg"}, "text_cfg": {}}).name is None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_free_towers_and_logits_equal_open_clip(family):
    bb = family_backbone(family)
    assert bb.family.name == family
    m = bb.model
    ids = bb.tokenize(["a photo of a cat.", "seven", "a much longer sentence about digits, numbers and shapes"])
    text = towers.encode_text(bb, towers.text_token_embeddings(bb, ids), bb.eot_positions(ids))
    assert (text - m.encode_text(ids)).abs().max() <= 1e-5
    images = random_images(bb, 3)
    if bb.family.image_tokens:
        assert (towers.encode_image(bb, images) - m.encode_image(images)).abs().max() <= 1e-5
    else:
        with pytest.raises(ConfigError, match=f"family {family}.*no image tokens"):
            towers.encode_image(bb, images)
    # a method's logits are open_clip's own, logit bias included (SigLIP's is -10 here)
    zs = get_method("zeroshot")(bb, NAMES, "oxford_pets", get_method("zeroshot").Config())
    prompts = [f"a photo of a {n.replace('_', ' ')}, a type of pet." for n in NAMES]
    with torch.no_grad():
        want = m.get_logits(images, bb.tokenize(prompts))[0]
        assert (zs(images) - want).abs().max() <= 1e-4
    assert (bb.logit_bias is not None) == (family == "siglip")


@pytest.mark.parametrize("family,pad_id", [("clip-vit", 0), ("eva", 0), ("siglip", 1), ("siglip", 0)])
def test_eot_is_found_by_the_tokenizer_rule_and_learned_context_is_exact(family, pad_id):
    bb = family_backbone(family, pad_id=pad_id)
    ids = bb.tokenize(["a photo of a cat.", "seven", "two words"])
    eot = bb.eot_positions(ids)
    if family == "siglip":  # no BOS; EOS (1) after the words, whose ids are larger: argmax would miss it
        assert bb.token_rule.prefix == 0 and (ids[torch.arange(3), eot] == 1).all()
        assert (eot != ids.argmax(-1)).all() and ((ids[torch.arange(3), eot - 1]) > 1).all()
        with pytest.raises(ConfigError, match="no end-of-text token"):
            bb.eot_positions(torch.tensor([[5, 6, 7]]))  # cut at the context length, or no EOS appended
    else:  # CLIP BPE: EOT is the largest id
        assert bb.token_rule.prefix == 1 and torch.equal(eot, ids.argmax(-1))
    # init words placed as learned context give exactly the written prompt's features (full length on SigLIP)
    pt = LearnedContextText(bb, NAMES, 4, "a photo of a")
    assert pt.ctx_start == bb.token_rule.prefix
    assert pt.token_ids.shape[1] == (bb.context_length if family == "siglip" else int(pt.eot_index.max()) + 1)
    want = bb.model.encode_text(bb.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    assert (pt.encode(pt.initial_context()) - want).abs().max() <= 1e-5


def _loader(bb):
    images, labels = random_images(bb, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    return DataLoader(TensorDataset(images, labels), batch_size=3)


ALLOWED = [(f, m) for f in FAMILIES for m in method_names() if matrix()[m][f]]


@pytest.mark.parametrize("family,method", ALLOWED, ids=[f"{f}-{m}" for f, m in ALLOWED])
def test_every_allowed_method_trains_a_step_and_leaves_the_backbone_bit_identical(family, method):
    from methods.base import TrainConfig

    bb = family_backbone(family)
    snapshot = backbone_snapshot(bb)
    loader = _loader(bb)
    images, labels = next(iter(loader))
    torch.manual_seed(0)
    cls = get_method(method)
    m = cls(bb, NAMES, "oxford_pets", cls.Config(**SMALL.get(method, {})))
    m.prepare(loader)
    if cls.trains_by_gradient:
        params = [p for g in m.param_groups(TrainConfig()) for p in g["params"]]
        before = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=0.5)
        m.train()
        loss, _ = m.training_loss(images, labels)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, params))
    else:
        m.fit(loader, loader)
    m.eval()
    with torch.no_grad():
        assert m(images).shape == (3, len(NAMES))
    assert_backbone_untouched(bb, snapshot)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TOKEN_FAMILIES])
def test_image_token_methods_are_refused_on_families_without_tokens(family):
    bb = family_backbone(family)
    refused = [m for m in method_names() if not matrix()[m][family]]
    assert refused == ["maple", "sep", "spt", "tgpt", "vpt"]
    for name in refused:
        cls = get_method(name)
        with pytest.raises(
            ConfigError,
            match=f"method '{name}' needs image tokens, which backbone "
            f"'{FAMILY_ARCH[family]}' \\(family {family}\\) does not have; on this "
            "backbone run: cocoop, coop, kgcoop, linear_probe, zeroshot",
        ):
            cls(bb, NAMES, "oxford_pets", cls.Config(**SMALL.get(name, {})))


def test_spec_validation_refuses_a_disallowed_pair_in_one_line():
    base = {"name": "fam", "datasets": ["digits"], "shots": [1], "seeds": [1]}
    for arch, methods, where in [
        ("RN50", ["coop", "zeroshot", "spt"], "methods[2]: method 'spt' needs image tokens"),
        ("convnext_base", ["tgpt"], "methods[0]: method 'tgpt' needs image tokens"),
        ("ViT-L-14-CLIPA", ["coop"], "backbone.arch: backbone 'ViT-L-14-CLIPA' is not supported"),
        ("xlm-roberta-base-ViT-B-32", ["zeroshot"], "Hugging Face model"),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_spec({**base, "methods": methods, "backbone": {"arch": arch}})
        assert where in str(exc.value) and "\n" not in str(exc.value)
    every = [m for m in method_names() if m != "linear_probe"]  # linear probe is few-shot only, like the rest
    for arch in ("ViT-B-16", "ViT-B-16-SigLIP", "EVA02-B-16"):
        parse_spec({**base, "methods": every, "backbone": {"arch": arch}})
    parse_spec(
        {**base, "methods": ["zeroshot", "linear_probe", "coop", "cocoop", "kgcoop"], "backbone": {"arch": "RN50"}}
    )


def test_the_loader_refuses_a_config_outside_the_families_before_building_it():
    from methods.backbone import LOAD_COUNT, load_backbone

    for arch, why in [("ViT-L-14-CLIPA", "pool_type 'avg'"), ("coca_ViT-B-32", "CoCa")]:
        with pytest.raises(ConfigError, match=f"backbone '{arch}' is not supported: .*{why}.*supported families"):
            load_backbone(arch)
    from methods.backbone import LOAD_COUNT as after

    assert after == LOAD_COUNT


def test_a_model_whose_towers_are_not_its_family_is_refused():
    siglip = family_backbone("siglip")
    towers.check_family(siglip.model, "siglip", "pstest-siglip")
    for wrong in ("eva", "clip-vit", "convnext"):
        with pytest.raises(ConfigError, match=f"not the {wrong} towers"):
            towers.check_family(siglip.model, wrong, "pstest-siglip")


def test_eva_prompt_tokens_get_the_identity_rotation_beside_the_patches():
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    bb = family_backbone("eva")
    tower = bb.image_tower
    _, rope = tower.embed(random_images(bb, 1))
    P, n = rope.shape[-2], 3
    for at, patches, prompts in [("end", slice(0, P), slice(P, P + n)), ("after_prefix", slice(n, n + P), slice(0, n))]:
        full = tower.rope_for(rope, 1 + P + n, at)
        assert full.shape[-2] == P + n and torch.equal(full[patches], rope)
        x = torch.randn(2, n, rope.shape[-1] // 2)  # one head: the embedding holds sin and cos
        assert torch.allclose(apply_rot_embed_cat(x, full[prompts]), x)  # prompts are not rotated
    assert tower.rope_for(rope, 1 + P, "end") is rope


def test_quick_gelu_follows_open_clips_pretrained_registry():
    from methods.backbone import quick_gelu_for
    from methods.families import Family

    vit, sig = Family("clip-vit"), Family("siglip")
    for arch, tag, want in [
        ("ViT-B-16", "openai", True),
        ("ViT-B-32", "laion400m_e32", True),
        ("ViT-B-16", "metaclip_400m", True),
        ("ViT-L-14", "dfn2b", True),
        ("RN50", "yfcc15m", True),
        ("ViT-B-16", "laion2b_s34b_b88k", False),
        ("ViT-B-32", "datacomp_xl_s13b_b90k", False),
        ("ViT-B-16", None, False),
    ]:
        assert quick_gelu_for(arch, tag, False, vit) is want, (arch, tag)
    assert quick_gelu_for("ViT-B-16", "/ckpt.pt", True, vit) is True  # a local file of an OpenAI-shaped family
    assert quick_gelu_for("ViT-B-16-SigLIP", "/ckpt.pt", True, sig) is False
