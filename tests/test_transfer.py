"""Cross-dataset and domain-generalization evaluation: every target is scored with its own class names and
templates by every method; a head tied to the training classes scores a subset of them by name; the
planner refuses what cannot be scored before anything runs; a failing target keeps the others."""

from __future__ import annotations

import json

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.templates import template
from methods.defaults import resolve
from methods.registry import get_method
from orchestrator.trial import TrialRequest, run_trial
from tests.layouts import PETS, WNIDS, write_imagenet, write_imagenet_variant, write_pets

SOURCE = list(WNIDS.values())
#: method -> the template kind its text classifier uses (None: learned context, no hand-crafted template)
TEXT_SIDE = {
    "zeroshot": "coop",
    "vpt": "coop",
    "spt": "coop",
    "kgcoop": "kgcoop",
    "sep": "sep",
    "coop": None,
    "cocoop": None,
    "maple": None,
}


class Scored:
    """What the backbone encodes from now on: hand-crafted template x class-name texts, and the prompts it
    tokenizes (learned-context placeholders such as "X X X X abyssinian." or "a photo of a abyssinian.")."""

    def __init__(self):
        self.templated: list[str] = []
        self.prompts: list[str] = []

    def clear(self):
        self.templated.clear()
        self.prompts.clear()


@pytest.fixture
def scored_texts(tiny_backbone, monkeypatch):
    scored = Scored()
    tokenize, features = tiny_backbone.tokenize, tiny_backbone.template_text_features

    def record_tokenize(batch):
        scored.prompts.extend(batch)
        return tokenize(batch)

    def record_features(classnames, templates, normalize=True, **kw):
        scored.templated.extend(t.format(n.replace("_", " ")) for t in templates for n in classnames)
        return features(classnames, templates, normalize, **kw)

    monkeypatch.setattr(tiny_backbone, "tokenize", record_tokenize)
    monkeypatch.setattr(tiny_backbone, "template_text_features", record_features)
    return scored


def _build(bb, method: str):
    cls = get_method(method)
    _, meth = resolve(method, "imagenet", 16, "cross_dataset")
    torch.manual_seed(0)
    return cls(bb, SOURCE, "imagenet", cls.Config(**meth))


@pytest.mark.parametrize("method", sorted(TEXT_SIDE))
def test_each_target_is_scored_with_its_own_templates_and_names(tiny_backbone, scored_texts, method):
    m = _build(tiny_backbone, method)
    m.eval()
    images = torch.randn(2, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    scored_texts.clear()
    m.set_classnames(PETS, "oxford_pets")
    with torch.no_grad():
        logits = m(images)
    assert logits.shape == (2, len(PETS))
    kind = TEXT_SIDE[method]
    if kind is not None:  # the target's own template, never the source's ("a photo of a {}." for ImageNet)
        assert sorted(scored_texts.templated) == sorted(template("oxford_pets", kind).format(n) for n in PETS)
    else:
        assert scored_texts.templated == []
    if method in ("coop", "cocoop", "maple", "kgcoop", "sep"):  # learned context: "<context> <class name>."
        assert {n for n in PETS if any(p.endswith(f" {n}.") for p in scored_texts.prompts)} == set(PETS)
    everything = scored_texts.templated + scored_texts.prompts
    assert not any(n in t for t in everything for n in SOURCE), "the source's classes were scored"
    # back on the source: its own template again
    scored_texts.clear()
    m.set_classnames(SOURCE, "imagenet")
    with torch.no_grad():
        m(images)
    if kind is not None:
        assert sorted(scored_texts.templated) == sorted(template("imagenet", kind).format(n) for n in SOURCE)


def test_without_a_dataset_the_training_dataset_templates_stay(tiny_backbone, scored_texts):
    m = _build(tiny_backbone, "zeroshot")
    scored_texts.clear()
    m.set_classnames(SOURCE[:2])  # base-to-novel: the training dataset's own classes
    assert m.eval_dataset == "imagenet"
    assert scored_texts.templated == [template("imagenet", "coop").format(n) for n in SOURCE[:2]]


# --- the trial: targets scored by their own dataset, a failing target keeps the others -----------------------


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_imagenet(root)
    for name in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        write_imagenet_variant(root, name)
    write_pets(root)
    return root


def _trial(root, method, protocol, targets, **overrides):
    return TrialRequest(
        method=method,
        dataset="imagenet",
        shots=2,
        seed=1,
        protocol=protocol,
        targets=targets,
        data_root=str(root),
        device="cpu",
        overrides=overrides,
    )


def test_trial_scores_each_target_as_its_dataset(data, monkeypatch):
    from methods.base import PromptMethod

    seen = []
    original = PromptMethod.set_classnames

    def spy(self, classnames, dataset=None):
        seen.append((dataset, tuple(classnames)))
        return original(self, classnames, dataset)

    monkeypatch.setattr(PromptMethod, "set_classnames", spy)
    final = run_trial(_trial(data, "zeroshot", "cross_dataset", ["oxford_pets", "imagenet_a"]))
    assert ("oxford_pets", tuple(PETS)) in seen and ("imagenet_a", ("goldfish", "great white shark")) in seen
    assert ("imagenet", tuple(SOURCE)) in seen
    assert {"test_acc", "acc_oxford_pets", "acc_imagenet_a", "target_avg"} <= set(final)
    assert final["test_images_read"] == 6 + 37 + 4  # source test + pets test + A's two classes


def test_tgpt_domain_generalization_scores_all_four_targets(data):
    """V2 / Sketch with the whole 3-class head, A / R with its rows for their two classes; nothing thrown away."""
    final = run_trial(
        _trial(
            data,
            "tgpt",
            "domain_generalization",
            ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
            max_iters=2,
            batch_size=2,
            eval_every_iters=None,
        )
    )
    for t in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert 0.0 <= final[f"acc_{t}"] <= 100.0
    assert final["target_avg"] == pytest.approx(sum(final[f"acc_imagenet_{t}"] for t in ("v2", "sketch", "a", "r")) / 4)
    assert "error_class" not in final


def test_a_failing_target_keeps_the_other_targets(data):
    victim = next((data / "oxford_pets" / "images").glob("*_test_0.png"))
    victim.unlink()
    final = run_trial(_trial(data, "zeroshot", "cross_dataset", ["oxford_pets", "imagenet_a"]))
    assert "acc_imagenet_a" in final and "acc_oxford_pets" not in final and "target_avg" not in final
    assert final["error_class"] == "target_failed" and final["failed_targets"] == "oxford_pets"
    assert str(victim) in final["error_message"] and final["test_acc"] is not None


def test_an_empty_target_is_a_failed_target_not_zero_percent(data):
    split_file = data / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(split_file.read_text())
    split["test"] = []
    split_file.write_text(json.dumps(split))
    final = run_trial(_trial(data, "zeroshot", "cross_dataset", ["oxford_pets", "imagenet_a"]))
    assert "acc_oxford_pets" not in final and "empty_split" in final["error_message"]


# --- the planner: what cannot be scored is refused before anything runs ---------------------------------------


def _plan(**spec):
    from orchestrator.planner import plan
    from orchestrator.spec import parse_spec

    base = {"name": "t", "methods": ["zeroshot"], "datasets": ["imagenet"], "shots": [16], "seeds": [1]}
    return plan(parse_spec({**base, **spec}))


def test_planner_accepts_tgpt_domain_generalization_on_imagenet_variants():
    p = _plan(
        methods=["tgpt"],
        protocol="domain_generalization",
        targets=["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
    )
    assert p.cells[0].tied_to_training_classes()


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"methods": ["tgpt"], "protocol": "domain_generalization", "targets": ["imagenet_a", "caltech101"]},
            "cell domain_generalization.tgpt.imagenet.16shot: method 'tgpt' .* cannot score target\\(s\\) caltech101",
        ),
        (
            {
                "methods": ["spt"],
                "protocol": "cross_dataset",
                "targets": ["oxford_pets"],
                "train": {"methods": {"spt": {"head": "linear"}}},
            },
            "method 'spt' .* tied to its imagenet training classes, so it cannot score target\\(s\\) oxford_pets",
        ),
        (
            {"methods": ["spt"], "protocol": "base2novel", "train": {"methods": {"spt": {"head": "linear"}}}},
            "cannot score base2novel's novel classes",
        ),
        (
            {
                "methods": ["spt"],
                "protocol": "base2novel",
                "search": {
                    "spt": {"n_trials": 2, "space": {"head": {"type": "categorical", "choices": ["text", "linear"]}}}
                },
            },
            "cannot score base2novel's novel classes",
        ),
    ],
)
def test_planner_refuses_what_a_tied_head_cannot_score(spec, message):
    with pytest.raises(ConfigError, match=message):
        _plan(**spec)


def test_spt_text_head_passes_the_planner_everywhere():
    _plan(methods=["spt"], protocol="cross_dataset", targets=["oxford_pets"])  # its defaults: head text
    _plan(methods=["spt"], protocol="base2novel")
