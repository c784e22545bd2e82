"""MaPLe: coupled deep prompts; depth rule, placement, gradients, training, checkpoints, ViT-B-16 sizes."""

from __future__ import annotations

import math

import pytest
import torch

from methods import towers
from methods.maple import MaPLe, MaPLeConfig
from tests.method_harness import (
    assert_backbone_untouched,
    backbone_snapshot,
    checkpoint_roundtrip,
    digits_data,
    one_step_gradients,
    train_losses,
)


@pytest.fixture(scope="module")
def digits(tiny_backbone):
    return digits_data(tiny_backbone, shots=4, batch_size=8)


def _make(bb, classnames, **kw):
    torch.manual_seed(0)
    return MaPLe(bb, classnames, "digits", MaPLeConfig(**kw))


def test_all_prompts_and_couplings_get_gradients_backbone_untouched(tiny_backbone, digits):
    classnames, loader = digits
    snap = backbone_snapshot(tiny_backbone)
    m = _make(tiny_backbone, classnames)
    assert m.depth == 3  # default 9 clipped to the tiny model's 3 blocks
    images, labels = next(iter(loader))
    grads = one_step_gradients(m, images, labels)
    assert set(grads) == {
        "ctx",
        "deep_text.0",
        "deep_text.1",
        "proj.weight",
        "proj.bias",
        "deep_proj.0.weight",
        "deep_proj.0.bias",
        "deep_proj.1.weight",
        "deep_proj.1.bias",
    }
    assert all(grads.values()), grads
    assert_backbone_untouched(tiny_backbone, snap)


def test_context_initialised_from_first_words_of_ctx_init(tiny_backbone, digits):
    classnames, _ = digits
    m = _make(tiny_backbone, classnames)
    ids = tiny_backbone.tokenize(["a photo"])
    want = towers.text_token_embeddings(tiny_backbone, ids)[0, 1:3]
    assert torch.allclose(m.ctx.detach(), want)
    # deeper couplings start as copies of one layer (reference _get_clones); layer 0 is independent
    assert torch.equal(m.deep_proj[0].weight, m.deep_proj[1].weight)
    assert not torch.equal(m.proj.weight, m.deep_proj[0].weight)


def test_depth_one_touches_only_layer_zero(tiny_backbone, digits):
    classnames, loader = digits
    images, labels = next(iter(loader))
    m = _make(tiny_backbone, classnames, prompt_depth=1)
    assert m.depth == 1 and len(m.deep_text) == 0 and len(m.deep_proj) == 0
    grads = one_step_gradients(m, images, labels)
    assert set(grads) == {"ctx", "proj.weight", "proj.bias"} and all(grads.values())

    # deeper vision blocks see the propagated prompt tokens, not fresh ones: the image features equal
    # a run where the appended prompts flow through unchanged hooks
    m.eval()
    with torch.no_grad():
        v0 = m.proj(m.ctx)
        plain = towers.encode_image(
            tiny_backbone, images, pre_ln=lambda x: torch.cat([x, v0.expand(x.shape[0], -1, -1)], 1)
        )
        assert torch.allclose(m.image_features(images), plain, atol=1e-6)

    # with depth 2, block 1 sees the coupled deep prompt and block 2 the propagated one
    m2 = _make(tiny_backbone, classnames, prompt_depth=2)
    vis = m2.visual_prompts()
    seen = {}
    orig = towers._run_blocks

    def spy_blocks(transformer, x, mask, hook):
        def spy(i, x):
            x = hook(i, x) if hook else x
            seen.setdefault(i, x[:, -2:].detach().clone())
            return x

        return orig(transformer, x, mask, spy)

    towers._run_blocks = spy_blocks
    try:
        with torch.no_grad():
            m2.image_features(images)
    finally:
        towers._run_blocks = orig
    assert torch.allclose(seen[1], vis[1].detach().expand_as(seen[1]))
    assert not torch.allclose(seen[2], vis[1].detach().expand_as(seen[2]), atol=1e-3)


def test_text_prompts_replaced_in_deeper_text_layers(tiny_backbone, digits):
    classnames, _ = digits
    m = _make(tiny_backbone, classnames, prompt_depth=2)
    with torch.no_grad():
        base = m.text_features()
        m.deep_text[0].add_(torch.randn_like(m.deep_text[0]))
        assert not torch.allclose(m.text_features(), base, atol=1e-4)
    m1 = _make(tiny_backbone, classnames, prompt_depth=1)
    with torch.no_grad():
        t1 = m1.text_features()
        m1.ctx.add_(torch.randn_like(m1.ctx))
        assert not torch.allclose(m1.text_features(), t1, atol=1e-4)


def test_loss_falls_and_checkpoint_roundtrip(tiny_backbone, digits):
    # one image of each of 5 digit classes: on the random tiny backbone (a fresh draw per test process)
    # that is what text-side prompts can fit reliably in a few seconds; the loss must end clearly below
    # chance (ln 5), not merely fall from an over-confident start
    classnames, _ = digits
    _, one = digits_data(tiny_backbone, shots=1, batch_size=10)
    images, labels = next(iter(one))
    keep = labels < 5
    batch = [(images[keep], labels[keep])]
    m = _make(tiny_backbone, classnames[:5])
    losses = train_losses(m, batch, epochs=150, lr=0.05)
    assert min(losses[-5:]) < losses[0] - 0.1 and min(losses[-5:]) < math.log(5) - 0.1, losses[::10]
    images = images[keep]
    checkpoint_roundtrip(lambda: _make(tiny_backbone, classnames[:5]), m, images)
    m.set_classnames(classnames[:3])
    assert m(images).shape == (len(images), 3)


def test_sizes_on_vit_b16():
    from methods.backbone import load_backbone

    bb = load_backbone("ViT-B-16")
    m = MaPLe(bb, ["cat", "dog"], "imagenet", MaPLeConfig())
    assert m.depth == 9
    # 9 text prompts of 2x512, 9 coupling layers 512->768 (weights + biases)
    assert m.num_trainable() == 9 * 2 * 512 + 9 * (512 * 768 + 768) == 3_555_072
    assert MaPLe.expected_trainable(2, 9, 512, 768) == 3_555_072
    assert m.proj.out_features == 768
    x = MaPLe(bb, ["cat"], "imagenet", MaPLeConfig(prompt_depth=3))
    assert x.num_trainable() == 3 * 2 * 512 + 3 * (512 * 768 + 768)


def test_prompt_text_is_ctx_then_rest_of_init_then_name(tiny_backbone):
    from fewshot.errors import ConfigError
    from methods.maple import split_ctx_init

    assert split_ctx_init(tiny_backbone, "a photo of a", 2) == ("a photo", "of a")
    assert split_ctx_init(tiny_backbone, "a photo of a", 4) == ("a photo of a", "")
    assert split_ctx_init(tiny_backbone, None, 2) == (None, "")
    with pytest.raises(ConfigError, match="n_ctx=7"):
        split_ctx_init(tiny_backbone, "a photo of a", 7)
    m = _make(tiny_backbone, ["sea_lion", "cat"])
    assert m.text.prompts == ["a photo of a sea lion.", "a photo of a cat."]
    assert m.text.n_ctx == 2
    r = _make(tiny_backbone, ["cat"], ctx_init=None)
    assert r.text.prompts == ["X X cat."]
