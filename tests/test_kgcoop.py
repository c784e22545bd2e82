"""KgCoOp: CoOp + lambda·(1 - mean cos(w_c, w_c^clip)); lambda=0 is CoOp; gradients, training, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from methods.coop import CoOp
from methods.kgcoop import KgCoOp, KgCoOpConfig
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
    return digits_data(tiny_backbone, shots=2, batch_size=8)


def _make(bb, classnames, **kw):
    torch.manual_seed(0)
    return KgCoOp(bb, classnames, "digits", KgCoOpConfig(**kw))


def test_only_context_gets_gradients_backbone_untouched(tiny_backbone, digits):
    classnames, loader = digits
    snap = backbone_snapshot(tiny_backbone)
    m = _make(tiny_backbone, classnames)
    images, labels = next(iter(loader))
    grads = one_step_gradients(m, images, labels)
    assert grads and all(grads.values()), grads
    assert m.num_trainable() == m.cfg.n_ctx * tiny_backbone.text_width
    assert_backbone_untouched(tiny_backbone, snap)


def test_lambda_zero_equals_coop(tiny_backbone, digits):
    classnames, loader = digits
    images, labels = next(iter(loader))
    kg = _make(tiny_backbone, classnames, kg_weight=0.0)
    fields = set(CoOp.Config.model_fields)
    coop = CoOp(tiny_backbone, classnames, "digits", CoOp.Config(**kg.cfg.model_dump(include=fields)))
    coop.load_trainable_state_dict(kg.trainable_state_dict())
    kg.train(), coop.train()
    loss_kg, parts = kg.training_loss(images, labels)
    loss_coop, _ = coop.training_loss(images, labels)
    assert torch.allclose(kg(images), coop(images), atol=1e-6)
    assert torch.allclose(loss_kg, loss_coop, atol=1e-6)
    loss_kg.backward(), loss_coop.backward()
    for (n1, p1), (n2, p2) in zip(kg.named_parameters(), coop.named_parameters()):
        assert n1 == n2 and torch.allclose(p1.grad, p2.grad, atol=1e-6)
    assert "kg" in parts  # the knowledge-guidance term is still reported


def test_kg_term_matches_its_definition(tiny_backbone, digits):
    from fewshot.templates import template

    classnames, loader = digits
    images, labels = next(iter(loader))
    m = _make(tiny_backbone, classnames, kg_weight=8.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # move away from the "a photo of a" init
        loss, parts = m.training_loss(images, labels)
        clip_text = tiny_backbone.template_text_features(classnames, [template("digits", "kgcoop")])
        w = m.text_features()
        want_kg = 1.0 - F.cosine_similarity(F.normalize(w, dim=-1), clip_text, dim=-1).mean()
        ce = F.cross_entropy(m(images), labels)
    assert parts["kg"] == pytest.approx(float(want_kg), abs=1e-5) and float(want_kg) > 1e-4
    assert float(loss) == pytest.approx(float(ce + 8.0 * want_kg), abs=1e-4)


def test_loss_falls_and_checkpoint_roundtrip(tiny_backbone, digits):
    # one image of each of 5 digit classes: on the random tiny backbone (a fresh draw per test process)
    # that is what text-side prompts can fit reliably in a few seconds
    classnames, _ = digits
    _, one = digits_data(tiny_backbone, shots=1, batch_size=10)
    images, labels = next(iter(one))
    keep = labels < 5
    batch = [(images[keep], labels[keep])]
    m = _make(tiny_backbone, classnames[:5], kg_weight=1.0)
    losses = train_losses(m, batch, epochs=150, lr=0.05)
    # KgCoOp learns the shared context only (plus the guidance term), so only a clear fall is required
    assert min(losses[-5:]) < losses[0] - 0.1, losses[::10]
    images = images[keep]
    checkpoint_roundtrip(lambda: _make(tiny_backbone, classnames[:5], kg_weight=1.0), m, images)
    m.set_classnames(classnames[:4])
    assert m(images).shape == (len(images), 4)
    assert m.training_loss(images[:2], torch.tensor([0, 1]))[0].isfinite()


def test_sizes_on_vit_b16():
    from methods.backbone import load_backbone

    bb = load_backbone("ViT-B-16")
    assert KgCoOp(bb, ["cat", "dog"], "imagenet", KgCoOpConfig()).num_trainable() == 4 * 512
    assert math.isclose(KgCoOpConfig().kg_weight, 8.0)
