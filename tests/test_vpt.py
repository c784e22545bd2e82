"""VPT on the CLIP image tower: placement of shallow/deep prompts, init, gradients, training, checkpoints, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from methods import towers
from methods.vpt import VPT, VPTConfig
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
    return VPT(bb, classnames, "digits", VPTConfig(**kw))


def test_deep_prompts_on_every_block_get_gradients_backbone_untouched(tiny_backbone, digits):
    classnames, loader = digits
    snap = backbone_snapshot(tiny_backbone)
    m = _make(tiny_backbone, classnames)
    assert len(m.prompts) == tiny_backbone.vision_layers == 3  # depth None = all blocks, clipped
    images, labels = next(iter(loader))
    grads = one_step_gradients(m, images, labels)
    assert grads and all(grads.values()), grads
    assert set(grads) == {f"prompts.{i}" for i in range(3)}
    assert_backbone_untouched(tiny_backbone, snap)


def test_depth_rule_and_xavier_init(tiny_backbone, digits):
    classnames, _ = digits
    assert len(_make(tiny_backbone, classnames, deep=False, depth=3).prompts) == 1
    assert len(_make(tiny_backbone, classnames, depth=2).prompts) == 2
    assert len(_make(tiny_backbone, classnames, depth=12).prompts) == 3
    m = _make(tiny_backbone, classnames)
    patch = tiny_backbone.visual.conv1.kernel_size[0]
    a = math.sqrt(6 / (3 * patch**2 + tiny_backbone.vision_width))
    assert VPT.xavier_bound(tiny_backbone) == pytest.approx(a)
    p = torch.cat([q.detach().flatten() for q in m.prompts])
    assert p.abs().max() <= a and p.abs().max() > 0.8 * a


def test_prompt_placement_appended_then_replaced(tiny_backbone, digits):
    """Hooks see [CLS, patches, P0] at block 0, and the layer's fresh prompts at deeper prompted blocks only."""
    classnames, loader = digits
    images, _ = next(iter(loader))
    m = _make(tiny_backbone, classnames, depth=2, n_prompts=3)
    m.eval()
    seen = {}

    def spy(i, x):
        x = m._replace(i, x)
        seen[i] = x[:, -3:].detach().clone()
        return x

    n_tokens = 1 + (tiny_backbone.image_size // tiny_backbone.visual.conv1.kernel_size[0]) ** 2
    with torch.no_grad():
        _, tokens = towers.encode_image(tiny_backbone, images, hook=spy, pre_ln=m._append, return_tokens=True)
    assert tokens.shape[1] == n_tokens + 3
    assert torch.allclose(seen[1], m.prompts[1].expand_as(seen[1]))  # replaced at block 1
    assert not torch.allclose(seen[2], m.prompts[1].expand_as(seen[2]), atol=1e-3)  # block 2: propagated
    # block 0 sees ln_pre(appended prompts), not the raw prompts
    assert not torch.allclose(seen[0], m.prompts[0].expand_as(seen[0]), atol=1e-3)
    # the class token is still at index 0: logits equal the method's forward
    with torch.no_grad():
        assert torch.allclose(m(images), m.forward(images))


def test_prompt_dropout_only_in_training(tiny_backbone, digits):
    classnames, loader = digits
    images, _ = next(iter(loader))
    m = _make(tiny_backbone, classnames, prompt_dropout=0.5)
    m.eval()
    with torch.no_grad():
        a, b = m(images), m(images)
        assert torch.equal(a, b)
        m.train()
        torch.manual_seed(1)
        assert not torch.allclose(m(images), a)


def test_loss_falls_and_checkpoint_roundtrip(tiny_backbone, digits):
    # one 10-image batch: with the frozen template classifier of a random tiny backbone (a fresh draw per
    # test process) class text features are ~0.9 cosine-similar, so the loss floor sits not far below chance
    classnames, _ = digits
    _, one_batch = digits_data(tiny_backbone, shots=1, batch_size=10)
    m = _make(tiny_backbone, classnames)
    losses = train_losses(m, one_batch, epochs=80, lr=0.1)
    assert min(losses[-5:]) < losses[0] - 0.03 and min(losses[-5:]) < math.log(10) - 0.015, losses
    images, _ = next(iter(one_batch))
    checkpoint_roundtrip(lambda: _make(tiny_backbone, classnames), m, images)


def test_set_classnames_rebuilds_text_classifier(tiny_backbone, digits):
    classnames, loader = digits
    m = _make(tiny_backbone, classnames)
    images, _ = next(iter(loader))
    m.set_classnames(classnames[:4])
    assert m(images).shape == (len(images), 4)


def test_sizes_on_vit_b16():
    from methods.backbone import load_backbone

    bb = load_backbone("ViT-B-16")
    m = VPT(bb, ["a", "b", "c"], "imagenet", VPTConfig())
    assert m.num_trainable() == 8 * 768 * 12
    assert VPT.xavier_bound(bb) == pytest.approx(math.sqrt(6 / (3 * 256 + 768)))
    assert VPT(bb, ["a"], "imagenet", VPTConfig(deep=False)).num_trainable() == 8 * 768


@pytest.mark.parametrize(
    "name, protocol, shots, n_methods",
    [("base2novel", "base2novel", [16], 8), ("fewshot", "fewshot", [1, 2, 4, 8, 16], 10)],
)
def test_all_method_sweeps_plan_with_valid_defaults(name, protocol, shots, n_methods):
    """search_spaces/{base2novel,fewshot}.yaml: every registered method supporting the protocol, 11 datasets,
    ViT-B-16 openai, seeds 1-3; each cell's defaults + spec overrides build the method's Config and TrainConfig."""
    from pathlib import Path

    from methods.base import TrainConfig
    from methods.defaults import resolve
    from methods.registry import get_method, method_names
    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / f"{name}.yaml")
    supporting = {m for m in method_names() if protocol in get_method(m).protocols}
    assert set(spec.methods) == supporting and len(spec.methods) == n_methods
    assert spec.protocol == [protocol] and spec.shots == shots and spec.seeds == [1, 2, 3]
    assert (spec.backbone.arch, spec.backbone.pretrained) == ("ViT-B-16", "openai") and len(spec.datasets) == 11
    p = plan(spec)
    assert len(p.cells) == n_methods * 11 * len(shots)
    for cell in p.cells:
        cls = get_method(cell.method)
        train, meth = resolve(cell.method, cell.dataset, cell.shots, cell.protocol)
        merged = {**train, **meth, **spec.train_overrides(cell.method, cell.dataset)}
        TrainConfig(**{k: v for k, v in merged.items() if k in TrainConfig.model_fields})
        cls.Config(**{k: v for k, v in merged.items() if k not in TrainConfig.model_fields})
