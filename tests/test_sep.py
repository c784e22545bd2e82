"""SEP: shapes, token fusion placement, batch (in)dependence per attention axis / top-K scope, gradients,
frozen backbone, loss falls, prototype init, checkpoints, class switch, config rules, ViT-B-16 sizes."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from methods.defaults import resolve
from methods.sep import LAYER_PRESETS, SEP, SEPConfig
from methods.token_fusion import TokenFusion, select_top_energy
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


@pytest.fixture(scope="module")
def batch(digits):
    return next(iter(digits[1]))


def _make(bb, classnames, **kw):
    torch.manual_seed(0)
    return SEP(bb, classnames, "digits", SEPConfig(**kw))


def _perturb(m: SEP) -> SEP:
    """Move the fusion modules away from their init so fusion changes outputs noticeably."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def test_shapes_layers_and_frozen_template(tiny_backbone, digits, batch):
    classnames, _ = digits
    images, _ = batch
    m = _make(tiny_backbone, classnames)
    assert m.text_layers == m.visual_layers == (1, 2)  # preset 0 = {1..11}, clipped to 3 blocks
    assert len(m.text_fusion) == len(m.visual_fusion) == 2
    m.eval()
    with torch.no_grad():
        logits = m(images)
        f_hat, g_hat, f0 = m.fused_features(images)
    assert logits.shape == (len(images), len(classnames))
    assert f_hat.shape == f0.shape == (len(images), tiny_backbone.embed_dim)
    assert g_hat.shape == (len(classnames), tiny_backbone.embed_dim)
    assert torch.allclose(logits, m.logit_scale() * f_hat @ g_hat.t(), atol=1e-5)
    # f0 is CLIP's own prompt-free feature; the template features are the dataset's SEP template
    assert torch.allclose(f0, tiny_backbone.encode_image(images, normalize=True).float(), atol=1e-5)
    from fewshot.templates import template

    ref = tiny_backbone.template_text_features(classnames, [template("digits", "sep")])
    assert torch.allclose(m.template_features, ref)
    assert "template_features" not in m.state_dict()


def test_token_fusion_init_and_formula():
    torch.manual_seed(0)
    t = TokenFusion(64, hidden=16, axis="sample")
    assert float(t.s1.detach()) == float(t.s2.detach()) == 0.75
    assert not any(m.bias is not None for m in t.mlp if isinstance(m, torch.nn.Linear))
    assert sum(p.numel() for p in t.parameters()) == TokenFusion.param_count(64, 16)
    R, P = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    att = t.attn(t.ln_a(P), t.ln_a(R), t.ln_a(R))[0]
    z1 = 0.75 * R + 0.25 * att
    mlp = t.mlp[2](t.mlp[0](t.ln_b(z1)) * torch.sigmoid(1.702 * t.mlp[0](t.ln_b(z1))))
    assert torch.allclose(t(R, P), 0.75 * z1 + 0.25 * mlp, atol=1e-5)
    # K != M: the residual base is the prompt
    R5 = torch.randn(2, 5, 64)
    att = t.attn(t.ln_a(P), t.ln_a(R5), t.ln_a(R5))[0]
    z1 = 0.75 * P + 0.25 * att
    out = t(R5, P)
    assert out.shape == P.shape
    h = t.mlp[0](t.ln_b(z1))
    assert torch.allclose(out, 0.75 * z1 + 0.25 * t.mlp[2](h * torch.sigmoid(1.702 * h)), atol=1e-5)


def test_fused_layer_modules_start_as_copies_of_one_seeded_module(tiny_backbone, digits, batch):
    """The reference's _get_clones: per branch one TFM is drawn and each fused layer gets a copy; trained apart."""
    names = digits[0]
    a, b = _make(tiny_backbone, names, fusion_layers=[0, 1, 2]), _make(tiny_backbone, names, fusion_layers=[0, 1, 2])
    torch.manual_seed(1)
    c = SEP(tiny_backbone, names, "digits", SEPConfig(fusion_layers=[0, 1, 2]))
    for branch in ("text_fusion", "visual_fusion"):
        first = getattr(a, branch)[0].state_dict()
        assert len(getattr(a, branch)) == 3
        for module in getattr(a, branch)[1:]:
            for k, v in module.state_dict().items():
                assert torch.equal(v, first[k]) and v.data_ptr() != first[k].data_ptr(), (branch, k)
        # seeded: the same trial seed draws the same module, another seed another one
        assert torch.equal(getattr(b, branch)[2].attn.in_proj_weight, first["attn.in_proj_weight"])
        assert not torch.equal(getattr(c, branch)[0].attn.in_proj_weight, first["attn.in_proj_weight"])
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    one_step_gradients(a, *batch)
    opt.step()
    assert not torch.equal(a.visual_fusion[1].attn.in_proj_weight, a.visual_fusion[2].attn.in_proj_weight)


def test_batch_axis_attention_slot_j_attends_over_all_samples():
    """Reference quirk: output of (sample n, slot j) depends on slot j of the other samples, not other slots."""
    torch.manual_seed(0)
    t = TokenFusion(64, hidden=16, axis="batch")
    R, P = torch.randn(4, 3, 64), torch.randn(4, 3, 64)
    base = t(R, P)
    R2 = R.clone()
    R2[1, 2] = torch.randn(64) * 3  # change slot 2 of sample 1
    out = t(R2, P)
    assert (out[0, 2] - base[0, 2]).abs().max() > 1e-3  # sample 0, slot 2 sees it
    assert torch.allclose(out[0, :2], base[0, :2], atol=1e-6)  # other slots do not
    with pytest.raises(ValueError, match="K == M"):
        t(torch.randn(4, 2, 64), P)


def test_energy_top_k_batch_mean_vs_per_sample():
    x = torch.zeros(2, 5, 4)
    x[0, 1] = 3.0
    x[0, 2] = 1.0
    x[1, 3] = 2.0
    x[1, 4] = 2.5
    per = select_top_energy(x, 1, "per_sample")
    assert torch.equal(per[0, 0], x[0, 1]) and torch.equal(per[1, 0], x[1, 4])
    shared = select_top_energy(x, 2, "batch_mean")  # mean energies: 4.5, 0.5, 2, 3.125 -> idx 1, 4
    assert torch.equal(shared, x[:, [1, 4]])


def test_fusion_runs_where_configured(tiny_backbone, digits, batch):
    """Hooks rewrite exactly the prompt positions at fused layers; the sequence length is kept."""
    classnames, _ = digits
    images, _ = batch
    m = _perturb(_make(tiny_backbone, classnames, fusion_layers=[2], n_ctx_text=3, n_ctx_visual=2))
    assert m.text_layers == m.visual_layers == (2,)
    x = torch.randn(len(classnames), tiny_backbone.context_length, tiny_backbone.text_width)
    assert torch.equal(m._text_hook(1, x), x)
    y = m._text_hook(2, x)
    assert y.shape == x.shape
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[:, 4:], x[:, 4:])
    assert not torch.allclose(y[:, 1:4], x[:, 1:4])
    v = torch.randn(3, 17 + 2, tiny_backbone.vision_width)
    w = m._visual_hook(2, v)
    assert torch.equal(w[:, :17], v[:, :17]) and not torch.allclose(w[:, 17:], v[:, 17:])
    # fusion at layer 2 changes the logits compared with the same prompts and no fusion hook effect
    with torch.no_grad():
        fused = m(images)
        m.text_layers, m.visual_layers = (), ()
        plain = m(images)
    assert (fused - plain).abs().max() > 1e-3


def _alone_vs_batch(m: SEP, images: torch.Tensor) -> float:
    m.eval()
    with torch.no_grad():
        together = m(images)
        alone = torch.cat([m(images[i : i + 1]) for i in range(len(images))])
    return float((together - alone).abs().max())


def test_sample_axis_with_per_sample_top_k_is_batch_independent(tiny_backbone, digits, batch):
    classnames, _ = digits
    images, _ = batch
    m = _perturb(_make(tiny_backbone, classnames, tfm_attention_axis="sample", topk_scope="per_sample"))
    assert _alone_vs_batch(m, images) < 1e-4
    # decoupled K (residual base = prompt) keeps that property
    k = _perturb(
        _make(
            tiny_backbone,
            classnames,
            tfm_attention_axis="sample",
            topk_scope="per_sample",
            selected_text=2,
            selected_visual=7,
        )
    )
    assert _alone_vs_batch(k, images) < 1e-4


def test_batch_axis_and_batch_mean_depend_on_the_batch(tiny_backbone, digits, batch):
    classnames, _ = digits
    images, _ = batch
    repo = _perturb(_make(tiny_backbone, classnames))  # batch axis + batch_mean top-K
    assert _alone_vs_batch(repo, images) > 1e-3
    # permuting the batch permutes the logits (the mixing is permutation-equivariant)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(repo(images)[perm], repo(images[perm]), atol=1e-4)
    mean_only = _perturb(
        _make(tiny_backbone, classnames, tfm_attention_axis="sample", topk_scope="batch_mean", selected_visual=8)
    )
    assert _alone_vs_batch(mean_only, images) > 1e-4


def test_only_own_parameters_get_gradients_backbone_untouched(tiny_backbone, digits, batch):
    classnames, _ = digits
    images, labels = batch
    snap = backbone_snapshot(tiny_backbone)
    m = _make(tiny_backbone, classnames)
    m.prepare(digits[1])
    grads = one_step_gradients(m, images, labels)
    assert grads and all(grads.values()), [n for n, g in grads.items() if not g]
    own = {n for n, _ in m.named_parameters()}
    assert {"ctx_text", "ctx_visual", "prototypes"} <= own
    assert all(n.split(".")[0] in {"ctx_text", "ctx_visual", "prototypes", "text_fusion", "visual_fusion"} for n in own)
    assert_backbone_untouched(tiny_backbone, snap)


def test_prepare_sets_prototypes_to_class_means(tiny_backbone, digits):
    classnames, loader = digits
    m = _make(tiny_backbone, classnames)
    assert float(m.prototypes.detach().abs().sum()) == 0
    m.prepare(loader)
    feats, labels = [], []
    for x, y in loader:
        feats.append(F.normalize(tiny_backbone.encode_image(x, normalize=True).float(), dim=-1))
        labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
    for c in range(len(classnames)):
        want = F.normalize(feats[labels == c].mean(0), dim=-1)
        assert torch.allclose(m.prototypes[c], want, atol=1e-5)


def _loss_components(m: SEP, loader) -> dict[str, float]:
    m.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for x, y in loader:
            for k, v in m.training_loss(x, y)[1].items():
                out[k] = out.get(k, 0.0) + v * len(y)
    return out


def test_loss_falls_and_checkpoint_roundtrip(tiny_backbone, batch):
    classnames, loader = digits_data(tiny_backbone, shots=4, batch_size=8)  # own loader: deterministic order
    images, _ = batch
    m = _make(tiny_backbone, classnames)
    m.prepare(loader)
    before = _loss_components(m, loader)
    losses = train_losses(m, loader, epochs=4, lr=5e-3)
    after = _loss_components(m, loader)
    assert losses[-1] < losses[0] * 0.95, losses
    assert after["ce"] < before["ce"] and after["prototype_ce"] < before["prototype_ce"], (before, after)
    assert after["text_consistency"] < before["text_consistency"], (before, after)
    checkpoint_roundtrip(lambda: _make(tiny_backbone, classnames), m, images)


def test_set_classnames_rebuilds_text_and_templates_keeps_prototypes(tiny_backbone, digits, batch):
    classnames, _ = digits
    images, labels = batch
    m = _make(tiny_backbone, classnames)
    mu = m.prototypes.detach().clone()
    novel = classnames[:4]
    m.set_classnames(novel)
    m.eval()
    with torch.no_grad():
        assert m(images).shape == (len(images), 4)
    assert m.template_features.shape[0] == 4 and m.text.n_classes == 4
    assert torch.equal(m.prototypes, mu)
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match="prototype head"):
        m.training_loss(images, labels)


def test_config_rules_and_layer_clipping(tiny_backbone):
    assert SEPConfig().layer_set() == tuple(range(1, 12))
    assert SEPConfig(fusion_depth=8).layer_set() == LAYER_PRESETS[1]
    assert SEPConfig(fusion_preset=7).layer_set() == (4, 8)
    assert SEPConfig(fusion_layers=[6, 2, 2]).layer_set() == (2, 6)
    m = SEP(tiny_backbone, ["one", "two"], "digits", SEPConfig(fusion_layers=[1, 3, 5, 7, 9, 11]))
    assert m.text_layers == m.visual_layers == (1, 2)  # 3 blocks: indices beyond are clipped to the last
    assert m.clip_layers((11,), "vision") == (2,)
    with pytest.raises(ValidationError, match="only one of"):
        SEPConfig(fusion_depth=3, fusion_preset=1)
    with pytest.raises(ValidationError, match="tfm_attention_axis: sample"):
        SEPConfig(selected_visual=8)
    with pytest.raises(ValidationError):
        SEPConfig(unknown_key=1)


def test_defaults_yaml():
    train, meth = resolve("sep", "caltech101", 16, "base2novel")
    assert (train["optimizer"], train["lr"], train["eps"], train["weight_decay"]) == ("adam", 0.0025, 0.001, 0.0005)
    assert (train["epochs"], train["batch_size"], train["eval_batch_size"]) == (50, 32, 500)
    assert (train["warmup_epochs"], train["warmup_type"], train["warmup_lr"]) == (1, "constant", 1e-5)
    assert resolve("sep", "sun397", 16, "base2novel")[0]["epochs"] == 10
    assert resolve("sep", "imagenet", 16, "fewshot")[0]["batch_size"] == 128
    xd = resolve("sep", "imagenet", 16, "cross_dataset")[0]
    assert (xd["epochs"], xd["batch_size"]) == (3, 32)
    cfg = SEPConfig(**meth)
    assert (cfg.n_ctx_text, cfg.n_ctx_visual, cfg.text_consistency_weight, cfg.visual_consistency_weight) == (
        6,
        4,
        8,
        6,
    )
    from methods.base import TrainConfig

    TrainConfig(**train)


def test_sizes_on_vit_b16():
    """TFMs exist only for the fused layers (two LNs each): 44,814,380 + 512·C on ViT-B/16, layers 1..11.

    (The reference's count is 52,994,612 + 512·C: 13 modules per branch with an extra unused LN.)"""
    from methods.backbone import load_backbone

    bb = load_backbone("ViT-B-16")
    C = 7
    m = SEP(bb, [f"class {i}" for i in range(C)], "imagenet", SEPConfig())
    assert m.text_layers == m.visual_layers == tuple(range(1, 12))
    t = 4 * 512**2 + 8 * 512 + 2 * 512 * 256 + 2
    v = 4 * 768**2 + 8 * 768 + 2 * 768 * 256 + 2
    assert (t, v) == (1_314_818, 2_758_658)
    assert m.num_trainable() == 6 * 512 + 4 * 768 + 11 * (t + v) + 512 * C == 44_814_380 + 512 * C
    assert SEP.expected_trainable(6, 4, 11, 11, 512, 768, 512, C) == m.num_trainable()
    assert sum(m.param_breakdown().values()) == m.num_trainable()
    assert m.text_fusion[0].attn.num_heads == 8 and m.visual_fusion[0].attn.num_heads == 12
    # reference (13 modules/branch, 3 LNs each) for comparison
    assert 13 * (t + 2 * 512 + v + 2 * 768) + 6 * 512 + 4 * 768 == 52_994_612


def test_search_space_plans_with_reference_defaults_first(tiny_backbone):
    import itertools
    from pathlib import Path

    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "sep.yaml")
    p = plan(spec)
    assert spec.protocol in ("base2novel", ["base2novel"]) and len(p.cells) == 11
    assert spec.seeds == [1, 2, 3] and spec.shots == [16]
    assert (spec.backbone.arch, spec.backbone.pretrained) == ("ViT-B-16", "openai")
    for cell in p.cells:
        assert cell.defaults_in_space() == {
            "n_ctx_text": 6,
            "n_ctx_visual": 4,
            "fusion_preset": 0,
            "tfm_attention_axis": "batch",
        }
    # every corner of the space is a valid configuration that builds on a real (tiny) backbone
    space = p.cells[0].space
    _, meth = resolve("sep", "dtd", 16, "base2novel")
    for m_t, m_v, k in itertools.product(
        space["n_ctx_text"].choices[::4], space["n_ctx_visual"].choices[::3], space["selected_visual"].choices[::3]
    ):
        for axis in space["tfm_attention_axis"].choices:
            extra = {"selected_text": k, "selected_visual": k} if axis == "sample" else {}
            cfg = SEPConfig(**{**meth, "n_ctx_text": m_t, "n_ctx_visual": m_v, "tfm_attention_axis": axis, **extra})
            SEP(tiny_backbone, ["a", "b"], "dtd", cfg)


def test_eval_text_features_are_reused_until_a_text_tensor_changes(tiny_backbone, digits, batch):
    classnames, _ = digits
    images, labels = batch
    m = _make(tiny_backbone, classnames)
    m.eval()
    calls = []
    orig = m.text_features
    m.text_features = lambda: calls.append(1) or orig()
    with torch.no_grad():
        a = m(images[:4])
        m(images[4:])
        assert len(calls) == 1  # one text pass for several eval batches
        m.text_fusion[0].s1.add_(0.1)  # an in-place update (as an optimizer step)
        b = m(images[:4])
    assert len(calls) == 2 and (a - b).abs().max() > 1e-6
    # training (grad enabled) always recomputes
    m.train()
    m.training_loss(images, labels)
    m.training_loss(images, labels)
    assert len(calls) == 4
    m.set_classnames(classnames[:3])
    with torch.no_grad():
        assert m(images).shape == (len(images), 3)


def test_runs_in_the_trial_via_the_contract_and_bad_config_is_a_user_error(tiny_backbone, tmp_path):
    from fewshot.errors import UserError
    from orchestrator.trial import TrialRequest, run_trial

    over = {"epochs": 2, "batch_size": 8, "eval_batch_size": 64}
    out = run_trial(
        TrialRequest(method="sep", dataset="digits", shots=2, protocol="base2novel", device="cpu", overrides=over),
        output_dir=tmp_path,
    )
    assert out["epochs_run"] == 2 and {"base_acc", "novel_acc", "hm"} <= set(out)
    with pytest.raises(UserError, match="selected_visual"):
        run_trial(
            TrialRequest(
                method="sep", dataset="digits", shots=2, device="cpu", overrides={**over, "selected_visual": 8}
            ),
            output_dir=tmp_path / "bad",
        )


def test_unknown_dataset_template_is_a_config_error_at_build(tiny_backbone):
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match="no templates for dataset"):
        SEP(tiny_backbone, ["a", "b"], "not_a_dataset", SEPConfig())
