"""Every proposal a search space can make is resolved through its method before anything starts: a combination
the method refuses is one error at --dry-run, naming the cell, the values and the method's message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fewshot.errors import ConfigError
from orchestrator.planner import plan
from orchestrator.space_check import check_plan, proposals
from orchestrator.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def test_proposals_are_every_choice_combination_and_range_end_with_conditions():
    spec = parse_spec(
        {
            "name": "t",
            "methods": ["coop"],
            "datasets": ["digits"],
            "search": {
                "coop": {
                    "n_trials": 2,
                    "space": {
                        "lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True},
                        "csc": {"type": "categorical", "choices": [False, True]},
                        "class_token_position": {
                            "type": "categorical",
                            "choices": ["end", "front"],
                            "when": {"csc": [True]},
                        },
                        "n_ctx": {"type": "int", "low": 4, "high": 8},
                    },
                }
            },
        }
    )
    got = list(proposals(spec.search["coop"].space))
    assert len(got) == 2 * (1 + 2) * 2  # lr ends x (csc false | csc true x 2 positions) x n_ctx ends
    assert {"lr": 0.001, "csc": False, "n_ctx": 4} in got
    assert {"lr": 0.01, "csc": True, "class_token_position": "front", "n_ctx": 8} in got
    assert all("class_token_position" not in p for p in got if not p["csc"])


def _coop_ctx_spec(**over):
    return {
        "name": "ctx",
        "protocol": "base2novel",
        "methods": ["coop"],
        "datasets": ["digits"],
        "shots": [1],
        "seeds": [1],
        "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        "train": {"methods": {"coop": {"ctx_init": "a photo of a"}}},
        "search": {"coop": {"n_trials": 2, "space": {"n_ctx": {"type": "categorical", "choices": [4, 14]}}}},
        **over,
    }


def test_a_combination_the_method_refuses_is_one_error_naming_cell_values_and_message(tiny_backbone):
    with pytest.raises(ConfigError) as err:
        check_plan(plan(parse_spec(_coop_ctx_spec())), backbone=tiny_backbone)
    msg = str(err.value)
    assert msg.startswith('search.coop.space: cell base2novel.coop.digits.1shot can propose {"n_ctx": 14}')
    assert "ctx_init 'a photo of a' is 4 tokens but n_ctx=14" in msg
    ok = _coop_ctx_spec(search={"coop": {"n_trials": 1, "space": {"n_ctx": {"type": "categorical", "choices": [4]}}}})
    assert check_plan(plan(parse_spec(ok)), backbone=tiny_backbone) == 1


def test_dry_run_refuses_it_with_exit_2(tmp_path):
    spec = tmp_path / "ctx.yaml"
    spec.write_text(yaml.safe_dump(_coop_ctx_spec()))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(spec), "--dry-run", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: search.coop.space: cell base2novel.coop.digits.1shot")
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_every_shipped_search_space_passes():
    """On a random-init backbone of each spec's arch (the real tokenizer and shapes)."""
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        p = plan(load_spec(path))
        n = check_plan(p)
        assert n == sum(len(list(proposals(c.space))) for c in p.cells if c.n_trials), path.name


def test_every_cell_is_checked_not_only_the_searched_ones(tiny_backbone):
    """A cell without a search is checked with its own settings: one its method refuses stops the sweep up front.
    TGP-T with cached training views (which keep the split's items, so its content loss pairs them) is accepted."""
    spec = parse_spec(
        {
            "name": "t",
            "methods": ["tgpt", "coop"],
            "datasets": ["digits"],
            "shots": [1],
            "seeds": [1],
            "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
            "train": {
                "defaults": {"train_feature_views": 2},
                "methods": {"coop": {"ctx_init": "a photo of a", "n_ctx": 2}},
            },
        }
    )
    with pytest.raises(ConfigError) as err:
        check_plan(plan(spec), backbone=tiny_backbone)
    assert str(err.value).startswith(
        "cell fewshot.coop.digits.1shot: coop refuses its settings: ctx_init 'a photo of a' is 4 tokens but n_ctx=2"
    )
    ok = parse_spec(
        {
            **spec.model_dump(mode="json"),
            "train": {"defaults": {"train_feature_views": 2}, "methods": {"coop": {"n_ctx": 2}}},
        }
    )
    assert check_plan(plan(ok), backbone=tiny_backbone) == 0
