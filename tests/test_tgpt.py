"""TGP-T (methods/tgpt.py, methods/bonder.py) and the captions reader (fewshot/captions.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from fewshot.captions import find_captions_file, match_captions, read_captions
from fewshot.errors import ConfigError, DataError
from methods import towers
from methods.bonder import Bonder
from methods.tgpt import IGNORE, TGPT, TGPTConfig
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


def _batch(loader):
    return next(iter(loader))


def _make(bb, names, dataset="digits", **kw):
    torch.manual_seed(0)
    return TGPT(bb, names, dataset, TGPTConfig(**kw))


def _captions_file(tmp_path, items, skip_label=None):
    """A captions.txt keyed by path relative to the image dir, one distinct description per image (its position in
    ``items``), none for the images of ``skip_label``; returns (path, {impath: description})."""
    lines, own = [], {}
    for i, it in enumerate(items):
        if it.label == skip_label:
            continue
        own[it.impath] = f"a picture of the digit {it.classname} number {i}"
        rel = "/".join(it.impath.replace("\\", "/").split("/")[-2:])
        lines.append(f"{rel}\t{own[it.impath]}\tdigit")
    path = tmp_path / "captions.txt"
    path.write_text("# comment\n\n" + "\n".join(lines) + "\n")
    return path, own


def _own_targets(m, items, own, indices):
    """[B, n_con]: the tokens of each indexed image's own description, all-ignore for an image without one."""
    rows = [
        m._targets([own[items[i].impath]], m.cfg.n_con)[0]
        if items[i].impath in own
        else torch.full((m.cfg.n_con,), IGNORE, dtype=torch.long)
        for i in indices
    ]
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------- shapes
def test_shapes_zero_shot_head_and_query_init(tiny_backbone, digits):
    names, loader = digits
    m = _make(tiny_backbone, names)
    assert not m.head.abs().any()  # zero-shot init is deferred to first use (cheap construction)
    x, _ = _batch(loader)
    logits, o_cat, o_con = m._run(x)
    d = tiny_backbone.text_width
    assert logits.shape == (len(x), len(names))
    assert o_cat.shape == (len(x), 32, d) and o_con.shape == (len(x), 64, d)
    # head rows are unit norm and made of two identical halves
    e = tiny_backbone.embed_dim
    assert torch.allclose(m.head.norm(dim=-1), torch.ones(len(names)), atol=1e-5)
    assert torch.equal(m.head[:, :e], m.head[:, e:])
    from fewshot.templates import ensemble_templates

    z = torch.stack(
        [tiny_backbone.encode_text([t.format(n) for n in names], normalize=False) for t in ensemble_templates("digits")]
    ).mean(0)
    assert torch.allclose(m.head[:, :e], torch.nn.functional.normalize(z, dim=-1) / 2**0.5, atol=1e-5)
    # first category queries = token embeddings of "a photo of a", the rest small random
    ids = tiny_backbone.tokenize(["a photo of a"])[0, 1:5]
    assert torch.allclose(m.q_cat[:4], tiny_backbone.token_embedding(ids).float())
    assert m.q_cat[4:].std() < 0.03 and m.q_con.std() < 0.03
    # category targets: tokens of "a photo of a {class}." after SOS, EOT included, pads ignored
    want = tiny_backbone.tokenize([f"a photo of a {names[3]}."])[0, 1:33]
    got = m.cat_targets[3]
    assert torch.equal(got[want != 0], want[want != 0]) and (got[want == 0] == IGNORE).all()
    assert int(m.cat_targets[3][(got != IGNORE)][-1]) == int(want.max())  # EOT is the last target


def test_prompt_cut_after_eot_equals_reference_77_padding(tiny_backbone, digits):
    names, loader = digits
    m = _make(tiny_backbone, names)
    out = torch.randn(2, 5, tiny_backbone.text_width)
    ours = m._encode_prompts(out)
    sos, dot, eot = tiny_backbone.token_embedding(tiny_backbone.tokenize(["."])[0, :3]).float().split(1, 0)
    pad = tiny_backbone.token_embedding(torch.zeros(77 - 8, dtype=torch.long)).float()
    seq = torch.cat([sos, out[0], dot, eot, pad])[None]
    ref = towers.encode_text(tiny_backbone, seq, torch.tensor([7])).float()
    assert torch.allclose(ours[:1], ref, atol=1e-5)


def test_bonder_layout_and_cross_attention_formula():
    torch.manual_seed(0)
    b = Bonder(64, 64, heads=8)
    names = dict(b.named_parameters())
    assert "self_attn.qkv.bias" not in names and "cross_attn.q.bias" not in names
    assert "cross_attn.proj.bias" in names and "self_attn.proj.bias" in names
    assert not any(k in n for n in names for k in ("cross_attn.k", "cross_attn.v"))  # no K/V projections
    assert b.mlp[0].out_features == 64  # hidden = dim
    q, f = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    ca = b.cross_attn
    attn = (ca.q(q) @ f.transpose(1, 2) * (64 // 8) ** -0.5).softmax(-1)
    assert torch.allclose(ca(q, f), attn @ f @ ca.proj.weight.t() + ca.proj.bias, atol=1e-5)


# --------------------------------------------------------------------------------- training contract
def test_only_own_params_get_gradients_backbone_untouched(tiny_backbone, digits):
    names, loader = digits
    snap = backbone_snapshot(tiny_backbone)
    m = _make(tiny_backbone, names)
    x, y = _batch(loader)
    grads = one_step_gradients(m, x, y)
    assert grads and all(grads.values()), [n for n, g in grads.items() if not g]
    assert_backbone_untouched(tiny_backbone, snap)
    assert m.extra_frozen_params() == 0
    assert m.frozen_param_count() == tiny_backbone.num_params()


def test_loss_falls_and_checkpoint_roundtrip(tiny_backbone, digits):
    names, loader = digits
    m = _make(tiny_backbone, names)
    losses = train_losses(m, loader, epochs=5, lr=3e-3)
    assert losses[-1] < losses[0] * 0.85 and losses[-1] == min(losses), losses
    x, _ = _batch(loader)
    checkpoint_roundtrip(lambda: _make(tiny_backbone, names, ctx_init=None), m, x)


@pytest.mark.parametrize("n_classes", [10, 1000])
def test_two_text_sequences_per_image_whatever_the_class_count(tiny_backbone, digits, monkeypatch, n_classes):
    _, loader = digits
    names = [f"class {i}" for i in range(n_classes)]
    m = _make(tiny_backbone, names, dataset="imagenet")
    seen = []
    real = towers.encode_text

    def counting(bb, token_embeds, eot_index, *a, **kw):
        seen.append(token_embeds.shape[0])
        return real(bb, token_embeds, eot_index, *a, **kw)

    monkeypatch.setattr(towers, "encode_text", counting)
    x, y = _batch(loader)
    loss, _ = m.training_loss(x, y % n_classes)
    loss.backward()
    assert sum(seen) == 2 * len(x)
    seen.clear()
    with torch.no_grad():
        assert m(x).shape == (len(x), n_classes)
    assert sum(seen) == 2 * len(x)


# ----------------------------------------------------------------------------------------- captions
def test_captions_reader_and_matching(tmp_path):
    (tmp_path / "ds" / "images" / "cat").mkdir(parents=True)
    cap = tmp_path / "ds" / "captions.txt"
    cap.write_text("cat/a.jpg\ta cat on a mat\tcat\ncat/b.jpg\tanother cat\n")
    caps = read_captions(cap)
    assert caps == {"cat/a.jpg": "a cat on a mat", "cat/b.jpg": "another cat"}
    imgs = [str(tmp_path / "ds" / "images" / "cat" / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert find_captions_file(imgs) == cap
    assert match_captions(imgs, caps) == {imgs[0]: "a cat on a mat", imgs[1]: "another cat"}
    assert find_captions_file([str(tmp_path / "other" / "x.jpg")]) is None
    bad = tmp_path / "bad.txt"
    bad.write_text("no tab here\n")
    with pytest.raises(DataError, match="bad.txt:1"):
        read_captions(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_captions(tmp_path / "missing.txt")


def test_content_loss_off_without_captions_is_loud(tiny_backbone, digits, caplog):
    names, loader = digits
    m = _make(tiny_backbone, names)
    with caplog.at_level(logging.WARNING, logger="methods.tgpt"):
        m.prepare(loader)
        m.prepare(loader)
    assert not m.content_loss_enabled
    assert m.run_notes()["tgpt_content_loss"].startswith("off: no captions.txt")
    assert sum("content loss is OFF" in r.getMessage() for r in caplog.records) == 1
    x, y = _batch(loader)
    _, parts = m.training_loss(x, y)
    assert set(parts) == {"ce", "l_cat"}


def test_content_targets_are_each_images_own_caption_by_index(tiny_backbone, digits, tmp_path):
    names, loader = digits
    items = loader.dataset.items
    path, own = _captions_file(tmp_path, items, skip_label=0)
    m = _make(tiny_backbone, names, captions_file=str(path))
    m.prepare(loader)
    assert m.content_loss_enabled
    assert m.run_notes()["tgpt_content_loss"] == (
        f"on: {len(own)}/{len(items)} training images paired with their own caption from {path}"
    )
    every = _own_targets(m, items, own, range(len(items)))
    assert len({tuple(r.tolist()) for r in every if (r != IGNORE).any()}) == len(own)  # distinct, so by index
    # a batch in any order: each sample's targets are its own image's, an image without a caption all-ignore
    undescribed = [i for i, it in enumerate(items) if it.label == 0]
    order = [len(items) - 1, undescribed[0], 3, 7, undescribed[-1], 1]
    indices = torch.tensor(order)
    assert torch.equal(m._content_targets(indices), _own_targets(m, items, own, order))
    # the step's content loss is the CE against those targets over the described samples only
    x = torch.stack([loader.dataset[i][0] for i in order])
    y = torch.tensor([items[i].label for i in order])
    described = torch.tensor([items[i].impath in own for i in order])
    _, _, o_con = m._run(x)
    _, parts = m.training_loss(x, y, indices=indices)
    want = m._token_loss(o_con[described], _own_targets(m, items, own, order)[described])
    assert parts["l_con"] == pytest.approx(float(want.detach()), rel=1e-5)
    # a sample without a caption contributes nothing to it: no gradient reaches its content queries
    out = o_con.detach().requires_grad_()
    m._token_loss(out, m._content_targets(indices)).backward()
    assert (out.grad[~described] == 0).all() and (out.grad[described] != 0).any()
    with pytest.raises(ValueError, match="needs indices"):
        m.training_loss(x, y)  # the content loss is on: a batch without sample identities is refused
    only_undescribed = torch.tensor(undescribed[:2])
    _, parts = m.training_loss(x[:2], torch.zeros(2, dtype=torch.long), indices=only_undescribed)
    assert set(parts) == {"ce", "l_cat"}  # no described sample in the batch: no content loss at all
    off = _make(tiny_backbone, names, captions_file=str(path), lambda_con=0.0)
    off.prepare(loader)
    assert not off.content_loss_enabled and off.run_notes()["tgpt_content_loss"] == "off: lambda_con = 0"


@pytest.mark.parametrize("views", [None, 2], ids=["images", "cached-train-views"])
def test_trial_steps_supervise_each_sample_with_its_own_caption(tiny_backbone, tmp_path, monkeypatch, views):
    """Through ``run_trial`` (fresh augmentations, and cached training views): every step's content targets are
    the captions of the images at the batch's indices; the backbone stays bit-identical."""
    import json

    from fewshot.registry import load_dataset
    from methods.backbone import TINY_ARCH
    from orchestrator.trial import TrialRequest, run_trial
    from tests.method_harness import assert_backbone_untouched, backbone_snapshot

    path, own = _captions_file(tmp_path, load_dataset("digits").train, skip_label=0)
    seen = {"steps": []}
    real_prepare, real_loss, real_token_loss = TGPT.prepare, TGPT.training_loss, TGPT._token_loss

    def prepare(self, train_loader):
        seen.update(items=list(train_loader.dataset.items), method=self, snapshot=backbone_snapshot(self.backbone))
        real_prepare(self, train_loader)

    def training_loss(self, images, labels, indices=None):
        seen["steps"].append({"indices": indices.tolist(), "labels": labels.tolist()})
        return real_loss(self, images, labels, indices=indices)

    def token_loss(self, out, targets):
        if targets.shape[1] == self.cfg.n_con:  # n_con != n_cat here: the content call
            seen["steps"][-1]["con"] = targets.clone()
        return real_token_loss(self, out, targets)

    monkeypatch.setattr(TGPT, "prepare", prepare)
    monkeypatch.setattr(TGPT, "training_loss", training_loss)
    monkeypatch.setattr(TGPT, "_token_loss", token_loss)
    over = {
        "max_iters": 10,
        "batch_size": 4,
        "n_cat": 4,
        "n_con": 12,
        "captions_file": str(path),
        "train_feature_views": views,
        "num_workers": 0,
    }
    final = run_trial(
        TrialRequest(method="tgpt", dataset="digits", shots=2, seed=1, device="cpu", stage="search", overrides=over)
    )
    m, items, steps = seen["method"], seen["items"], seen["steps"]
    assert m.backbone.arch == TINY_ARCH and len(steps) == 10
    described = sum(it.impath in own for it in items)
    assert 0 < described < len(items)  # the label-0 images have no caption
    assert json.loads(final["run_notes"])["tgpt_content_loss"].startswith(
        f"on: {described}/{len(items)} training images paired with their own caption"
    )
    for step in steps:
        assert step["labels"] == [items[i].label for i in step["indices"]]  # an index names the sample served
        want = _own_targets(m, items, own, step["indices"])
        if (want != IGNORE).any():
            assert torch.equal(step["con"], want), step["indices"]
        else:
            assert "con" not in step  # only undescribed images in the batch: no content loss
    assert {i for step in steps for i in step["indices"]} == set(range(len(items)))  # every image was stepped
    assert_backbone_untouched(m.backbone, seen["snapshot"])


def test_trial_cli_runs_tgpt_with_paired_captions(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from fewshot.registry import load_dataset

    path, _ = _captions_file(tmp_path, load_dataset("digits").train)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.trial",
            "--method",
            "tgpt",
            "--dataset",
            "digits",
            "--shots",
            "1",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--set",
            "max_iters=3",
            "--set",
            "batch_size=4",
            "--set",
            "n_cat=4",
            "--set",
            "n_con=12",
            "--set",
            f"captions_file={path}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["epochs_run"] >= 1 and 0 <= out["test_acc"] <= 100 and out["images_trained"] > 0
    assert json.loads(out["run_notes"])["tgpt_content_loss"] == (
        f"on: 10/10 training images paired with their own caption from {path}"
    )


# -------------------------------------------------------------------------------------- protocols
def test_set_classnames_scores_a_subset_of_the_training_classes_through_its_head_rows(tiny_backbone, digits):
    """DG to ImageNet-A/R: the 1,000-class head scores their 200 classes with its rows for them (by name)."""
    names, loader = digits
    images = _batch(loader)[0]
    m = _make(tiny_backbone, names)
    m.eval()
    full = m(images)
    m.set_classnames(list(names))  # the same classes (ImageNet -> V2 / Sketch): the whole head
    assert torch.equal(m(images), full)
    subset = [names[7], names[2], names[5]]
    m.set_classnames(subset, "digits")
    assert torch.allclose(m(images), full[:, [7, 2, 5]])
    m.set_classnames(list(reversed(names)))
    assert torch.allclose(m(images), full.flip(1))
    with pytest.raises(ConfigError, match="tied to its 10 training classes and cannot score 1 class.*'eleven'"):
        m.set_classnames(names[:3] + ["eleven"])
    assert TGPT.tied_to_training_classes(m.cfg)
    assert "base2novel" not in TGPT.protocols and "domain_generalization" in TGPT.protocols


def test_sizes_on_vit_b16():
    from methods.backbone import load_backbone

    bb = load_backbone("ViT-B-16")
    C = 3
    m = TGPT(bb, ["a", "b", "c"], "imagenet", TGPTConfig())
    parts = m.param_breakdown()
    per_bonder = (512 * 1536) + (512 * 512 + 512) + (512 * 512) + (512 * 512 + 512) + 2 * (512 * 512 + 512) + 4 * 1024
    assert parts["bonder_cat"] == parts["bonder_con"] == per_bonder == 2_103_296
    assert parts["q_cat"] + parts["q_con"] == (32 + 64) * 512
    assert parts["head"] == 1024 * C
    assert m.num_trainable() == 2 * per_bonder + 96 * 512 + 1024 * C
    assert m.frozen_param_count() == bb.num_params()


# ------------------------------------------------------------------------------------ search space
def test_search_space_validates_and_enqueues_the_reference_defaults_first():
    from pathlib import Path

    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "search_spaces" / "tgpt.yaml")
    p = plan(spec)
    assert len(p.cells) == 11 * 5 and spec.seeds == [1, 2, 3] and spec.shots == [1, 2, 4, 8, 16]
    assert (spec.backbone.arch, spec.backbone.pretrained) == ("ViT-B-16", "openai")
    ref = {
        "eurosat": (5.0e-5, 51200),
        "dtd": (2.0e-5, 25600),
        "stanford_cars": (5.0e-5, 19200),
        "caltech101": (2.0e-5, 38400),
    }
    for cell in p.cells:
        d = cell.defaults_in_space()
        assert d is not None, cell
        assert {k: d[k] for k in ("n_cat", "n_con", "lambda_cat", "lambda_con", "label_smoothing")} == {
            "n_cat": 32,
            "n_con": 64,
            "lambda_cat": 1.0,
            "lambda_con": 1.0,
            "label_smoothing": 0.1,
        }
        if cell.dataset in ref:
            assert (d["lr"], d["max_iters"]) == ref[cell.dataset]


# ------------------------------------------------------------------------------------ head templates
def test_head_templates_reference_averages_raw_features_of_the_21_mined_templates(tiny_backbone):
    from torch.nn import functional as F

    from methods.tgpt import head_templates

    names = ["american_bulldog", "Abyssinian", "great (pyrenees)"]
    mined = head_templates("reference", "oxford_pets")
    assert (
        len(mined) == 21 and mined[0] == "a photo of a {}, a type of pet." and mined[-1] == "This is a photo of a {}."
    )
    assert head_templates("reference", "imagenet_sketch") == head_templates("reference", "imagenet")
    m = _make(tiny_backbone, names, "oxford_pets", head_templates="reference", n_cat=8, n_con=8)
    m._ensure_head()
    with torch.no_grad():  # the reference: raw class names (underscores kept), mean of unnormalised features
        z = torch.stack(
            [tiny_backbone.model.encode_text(tiny_backbone.tokenize([t.format(n) for n in names])) for t in mined]
        ).mean(0)
    assert torch.allclose(m.head, F.normalize(torch.cat([z, z], -1), dim=-1), atol=1e-5)
    default = _make(tiny_backbone, names, "oxford_pets", n_cat=8, n_con=8)
    default._ensure_head()
    assert not torch.allclose(default.head, m.head, atol=1e-3)
    with pytest.raises(ConfigError, match="mined templates for .* not 'digits': use head_templates: ensemble"):
        _make(tiny_backbone, names, "digits", head_templates="reference")


# ---------------------------------------------------------------------------------------- schedule
def test_explicit_epochs_sets_the_iteration_schedule_and_with_max_iters_is_refused():
    from methods.defaults import schedule_overrides
    from orchestrator.trial import TrialRequest, build_configs

    def train_cfg(overrides):
        req = TrialRequest(method="tgpt", dataset="imagenet", shots=16, seed=1, device="cpu", overrides=overrides)
        return build_configs(req, TGPT)[0]

    assert (train_cfg({}).max_iters, train_cfg({"max_iters": 40}).max_iters) == (12800, 40)
    one = train_cfg({"epochs": 1})  # was: epochs ignored, 12,800 iterations trained
    assert one.max_iters is None and one.epochs == 1
    assert train_cfg({"epochs": 3, "max_iters": None}).epochs == 3
    with pytest.raises(ConfigError, match="epochs=1 and max_iters=40 are both set"):
        train_cfg({"epochs": 1, "max_iters": 40})
    assert schedule_overrides({"lr": 0.1}) == {"lr": 0.1}
