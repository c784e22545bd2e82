"""CoCoOp: meta-net conditioned context; batched == per-image; gradients, training, checkpoints, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from methods.cocoop import CoCoOp, CoCoOpConfig
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
    return digits_data(tiny_backbone, shots=2, batch_size=4)


def _make(bb, classnames, **kw):
    # meta-net hidden width 64 // 4 = 16 on the tiny backbone (the default 64 // 16 = 4 ReLU units can
    # all be dead for a random backbone draw, which would zero the first layer's gradients)
    torch.manual_seed(0)
    kw.setdefault("meta_reduction", 4)
    return CoCoOp(bb, classnames, "digits", CoCoOpConfig(**kw))


def test_only_own_parameters_get_gradients_backbone_untouched(tiny_backbone, digits):
    classnames, loader = digits
    snap = backbone_snapshot(tiny_backbone)
    m = _make(tiny_backbone, classnames)
    images, labels = next(iter(loader))
    grads = one_step_gradients(m, images, labels)
    assert set(grads) == {"ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}
    assert all(grads.values()), grads
    assert_backbone_untouched(tiny_backbone, snap)


def test_batched_equals_one_image_at_a_time(tiny_backbone, digits):
    classnames, loader = digits
    m = _make(tiny_backbone, classnames)
    with torch.no_grad():  # move the meta-net away from its init so per-image shifts differ clearly
        for p in m.meta_net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    images, _ = next(iter(loader))
    m.eval()
    with torch.no_grad():
        batched = m(images)
        m.cfg.images_per_pass = 3
        chunked = m(images)
        m.cfg.batched = False
        single = m(images)
        one_by_one = torch.cat([m(images[i : i + 1]) for i in range(len(images))])
    assert batched.shape == (len(images), len(classnames))
    assert torch.allclose(batched, single, atol=1e-4)
    assert torch.allclose(batched, chunked, atol=1e-4)
    assert torch.allclose(batched, one_by_one, atol=1e-4)
    # the context really is instance-conditioned: image 0's prompts give different logits for image 1
    ctx = m.conditioned_context(tiny_backbone.encode_image(images[:2]))
    assert not torch.allclose(ctx[0], ctx[1])


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


def test_set_classnames_scores_new_classes(tiny_backbone, digits):
    classnames, loader = digits
    m = _make(tiny_backbone, classnames)
    images, _ = next(iter(loader))
    m.set_classnames(classnames[5:])
    assert m(images).shape == (len(images), 5)


def test_sizes_on_vit_b16():
    from methods.backbone import load_backbone

    bb = load_backbone("ViT-B-16")
    m = CoCoOp(bb, ["cat", "dog"], "imagenet", CoCoOpConfig())
    assert m.num_trainable() == 2048 + (512 * 32 + 32) + (32 * 512 + 512) == CoCoOp.expected_trainable(4, 512, 512)
    assert m.meta_net[0].out_features == 32
