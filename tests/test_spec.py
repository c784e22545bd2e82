"""Spec validation: every malformed spec in tests/specs/bad/ is a one-line ConfigError naming the offending
key (loader directly), a few through the CLI (exit 2, `error: ...`, no traceback, no output dir); demo.yaml loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot.errors import ConfigError
from orchestrator.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((Path(__file__).parent / "specs" / "bad").glob("*.yaml"))


def _expect(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: ")
    return first[len("# expect: ") :]


def test_corpus_is_big_enough():
    assert len(BAD) >= 45


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_spec_names_the_key(path):
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    msg = str(exc.value)
    assert _expect(path) in msg, msg
    assert "\n" not in msg.strip()


@pytest.mark.parametrize("name", ["low_not_below_high", "unknown_top_key", "unknown_method", "invalid_yaml"])
def test_cli_bad_spec_exit_2_one_line(tmp_path, name):
    path = Path(__file__).parent / "specs" / "bad" / f"{name}.yaml"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(path), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and _expect(path) in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_bad_flag_exit_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(ROOT / "search_spaces" / "demo.yaml"),
            "--max-concurrent",
            "0",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: --max-concurrent") and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_demo_spec_loads_and_is_offline():
    from fewshot.offline import is_offline

    s = load_spec(ROOT / "search_spaces" / "demo.yaml")
    assert s.backbone.arch == "promptsweep-mini" and s.backbone.pretrained == "promptsweep"  # project-pretrained
    assert {"zeroshot", "coop"} <= set(s.methods) and all(is_offline(d) for d in s.all_datasets())
    assert set(s.protocol) == {"fewshot", "base2novel"}
    assert len(s.shots) >= 2 and s.search["coop"].n_trials >= 1


def test_demo_runs_every_method_that_supports_its_protocols():
    from methods.registry import get_method, method_names

    s = load_spec(ROOT / "search_spaces" / "demo.yaml")
    both = {m for m in method_names() if set(s.protocol) <= set(get_method(m).protocols)}
    assert set(s.methods) == both


def test_trials_per_gpu_packs_k_trials_per_device():
    from orchestrator.planner import plan

    s = parse_spec(
        {"name": "p", "methods": ["coop"], "datasets": ["digits"], "resources": {"cpu": 2, "trials_per_gpu": 4}}
    )
    assert s.resources.gpu == 0.25
    assert "per trial cpu=2 gpu=0.25" in plan(s).describe()
    assert (
        parse_spec(
            {"name": "p", "methods": ["coop"], "datasets": ["digits"], "resources": {"gpu": 0.5, "trials_per_gpu": 2}}
        ).resources.gpu
        == 0.5
    )


def test_conditional_space_and_hash():
    data = {
        "name": "t",
        "methods": ["coop"],
        "datasets": ["digits"],
        "search": {
            "coop": {
                "n_trials": 2,
                "space": {
                    "csc": {"type": "categorical", "choices": [False, True]},
                    "class_token_position": {
                        "type": "categorical",
                        "choices": ["end", "front"],
                        "when": {"csc": [True]},
                    },
                },
            }
        },
    }
    a = parse_spec(data)
    assert a.spec_hash() == parse_spec(data).spec_hash()
    b = parse_spec(dict(data, shots=[1, 2]))
    assert a.spec_hash() != b.spec_hash()
    assert a.protocol == ["fewshot"]


def test_report_names_a_baseline_and_changes_no_trial():
    """``report`` is how the results are read: a baseline for all protocols or one per protocol; it is not in
    the spec hash, and a resumed sweep does not call a changed ``report`` a changed spec."""
    from orchestrator.growth import compare

    data = {"name": "t", "protocol": ["fewshot", "base2novel"], "methods": ["zeroshot", "coop"], "datasets": ["digits"]}
    plain = parse_spec(data)
    assert plain.report.baseline is None and plain.report.baseline_for("fewshot") is None
    one = parse_spec(dict(data, report={"baseline": "coop"}))
    assert one.report.baseline_for("fewshot") == one.report.baseline_for("base2novel") == "coop"
    per = parse_spec(dict(data, report={"baseline": {"base2novel": "zeroshot"}, "unstable": {"max_std": 2.5}}))
    assert per.report.baseline_for("base2novel") == "zeroshot" and per.report.baseline_for("fewshot") is None
    assert per.report.unstable.max_std == 2.5 and per.report.unstable.mads == 3.5  # the documented defaults
    assert plain.spec_hash() == one.spec_hash() == per.spec_hash()
    unchanged = compare(one.normalized(), per, [])
    assert unchanged.refused == [] and not unchanged.grows
    assert compare({k: v for k, v in plain.normalized().items() if k != "report"}, one, []).refused == []
    row = {"cell_id": "fewshot.coop.digits.16shot", "stage": "final", "seed": 3}
    assert compare(one.normalized(), parse_spec(dict(data, seeds=[1], report={"baseline": "coop"})), [row]).refused
