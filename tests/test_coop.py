"""CoOp: only the context learns, the backbone stays bit-identical, loss falls, checkpoints, counts."""

from __future__ import annotations

import pytest
import torch
from method_harness import (
    assert_backbone_untouched,
    backbone_snapshot,
    checkpoint_roundtrip,
    digits_data,
    one_step_gradients,
    train_losses,
)

from methods.base import TrainConfig
from methods.coop import CoOp
from methods.defaults import resolve


def _coop(bb, names, **kw):
    torch.manual_seed(0)
    return CoOp(bb, names, "digits", CoOp.Config(**kw))


def test_one_step_touches_only_the_context(tiny_backbone):
    names, loader = digits_data(tiny_backbone, shots=2)
    m = _coop(tiny_backbone, names, n_ctx=4)
    snap = backbone_snapshot(tiny_backbone)
    images, labels = next(iter(loader))
    grads = one_step_gradients(m, images, labels)
    assert grads == {"ctx": True}
    torch.optim.SGD(m.param_groups(TrainConfig()), lr=0.1).step()
    assert_backbone_untouched(tiny_backbone, snap)
    assert list(m.state_dict()) == ["ctx"]


def test_loss_falls_on_digits(tiny_backbone):
    names, loader = digits_data(tiny_backbone, shots=4, batch_size=8)
    m = _coop(tiny_backbone, names, n_ctx=4)
    losses = train_losses(m, loader, epochs=6, lr=5e-2)
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_ctx=4, ctx_init="a photo of a", class_token_position="middle"),
        dict(n_ctx=2, csc=True, class_token_position="front"),
    ],
)
def test_checkpoint_roundtrip(tiny_backbone, kw):
    names, loader = digits_data(tiny_backbone, shots=1)
    m = _coop(tiny_backbone, names, **kw)
    with torch.no_grad():
        m.ctx.add_(torch.randn_like(m.ctx) * 0.1)
    images, _ = next(iter(loader))
    checkpoint_roundtrip(lambda: _coop(tiny_backbone, names, **kw), m, images)


def test_csc_shapes_and_novel_classes(tiny_backbone):
    names, loader = digits_data(tiny_backbone, shots=1)
    m = _coop(tiny_backbone, names, n_ctx=3, csc=True)
    assert m.ctx.shape == (len(names), 3, tiny_backbone.text_width)
    images, _ = next(iter(loader))
    m.set_classnames(["apple", "pear"])  # unseen classes: mean class-specific context
    with torch.no_grad():
        assert m(images).shape == (len(images), 2)


def test_defaults_follow_the_published_recipe():
    assert resolve("coop", "dtd", 1, "fewshot")[0]["epochs"] == 50
    assert resolve("coop", "dtd", 4, "fewshot")[0]["epochs"] == 100
    train, meth = resolve("coop", "dtd", 16, "fewshot")
    assert train["epochs"] == 200 and train["lr"] == 0.002 and train["batch_size"] == 32 and meth["n_ctx"] == 16
    assert resolve("coop", "imagenet", 16, "fewshot")[0]["epochs"] == 50
    assert resolve("coop", "dtd", 16, "base2novel")[1] == {
        "n_ctx": 4,
        "ctx_init": "a photo of a",
        "class_token_position": "end",
        "csc": False,
    }
    CoOp.Config(**resolve("coop", "dtd", 16, "base2novel")[1])


def test_vit_b16_counts():
    from methods.backbone import load_backbone

    bb = load_backbone("ViT-B-16")
    m = CoOp(bb, [f"c{i}" for i in range(5)], "imagenet", CoOp.Config(n_ctx=4))
    assert m.num_trainable() == 2048 and m.param_breakdown() == {"ctx": 2048}
    assert m.frozen_param_count() == bb.num_params()
    m = CoOp(bb, [f"c{i}" for i in range(5)], "imagenet", CoOp.Config(n_ctx=4, csc=True))
    assert m.num_trainable() == 5 * 2048


def test_offline_datasets_crop_no_smaller_than_half_the_image_for_every_method():
    """methods/defaults/_datasets.yaml: the dataset-wide layer (a pattern matches shapes-<N>), under each
    method's own file; natural-image datasets keep CoOp's (0.08, 1) — TrainConfig's default."""
    from methods.registry import method_names

    for method in method_names():
        for dataset in ("digits", "shapes", "shapes-32", "shapes-64"):
            assert resolve(method, dataset, 4, "fewshot")[0]["crop_scale"] == [0.5, 1.0], (method, dataset)
        assert "crop_scale" not in resolve(method, "dtd", 4, "fewshot")[0]
        assert "crop_scale" not in resolve(method, "shapes_extra", 4, "fewshot")[0]  # a pattern, not a prefix
    assert TrainConfig().crop_scale == (0.08, 1.0)
    assert resolve("coop", "shapes-32", 1, "fewshot")[0]["epochs"] == 50  # the method's own overrides still apply


@pytest.mark.parametrize("bad", [(0.0, 1.0), (0.6, 0.5), (0.5, 1.5)])
def test_crop_scale_outside_the_unit_range_is_refused(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="crop_scale must be"):
        TrainConfig(crop_scale=bad)
