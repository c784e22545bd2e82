"""Linear probe: closed-form fit, CoOp's C search, checkpoint round-trip, beats zero-shot on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fewshot.errors import ConfigError
from methods.base import cosine_logits
from methods.linear_probe import LinearProbe, LinearProbeConfig
from tests.method_harness import assert_backbone_untouched, backbone_snapshot, checkpoint_roundtrip


def _loader(bb, items, batch_size=64):
    from fewshot.images import ImageDataset
    from fewshot.transforms import clip_transform

    return DataLoader(
        ImageDataset(items, clip_transform(bb.image_size, train=False)), batch_size=batch_size, shuffle=False
    )


@pytest.fixture(scope="module")
def digits16(tiny_backbone):
    from fewshot.registry import load_dataset
    from fewshot.sampling import fewshot_split

    ds = load_dataset("digits")
    split = fewshot_split(ds, 16, 1)
    return ds, _loader(tiny_backbone, split.train), _loader(tiny_backbone, split.val), _loader(tiny_backbone, ds.test)


@pytest.fixture(scope="module")
def fitted(tiny_backbone, digits16):
    ds, train, val, _ = digits16
    snap = backbone_snapshot(tiny_backbone)
    m = LinearProbe(tiny_backbone, ds.classnames, "digits", LinearProbeConfig())
    info = m.fit(train, val)
    return m, info, snap


def _accuracy(logits_fn, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((logits_fn(images).argmax(-1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total


def test_fit_searches_c_like_coop_and_leaves_backbone_untouched(tiny_backbone, fitted):
    m, info, snap = fitted
    assert_backbone_untouched(tiny_backbone, snap)
    assert not LinearProbe.trains_by_gradient and LinearProbe.frozen_image_features
    assert LinearProbe.protocols == ("fewshot",)
    # 7 grid points + 2 bracket ends + 8 refinement steps
    assert info["c_evaluations"] == 17 and len(m.search_log) == 17
    assert [c for c, _ in m.search_log[:7]] == [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    grid_best = max(m.search_log[:7], key=lambda t: t[1])[0]
    first_best = [c for c, a in m.search_log[:7] if a == max(a2 for _, a2 in m.search_log[:7])][0]
    assert grid_best == first_best
    assert grid_best / 10 * (1 - 1e-9) <= info["c"] <= grid_best * 10 * (1 + 1e-9)
    assert float(m.c_value) == pytest.approx(info["c"])
    # refinement points lie strictly inside the bracket, each the log-midpoint of the current ends
    for c, _ in m.search_log[9:]:
        assert grid_best / 10 < c < grid_best * 10


def test_forward_equals_sklearn_decision_function(tiny_backbone, digits16, fitted):
    from sklearn.linear_model import LogisticRegression

    m, info, _ = fitted
    _, train, _, test = digits16
    xs, ys = zip(*[(tiny_backbone.encode_image(i).numpy().astype(np.float64), y.numpy()) for i, y in train])
    clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=info["c"]).fit(np.concatenate(xs), np.concatenate(ys))
    images, _ = next(iter(test))
    want = clf.decision_function(tiny_backbone.encode_image(images).numpy().astype(np.float64))
    got = m(images)
    assert isinstance(got, torch.Tensor) and got.shape == (len(images), 10)
    assert np.allclose(got.numpy(), want, atol=1e-3)


def test_checkpoint_roundtrip_restores_classifier(tiny_backbone, digits16, fitted):
    m, _, _ = fitted
    ds, *_ = digits16
    assert {"weight", "bias", "c_value"} <= set(m.trainable_state_dict())
    assert m.num_trainable() == 10 * tiny_backbone.embed_dim + 10 and list(m.parameters()) == []
    images, _ = next(iter(digits16[3]))
    fresh = lambda: LinearProbe(tiny_backbone, ds.classnames, "digits", LinearProbeConfig())  # noqa: E731
    assert not torch.allclose(fresh()(images), m(images))
    checkpoint_roundtrip(fresh, m, images)


def test_linear_probe_beats_zero_shot_on_digits(tiny_backbone, digits16, fitted):
    m, _, _ = fitted
    ds, *_, test = digits16
    from fewshot.templates import template

    text = tiny_backbone.template_text_features(ds.classnames, [template("digits")])
    zs = _accuracy(lambda im: cosine_logits(tiny_backbone.encode_image(im), text, tiny_backbone.logit_scale), test)
    lp = _accuracy(m, test)
    assert lp > zs + 10.0, (lp, zs)


def test_fixed_c_skips_search_and_missing_val_is_an_error(tiny_backbone, digits16):
    ds, train, _, _ = digits16
    m = LinearProbe(tiny_backbone, ds.classnames, "digits", LinearProbeConfig(c=0.5))
    assert m.fit(train, None)["c"] == 0.5 and m.search_log == []
    m2 = LinearProbe(tiny_backbone, ds.classnames, "digits", LinearProbeConfig())
    with pytest.raises(ConfigError, match="validation"):
        m2.fit(train, None)
    with pytest.raises(ConfigError, match="fewshot"):
        m2.set_classnames(["a", "b"])
