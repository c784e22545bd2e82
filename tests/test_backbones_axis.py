"""The backbone axis: ``backbones:`` expands cells by backbone; ids, result rows, MLflow tags and the report carry
it; a sweep grows by a backbone without re-running anything; a changed first backbone is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from fewshot.errors import ConfigError
from orchestrator.growth import compare
from orchestrator.planner import plan
from orchestrator.spec import parse_spec

TINY = {"arch": "promptsweep-tiny", "pretrained": None}
MINI = {"arch": "promptsweep-mini", "pretrained": None}
BASE = {
    "name": "bb",
    "methods": ["zeroshot", "coop"],
    "datasets": ["digits"],
    "shots": [1],
    "seeds": [1],
    "train": {"defaults": {"epochs": 1, "batch_size": 16, "num_workers": 0}},
    "resources": {"cpu": 1, "gpu": 0},
    "tracking": {"experiment": "bb"},
}


def _spec(**kw):
    return parse_spec(dict(BASE, **kw))


def test_cells_expand_by_backbone_and_the_first_keeps_its_ids():
    one = plan(_spec(backbone=TINY))
    two = plan(_spec(backbones=[TINY, MINI]))
    assert [c.cell_id for c in two.cells] == [c.cell_id for c in one.cells] + [
        "fewshot.zeroshot.digits.1shot@promptsweep-mini",
        "fewshot.coop.digits.1shot@promptsweep-mini",
    ]
    assert [c.backbone.arch for c in two.cells] == ["promptsweep-tiny"] * 2 + ["promptsweep-mini"] * 2
    assert two.spec.backbone.arch == "promptsweep-tiny"  # backbone reads as the first of backbones
    # a one-backbone spec hashes as before the axis existed; the canonical form of a list reads back
    assert "backbones" not in one.spec.normalized()
    assert parse_spec(two.spec.normalized()).normalized() == two.spec.normalized()


def test_backbone_keys_are_safe_in_cell_ids():
    from orchestrator.spec import BackboneSpec

    keys = [
        BackboneSpec(**b).key()
        for b in (
            TINY,
            {"arch": "ViT-B-16", "pretrained": "openai"},
            {"arch": "ViT-B-16", "pretrained": "/data/ckpt/my model.pt"},
            {"arch": "ViT-B-16", "pretrained": "/other/my model.pt"},
        )
    ]
    assert keys[:2] == ["promptsweep-tiny", "ViT-B-16-openai"]
    assert keys[2].startswith("ViT-B-16-my-model-") and all(ch.isalnum() or ch in "._-" for ch in keys[2])
    assert keys[3] != keys[2]  # two files of one name stay apart


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"backbone": TINY, "backbones": [MINI, TINY]}, "give either backbone (one) or backbones"),
        ({"backbones": [TINY, TINY]}, "listed more than once"),
        ({"backbones": []}, "backbones"),
        ({"backbones": [TINY, {"arch": "ViT-Q-99"}]}, "backbones[1].arch: unknown architecture 'ViT-Q-99'"),
    ],
)
def test_bad_backbone_lists_are_one_clear_error(changes, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        _spec(**changes)


def test_adding_a_backbone_grows_the_sweep_and_changing_the_first_is_refused():
    old = _spec(backbone=TINY).normalized()
    rows = [{"cell_id": c.cell_id, "stage": "final", "seed": 1} for c in plan(_spec(backbone=TINY)).cells]
    grown = compare(old, _spec(backbones=[TINY, MINI]), rows)
    assert not grown.refused and grown.new_cells == [
        "fewshot.zeroshot.digits.1shot@promptsweep-mini",
        "fewshot.coop.digits.1shot@promptsweep-mini",
    ]
    swapped = compare(old, _spec(backbones=[MINI, TINY]), rows)
    assert any(line.startswith("backbone:") for line in swapped.refused), swapped.refused
    dropped = compare(
        _spec(backbones=[TINY, MINI]).normalized(),
        _spec(backbone=TINY),
        rows + [{"cell_id": "fewshot.coop.digits.1shot@promptsweep-mini", "stage": "final", "seed": 1}],
    )
    assert dropped.refused == [
        "cell fewshot.coop.digits.1shot@promptsweep-mini: has 1 finished trial(s) but is not "
        "in the new spec (a sweep only grows)"
    ]


@pytest.mark.slow
def test_a_sweep_grows_by_a_backbone_and_every_file_and_run_carries_it(tmp_path):
    import pyarrow.feather as feather
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(spec: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator.sweep",
                str(path),
                "--output",
                str(tmp_path / "out"),
                "--tracking-uri",
                uri,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r

    run(dict(BASE, backbone=TINY, report={"baseline": "zeroshot"}))
    out = tmp_path / "out" / "bb"
    first = {r["tune_trial_id"]: r for r in feather.read_table(out / "trials.arrow").to_pylist()}
    r = run(dict(BASE, backbones=[TINY, MINI], report={"baseline": "zeroshot"}))
    assert "growing sweep 'bb': 2 new cell(s)" in r.stdout
    rows = feather.read_table(out / "trials.arrow").to_pylist()
    assert len(rows) == 4 and all(rows_ := [x for x in rows if x["tune_trial_id"] in first])
    assert all(x["finished_at"] == first[x["tune_trial_id"]]["finished_at"] for x in rows_)  # not re-run
    assert {x["backbone"] for x in rows} == {"promptsweep-tiny:random-init", "promptsweep-mini:random-init"}
    assert {(x["cell_id"], x["backbone"]) for x in rows if x["cell_id"].endswith("@promptsweep-mini")} == {
        ("fewshot.zeroshot.digits.1shot@promptsweep-mini", "promptsweep-mini:random-init"),
        ("fewshot.coop.digits.1shot@promptsweep-mini", "promptsweep-mini:random-init"),
    }
    cells = feather.read_table(out / "cells.arrow").to_pylist()
    assert len(cells) == 4 and len({c["backbone"] for c in cells}) == 2
    comparisons = feather.read_table(out / "comparisons.arrow").to_pylist()  # coop vs zeroshot on each backbone
    assert sorted(c["backbone"] for c in comparisons if c["metric"] == "test_acc") == [
        "promptsweep-mini:random-init",
        "promptsweep-tiny:random-init",
    ]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("bb").experiment_id], max_results=100)
    trial_runs = [x for x in runs if x.data.tags.get("level") == "trial"]
    assert len(trial_runs) == 4 and {x.data.tags["backbone"] for x in trial_runs} == {
        "promptsweep-tiny:random-init",
        "promptsweep-mini:random-init",
    }
    assert len([x for x in runs if x.data.tags.get("level") == "cell"]) == 4
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| dataset"))
    assert header.split(" | ")[1:] == [
        "promptsweep-tiny:random-init · zeroshot",
        "promptsweep-tiny:random-init · coop",
        "promptsweep-mini:random-init · zeroshot",
        "promptsweep-mini:random-init · coop |",
    ], header
