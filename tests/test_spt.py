"""SPT: prompt insertion, prototype initialisation (checked against hidden states captured with forward
hooks on the frozen open_clip model), streaming == one-shot statistics, heads, param groups, sizes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fewshot.errors import ConfigError
from methods.base import TrainConfig
from methods.defaults import resolve
from methods.prototypes import Reservoir, StreamingKMeans, pool_windows
from methods.spt import SPT, SPTConfig
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
    names, loader = digits_data(tiny_backbone, shots=2, train=False, batch_size=8)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    return names, images, labels


def make(bb, names, **kw):
    kw.setdefault("n_prompts", 5)
    kw.setdefault("init_seed", 3)
    return SPT(bb, names, "digits", SPTConfig(**kw))


def loader_of(images, batch_size):
    return DataLoader(
        TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=batch_size, shuffle=False
    )


def block_inputs(bb, images) -> list[torch.Tensor]:
    """Input of every visual block of the frozen, prompt-free model, via forward pre-hooks on open_clip's own forward."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(bb.model.visual.transformer.resblocks):

        def pre(mod, args, kwargs, i=i):
            seen.setdefault(i, []).append(args[0].detach().clone())

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            bb.model.encode_image(images)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(seen[i]) for i in range(len(seen))]


def reference_pool(tokens: torch.Tensor, m: int, mode: str) -> torch.Tensor:
    """The reference's window pooling written out directly (valid for 1 < M <= P+1): [S, P, D] -> [S*M, D]."""
    p = tokens.shape[1]
    w = p // (m - 1)
    r = p % w
    pooled = []
    for img in tokens:
        wins = [img[k * w : (k + 1) * w] for k in range(m - 1)] + [img[p - r :] if r else img]
        pooled += [win.mean(0) if mode == "mean" else win.max(0).values for win in wins]
    return torch.stack(pooled)


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("deep", [True, False])
@pytest.mark.parametrize("head", ["linear", "text"])
def test_output_shapes_and_prompt_positions(tiny_backbone, digits, deep, head):
    names, images, _ = digits
    m = make(tiny_backbone, names, deep=deep, head=head, init="xavier")
    x = images[:4]
    assert m(x).shape == (4, len(names))
    assert m.prompts.shape == (tiny_backbone.vision_layers if deep else 1, 5, tiny_backbone.vision_width)
    # what each block sees: CLS, then this layer's prompts (deep) / the propagated prompts (shallow), then patches
    seen = {}
    handles = [
        b.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].detach()))
        for i, b in enumerate(tiny_backbone.model.visual.transformer.resblocks)
    ]
    try:
        with torch.no_grad():
            m(x)
    finally:
        for h in handles:
            h.remove()
    n_patches = (tiny_backbone.image_size // tiny_backbone.visual.conv1.kernel_size[0]) ** 2
    for i, h in seen.items():
        assert h.shape[1] == 1 + 5 + n_patches
        if deep or i == 0:
            assert torch.equal(h[:, 1:6], m.prompts[i].detach().expand(4, -1, -1))
        else:
            assert not torch.allclose(h[:, 1:6], m.prompts[0].detach().expand(4, -1, -1))


# -------------------------------------------------------------------------- gradients, training, ckpt
@pytest.mark.parametrize("head", ["linear", "text"])
def test_only_spt_parameters_get_gradients_and_backbone_is_untouched(tiny_backbone, digits, head):
    names, images, labels = digits
    snap = backbone_snapshot(tiny_backbone)
    m = make(tiny_backbone, names, head=head, init="mean_pool")
    m.prepare(loader_of(images, 8))
    grads = one_step_gradients(m, images[:8], labels[:8])
    expected = {"prompts", "head.weight", "head.bias"} if head == "linear" else {"prompts"}
    assert set(grads) == expected and all(grads.values())
    assert_backbone_untouched(tiny_backbone, snap)


def test_loss_falls_on_digits(tiny_backbone):
    # the random-init tiny CLIP's features differ little between images (the image-dependent part is
    # ~6% of the feature norm), so this takes ~60 full-batch steps at a high lr; the harness uses plain
    # Adam (L2 coupled to the gradient), so the head's AdamW-sized weight decay is switched off here
    names, loader = digits_data(tiny_backbone, shots=4, seed=1, batch_size=40)
    snap = backbone_snapshot(tiny_backbone)
    torch.manual_seed(0)
    m = make(tiny_backbone, names, init="random", head_weight_decay=0.0)
    m.prepare(loader)
    losses = train_losses(m, loader, epochs=60, lr=0.1)
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert_backbone_untouched(tiny_backbone, snap)


@pytest.mark.parametrize("head", ["linear", "text"])
def test_checkpoint_roundtrip(tiny_backbone, digits, head):
    names, images, labels = digits
    m = make(tiny_backbone, names, head=head, init="max_pool")
    m.prepare(loader_of(images, 8))
    with torch.no_grad():
        m.prompts.add_(0.1)
    checkpoint_roundtrip(lambda: make(tiny_backbone, names, head=head, init="xavier"), m, images[:4])
    assert set(m.trainable_state_dict()) == (
        {"prompts", "head.weight", "head.bias"} if head == "linear" else {"prompts"}
    )


# ------------------------------------------------------------------------------- initialisation
def test_pool_windows_follow_the_reference_rule():
    wins = pool_windows(196, 20)  # w = 10, r = 6
    assert len(wins) == 20
    assert wins[0] == list(range(10)) and wins[18] == list(range(180, 190))
    assert wins[19] == list(range(190, 196))
    assert pool_windows(196, 8)[-1] == list(range(196))  # w = 28, r = 0: whole sequence
    assert pool_windows(16, 1) == [list(range(16))]
    assert pool_windows(4, 7)[4] == [0]  # M-1 > P: w = 1, indices wrap modulo P


@pytest.mark.parametrize("init,m_prompts", [("mean_pool", 6), ("max_pool", 6), ("mean_pool", 5), ("max_pool", 5)])
def test_pool_inits_equal_prototypes_from_hooked_hidden_states(tiny_backbone, digits, init, m_prompts):
    names, images, _ = digits
    m = make(tiny_backbone, names, init=init, n_prompts=m_prompts, deep=True)
    m.prepare(loader_of(images, 8))
    assert m.initialised_from == init
    hidden = block_inputs(tiny_backbone, images)
    mode = "mean" if init == "mean_pool" else "max"
    for i, h in enumerate(hidden):
        pooled = reference_pool(h[:, 1:], m_prompts, mode)  # CLS removed
        assert pooled.shape[0] == len(images) * m_prompts
        idx = m.init_prototypes[i].source_index
        assert len(set(idx.tolist())) == m_prompts  # M distinct pooled vectors
        torch.testing.assert_close(m.prompts[i].detach(), pooled[idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deep", [True, False])
def test_random_init_samples_patch_tokens_of_the_prompted_layers(tiny_backbone, digits, deep):
    names, images, _ = digits
    m = make(tiny_backbone, names, init="random", n_prompts=7, deep=deep)
    m.prepare(loader_of(images, 8))
    hidden = block_inputs(tiny_backbone, images)
    for i in range(m.prompts.shape[0]):
        tokens = hidden[i][:, 1:].reshape(-1, tiny_backbone.vision_width)
        idx = m.init_prototypes[i].source_index
        assert len(set(idx.tolist())) == 7
        torch.testing.assert_close(m.prompts[i].detach(), tokens[idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["random", "mean_pool", "max_pool"])
def test_streaming_statistics_equal_one_shot(tiny_backbone, digits, init):
    names, images, _ = digits
    a = make(tiny_backbone, names, init=init)
    a.prepare(loader_of(images, 3))
    b = make(tiny_backbone, names, init=init)
    b.prepare(loader_of(images, len(images)))
    torch.testing.assert_close(a.prompts, b.prompts, rtol=1e-5, atol=1e-5)
    for i in a.init_prototypes:
        assert torch.equal(a.init_prototypes[i].source_index, b.init_prototypes[i].source_index)


@pytest.mark.parametrize("init", ["random", "mean_pool", "max_pool"])
def test_reference_sampling_is_the_references_draw_under_the_seed(tiny_backbone, digits, init):
    """init_sampling: reference = prompt_generator written out: S indices with replacement (randint), then per
    layer argsort(rand) over the rows (tokens image-major; pooled vectors window-major), one generator."""
    from pydantic import ValidationError

    names, images, _ = digits
    m = make(tiny_backbone, names, init=init, init_sampling="reference", init_seed=5, n_prompts=6)
    m.prepare(loader_of(images, 4))
    g = torch.Generator().manual_seed(5)
    index = torch.randint(len(images), (len(images),), generator=g)
    assert len(set(index.tolist())) < len(images)  # with replacement
    d = tiny_backbone.vision_width
    for i, h in enumerate(block_inputs(tiny_backbone, images[index])):
        x = h[:, 1:]  # CLS removed
        if init == "random":
            rows = x.reshape(-1, d)
        else:
            rows = reference_pool(x, 6, init[:-5]).reshape(len(x), 6, d).transpose(0, 1).reshape(-1, d)
        keep = torch.argsort(torch.rand(len(rows), generator=g))[:6]
        torch.testing.assert_close(m.prompts[i].detach(), rows[keep], rtol=1e-5, atol=1e-5)
        assert torch.equal(m.init_prototypes[i].source_index, keep)
    again = make(tiny_backbone, names, init=init, init_sampling="reference", init_seed=5, n_prompts=6)
    again.prepare(loader_of(images, 7))  # the batch size of the forward passes does not matter
    torch.testing.assert_close(again.prompts, m.prompts, rtol=1e-5, atol=1e-5)
    streaming = make(tiny_backbone, names, init=init, init_seed=5, n_prompts=6)
    streaming.prepare(loader_of(images, 4))
    assert not torch.allclose(streaming.prompts, m.prompts)
    with pytest.raises(ValidationError, match="init_sampling: reference covers init random"):
        SPTConfig(init="kmeans", init_sampling="reference")
    with pytest.raises(ConfigError, match="indexable dataset"):
        make(tiny_backbone, names, init=init, init_sampling="reference").prepare([(images, None)])


def test_reservoir_is_batch_invariant_and_roughly_uniform():
    items = torch.arange(40, dtype=torch.float32).unsqueeze(1)
    whole = Reservoir(5, seed=11)
    whole.update(items)
    cut = Reservoir(5, seed=11)
    for lo, hi in [(0, 3), (3, 4), (4, 17), (17, 40)]:
        cut.update(items[lo:hi])
    assert torch.equal(whole.result().source_index, cut.result().source_index)
    counts = torch.zeros(40)
    for seed in range(400):
        r = Reservoir(5, seed)
        r.update(items)
        counts[r.result().source_index] += 1
    # each item is kept with probability 5/40: 50 expected of 400 draws, binomial sd ~6.6
    assert counts.min() > 25 and counts.max() < 80, counts


def test_streaming_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = (centres.repeat_interleave(200, 0) + 0.3 * torch.randn(600, 2, generator=g))[torch.randperm(600, generator=g)]
    km = StreamingKMeans(3, seed=1)
    for lo in range(0, 600, 50):
        km.update(pts[lo : lo + 50].unsqueeze(0))
    found = km.result().vectors
    dist = torch.cdist(centres, found)
    assert dist.min(1).values.max() < 0.5, found


def test_kmeans_init_on_the_model_and_seed_from_torch_rng(tiny_backbone, digits):
    names, images, _ = digits
    m = make(tiny_backbone, names, init="kmeans", deep=False)
    m.prepare(loader_of(images, 8))
    tokens = block_inputs(tiny_backbone, images)[0][:, 1:].reshape(-1, tiny_backbone.vision_width)
    assert m.initialised_from == "kmeans"
    # each centre lies inside the token cloud: closer to the tokens than the cloud's spread
    assert torch.cdist(m.prompts[0].detach(), tokens).min(1).values.max() < tokens.std(0).norm()

    def init_with(torch_seed):
        torch.manual_seed(torch_seed)
        s = make(tiny_backbone, names, init="random", init_seed=None)
        s.prepare(loader_of(images, 8))
        return s.prompts.detach().clone()

    assert torch.equal(init_with(1), init_with(1))
    assert not torch.equal(init_with(1), init_with(2))


def test_xavier_init_bounds_and_vitb16_sizes():
    from methods.backbone import load_backbone

    vb = load_backbone("ViT-B-16")
    c = 37
    deep = SPT(vb, [f"c{i}" for i in range(c)], "oxford_pets", SPTConfig(init="xavier"))
    assert SPT.xavier_bound(vb) == pytest.approx(0.0625, abs=1e-4)
    assert deep.prompts.abs().max() <= SPT.xavier_bound(vb)
    assert deep.param_breakdown() == {"prompts": 184_320, "head": (vb.embed_dim + 1) * c}
    assert deep.num_trainable() == 184_320 + 513 * c
    shallow = SPT(vb, [f"c{i}" for i in range(c)], "oxford_pets", SPTConfig(deep=False, n_prompts=100, head="text"))
    assert shallow.num_trainable() == 76_800


# ------------------------------------------------------------------------- heads, groups, defaults
def test_param_groups_weight_decays(tiny_backbone, digits):
    names, _, _ = digits
    m = make(tiny_backbone, names, head_weight_decay=0.5)
    groups = m.param_groups(TrainConfig(optimizer="adamw", weight_decay=0.01))
    wd = {g["name"]: (g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in groups}
    assert wd["prompts"][0] == 0.01 and wd["head"][0] == 0.5 and wd["head_bias"] == (0.0, [(len(names),)])
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in m.trainable_parameters())
    torch.optim.AdamW(groups, lr=1e-3)  # accepted by the optimizer as is


def test_set_classnames_text_head_switches_linear_head_refuses(tiny_backbone, digits):
    names, images, _ = digits
    t = make(tiny_backbone, names, head="text", init="xavier")
    t.set_classnames(names[:3])
    assert t(images[:2]).shape == (2, 3)
    lin = make(tiny_backbone, names, head="linear", init="xavier")
    lin.eval()
    full = lin(images[:2])
    lin.set_classnames(list(names))  # same classes (e.g. ImageNet -> ImageNet-V2): fine
    assert torch.equal(lin(images[:2]), full)
    lin.set_classnames(names[:3])  # a subset (ImageNet -> ImageNet-A/R): the head's rows for them
    assert torch.allclose(lin(images[:2]), full[:, :3])
    with pytest.raises(ConfigError, match="text-based method"):
        lin.set_classnames(["not a digit"])
    assert SPT.tied_to_training_classes(lin.cfg) and not SPT.tied_to_training_classes(t.cfg)


def test_defaults_resolve_to_valid_configs():
    train, meth = resolve("spt", "oxford_pets", 16, "fewshot")
    TrainConfig(**train)
    cfg = SPTConfig(**meth)
    assert (cfg.head, cfg.n_prompts, cfg.deep, train["optimizer"]) == ("linear", 20, True, "adamw")
    train, meth = resolve("spt", "imagenet", 16, "base2novel")
    assert SPTConfig(**meth).head == "text" and train["epochs"] == 20


def test_search_space_validates_and_enqueues_the_reference_defaults_first():
    from pathlib import Path

    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "spt.yaml")
    p = plan(spec)
    assert len(p.cells) == 11 * 5 and spec.seeds == [1, 2, 3] and spec.shots == [1, 2, 4, 8, 16]
    assert (spec.backbone.arch, spec.backbone.pretrained) == ("ViT-B-16", "openai")
    for cell in p.cells:
        assert cell.defaults_in_space() == {
            "deep": True,
            "n_prompts": 20,
            "init": "random",
            "lr": 1.0e-3,
            "head_weight_decay": 3.0,
        }


def test_init_max_images_caps_the_statistics_and_empty_loader_is_a_config_error(tiny_backbone, digits):
    names, images, _ = digits
    m = make(tiny_backbone, names, init="random", init_max_images=5, deep=False)
    m.prepare(loader_of(images, 3))
    n_patches = (tiny_backbone.image_size // tiny_backbone.visual.conv1.kernel_size[0]) ** 2
    assert m.init_prototypes[0].items_seen == 5 * n_patches
    assert int(m.init_prototypes[0].source_index.max()) < 5 * n_patches
    empty = make(tiny_backbone, names, init="mean_pool")
    with pytest.raises(ConfigError, match="needs training images"):
        empty.prepare(loader_of(images[:0], 3))


def test_depth_is_clipped_and_limits_prompted_layers(tiny_backbone, digits):
    names, images, _ = digits
    assert make(tiny_backbone, names, depth=10, init="xavier").prompts.shape[0] == tiny_backbone.vision_layers
    m = make(tiny_backbone, names, depth=2, init="random")
    m.prepare(loader_of(images, 8))
    assert m.prompts.shape[0] == 2 and sorted(m.init_prototypes) == [0, 1]
    hidden = block_inputs(tiny_backbone, images)
    tokens = hidden[1][:, 1:].reshape(-1, tiny_backbone.vision_width)
    torch.testing.assert_close(m.prompts[1].detach(), tokens[m.init_prototypes[1].source_index], rtol=1e-5, atol=1e-5)
