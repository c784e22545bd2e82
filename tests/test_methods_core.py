"""The shared core against open_clip: towers without hooks, the learned-context text path, zero-shot CLIP."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fewshot.errors import ConfigError
from methods import towers
from methods.prompt_text import LearnedContextText
from methods.registry import get_method


def test_towers_without_hooks_equal_open_clip(tiny_backbone):
    bb = tiny_backbone
    ids = bb.tokenize(["a photo of a cat.", "seven", "a much longer sentence about digits and numbers."])
    ours = towers.encode_text(bb, towers.text_token_embeddings(bb, ids), bb.eot_positions(ids))
    assert torch.allclose(ours, bb.model.encode_text(ids), atol=1e-5)
    images = torch.randn(3, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
    pooled, tokens = towers.encode_image(bb, images, return_tokens=True)
    assert torch.allclose(pooled, bb.model.encode_image(images), atol=1e-5)
    assert tokens.shape == (3, 1 + (bb.image_size // 8) ** 2, bb.vision_width)


@pytest.mark.parametrize(
    "position,text", [("end", "a photo of a {}."), ("middle", "a photo {} of a."), ("front", "{} a photo of a.")]
)
def test_learned_context_with_init_words_equals_the_written_prompt(tiny_backbone, position, text):
    bb = tiny_backbone
    names = ["seven", "two_things", "a long class name here"]
    pt = LearnedContextText(bb, names, 4, "a photo of a", position)
    got = pt.encode(pt.initial_context())
    want = bb.model.encode_text(bb.tokenize([text.format(n.replace("_", " ")) for n in names]))
    assert torch.allclose(got, want, atol=1e-5)
    # class-specific and per-image context give the same features when every copy is the same
    ctx = pt.initial_context(class_specific=True)
    assert ctx.shape == (3, 4, bb.text_width)
    assert torch.allclose(pt.encode(ctx), want, atol=1e-5)
    per_image = pt.encode_per_image(torch.stack([pt.initial_context()] * 2))
    assert per_image.shape == (2, 3, bb.embed_dim)
    assert torch.allclose(per_image[1], want, atol=1e-5)


def test_random_context_and_hook_placement(tiny_backbone):
    bb = tiny_backbone
    torch.manual_seed(0)
    pt = LearnedContextText(bb, ["one", "two"], 3)
    ctx = pt.initial_context()
    assert ctx.shape == (3, bb.text_width) and 0.01 < float(ctx.std()) < 0.03
    assert pt.prompts == ["X X X one.", "X X X two."]
    seen = []

    def hook(i, x):
        seen.append(i)
        if i == 0:  # positions 1..3 hold the context (plus positional embeddings)
            pos = bb.model.positional_embedding[1:4]
            assert torch.allclose(x[0, 1:4], ctx + pos, atol=1e-6)
        return x

    pt.encode(ctx, hook=hook)
    assert seen == list(range(bb.text_layers))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_cut_after_eot_gives_the_full_length_features(tiny_backbone, position):
    bb = tiny_backbone
    names = ["cat", "golden retriever", "the very long name of one particular aircraft model"]
    cut = LearnedContextText(bb, names, 4, None, position)
    full = LearnedContextText(bb, names, 4, None, position, cut_after_eot=False)
    assert full.token_ids.shape[1] == bb.context_length
    assert cut.token_ids.shape[1] == int(full.eot_index.max()) + 1 < bb.context_length
    assert torch.equal(cut.eot_index, full.eot_index)
    g = torch.Generator().manual_seed(0)
    for ctx in (torch.randn(4, bb.text_width, generator=g), torch.randn(3, 4, bb.text_width, generator=g)):
        assert torch.allclose(cut.encode(ctx), full.encode(ctx), atol=1e-6)


def test_ctx_init_token_count_must_match_n_ctx(tiny_backbone):
    with pytest.raises(ConfigError, match="n_ctx=16"):
        LearnedContextText(tiny_backbone, ["one"], 16, "a photo of a")


@pytest.mark.parametrize("ensemble", [False, True])
def test_zeroshot_logits_equal_manual_clip(tiny_backbone, ensemble):
    from fewshot.templates import ensemble_templates, template

    bb = tiny_backbone
    cls = get_method("zeroshot")
    names = ["zero", "one", "two"]
    m = cls(bb, names, "oxford_pets", cls.Config(ensemble=ensemble))
    assert not cls.trains_by_gradient and cls.frozen_image_features and m.num_trainable() == 0
    images = torch.randn(4, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))
    temps = ensemble_templates("oxford_pets") if ensemble else [template("oxford_pets", "coop")]
    with torch.no_grad():
        per = [F.normalize(bb.model.encode_text(bb.tokenize([t.format(n) for n in names])), dim=-1) for t in temps]
        txt = F.normalize(torch.stack(per).mean(0), dim=-1)
        img = F.normalize(bb.model.encode_image(images), dim=-1)
        want = bb.model.logit_scale.exp() * img @ txt.t()
    assert torch.allclose(m(images), want, atol=1e-4)
    m.set_classnames(["three", "four"])
    assert m(images).shape == (4, 2)


def test_available_archs_is_what_open_clip_lists_and_needs_no_open_clip_import():
    """The driver checks a spec's arch from the config files' names; they must be open_clip's list."""
    import subprocess
    import sys

    import open_clip

    from methods.backbone import available_archs, register_configs

    register_configs()
    listed = [m for m in open_clip.list_models() if not m.startswith("pstest-")]  # pstest-*: tests/model_configs
    assert available_archs() == sorted(listed)
    code = (
        "import sys; from methods.backbone import available_archs; a = available_archs(); "
        "assert 'ViT-B-16' in a and 'promptsweep-tiny' in a; assert 'open_clip' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hand_crafted_template_features_have_one_implementation(tiny_backbone):
    """PromptMethod.template_text_features: CLIP's ensembling (normalise each template, average, normalise) or the
    raw mean (TGP-T's head), '_' -> ' ' unless clean=False; hand_text_features is it under the dataset's templates."""
    bb = tiny_backbone
    m = get_method("zeroshot")(bb, ["golden_retriever", "seven"], "oxford_pets", get_method("zeroshot").Config())
    temps = ["a photo of a {}.", "itap of a {}."]
    with torch.no_grad():

        def raw(names):
            return torch.stack([bb.model.encode_text(bb.tokenize([t.format(n) for n in names])) for t in temps])

        per = raw(["golden retriever", "seven"])
        want = F.normalize(F.normalize(per, dim=-1).mean(0), dim=-1)
        assert torch.allclose(m.template_text_features(temps), want, atol=1e-5)
        assert torch.allclose(m.template_text_features(temps, average="raw", normalize=False), per.mean(0), atol=1e-5)
        kept = m.template_text_features(temps, average="raw", normalize=False, clean=False)
        assert torch.allclose(kept, raw(["golden_retriever", "seven"]).mean(0), atol=1e-5)
        assert not torch.allclose(kept, per.mean(0), atol=1e-4)
    assert torch.equal(m.hand_text_features("coop"), m.template_text_features(["a photo of a {}, a type of pet."]))


def test_depth_rule_is_one_rule_for_every_method(tiny_backbone):
    """None = every block; deeper than a tower = its last block (VPT, SPT, MaPLe over both towers, SEP's layer sets)."""
    bb = tiny_backbone
    assert bb.vision_layers == bb.text_layers == 3

    def build(name, **kw):
        cls = get_method(name)
        return cls(bb, ["one", "two"], "digits", cls.Config(**kw))

    assert len(build("vpt").prompts) == len(build("vpt", depth=99).prompts) == 3
    assert len(build("vpt", depth=2).prompts) == 2 and len(build("vpt", deep=False).prompts) == 1
    assert build("spt", init="xavier", n_prompts=2, depth=99).prompts.shape[0] == 3
    assert build("maple").depth == 3 and build("maple", prompt_depth=2).depth == 2  # default 9 clipped
    assert build("sep").visual_layers == build("sep").text_layers == (1, 2)  # preset {1..11} clipped
    assert build("vpt").clip_depth(None, "text", "vision") == 3 and build("vpt").clip_layers([0, 5, 2], "text") == (
        0,
        2,
    )
