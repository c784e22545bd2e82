"""Planner: cell expansion order, per-cell trial counts, defaults enqueued only when inside the space."""

from __future__ import annotations

from orchestrator.planner import plan
from orchestrator.spec import parse_spec


def _spec(**kw):
    base = {
        "name": "t",
        "methods": ["zeroshot", "coop"],
        "datasets": ["digits", "shapes"],
        "shots": [1, 4],
        "seeds": [1, 2, 3],
        "search": {
            "coop": {
                "n_trials": 5,
                "seeds": [1, 2],
                "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
            }
        },
    }
    base.update(kw)
    return parse_spec(base)


def test_cells_cover_the_grid_in_spec_order():
    p = plan(_spec())
    assert [c.cell_id for c in p.cells[:3]] == [
        "fewshot.zeroshot.digits.1shot",
        "fewshot.zeroshot.digits.4shot",
        "fewshot.zeroshot.shapes.1shot",
    ]
    assert len(p.cells) == 2 * 2 * 2
    assert len({c.cell_id for c in p.cells}) == len(p.cells)


def test_trial_counts_per_stage():
    p = plan(_spec())
    coop = [c for c in p.cells if c.method == "coop"]
    zs = [c for c in p.cells if c.method == "zeroshot"]
    assert all(c.n_search_runs == 10 and c.n_final_runs == 3 for c in coop)
    assert all(c.n_search_runs == 0 and c.search_seeds == () and c.n_final_runs == 3 for c in zs)
    assert p.n_search_runs == 4 * 10 and p.n_final_runs == 8 * 3 and p.n_trials == 64
    assert "64 trials (40 search + 24 final)" in p.describe()


def test_two_protocols_double_the_cells():
    p = plan(_spec(protocol=["fewshot", "base2novel"]))
    assert len(p.cells) == 16
    assert {c.protocol for c in p.cells} == {"fewshot", "base2novel"}


def test_train_override_precedence():
    s = _spec(
        train={
            "defaults": {"epochs": 1, "batch_size": 8},
            "methods": {"coop": {"epochs": 2}},
            "datasets": {"shapes": {"epochs": 3}},
        }
    )
    p = plan(s)
    assert p.cell("fewshot.coop.digits.1shot").overrides == {"epochs": 2, "batch_size": 8}
    assert p.cell("fewshot.coop.shapes.1shot").overrides == {"epochs": 3, "batch_size": 8}
    assert p.cell("fewshot.zeroshot.digits.1shot").overrides == {"epochs": 1, "batch_size": 8}


def test_defaults_enqueued_only_when_inside_space():
    inside = plan(_spec(train={"defaults": {"lr": 0.01}})).cell("fewshot.coop.digits.1shot")
    assert inside.defaults_in_space() == {"lr": 0.01}
    outside = plan(_spec(train={"defaults": {"lr": 0.5}})).cell("fewshot.coop.digits.1shot")
    assert outside.defaults_in_space() is None


def test_by_protocol_gives_a_protocol_its_own_datasets_shots_and_targets():
    """Few-shot at 1 and 4 shots on two datasets; base-to-novel at 16 shots on one; cross-dataset and domain
    generalization each with their own targets (the top-level lists serve the protocols without an entry)."""
    p = plan(
        _spec(
            protocol=["fewshot", "base2novel", "cross_dataset", "domain_generalization"],
            methods=["zeroshot"],
            search={},
            targets=["shapes-32"],
            by_protocol={
                "base2novel": {"datasets": ["shapes-64"], "shots": [16]},
                "domain_generalization": {"targets": ["shapes", "shapes-16"], "shots": [16]},
            },
        )
    )
    ids = [c.cell_id for c in p.cells]
    assert ids == [
        "fewshot.zeroshot.digits.1shot",
        "fewshot.zeroshot.digits.4shot",
        "fewshot.zeroshot.shapes.1shot",
        "fewshot.zeroshot.shapes.4shot",
        "base2novel.zeroshot.shapes-64.16shot",
        "cross_dataset.zeroshot.digits.1shot",
        "cross_dataset.zeroshot.digits.4shot",
        "cross_dataset.zeroshot.shapes.1shot",
        "cross_dataset.zeroshot.shapes.4shot",
        "domain_generalization.zeroshot.digits.16shot",
        "domain_generalization.zeroshot.shapes.16shot",
    ]
    assert {c.targets for c in p.cells if c.protocol == "cross_dataset"} == {("shapes-32",)}
    assert {c.targets for c in p.cells if c.protocol == "domain_generalization"} == {("shapes", "shapes-16")}
    assert {c.targets for c in p.cells if c.protocol in ("fewshot", "base2novel")} == {()}
    assert p.spec.all_datasets() == ["digits", "shapes", "shapes-64"]
    assert p.spec.all_targets() == ["shapes-32", "shapes", "shapes-16"]


def test_by_protocol_datasets_may_carry_train_overrides():
    s = _spec(
        protocol=["fewshot", "base2novel"],
        by_protocol={"base2novel": {"datasets": ["shapes-64"]}},
        train={"datasets": {"shapes-64": {"epochs": 3}}},
    )
    assert plan(s).cell("base2novel.coop.shapes-64.1shot").overrides == {"epochs": 3}
