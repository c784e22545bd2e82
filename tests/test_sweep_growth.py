"""A sweep that has run continues: failed trials retried (``--retry-failed``), the spec grown (a seed, a dataset, a
method), cells restarted (``--restart-cells``) — each through the real CLI on local Ray, counting every trial
that starts (Tune makes a folder per trial) and every MLflow run, so that nothing finished runs again and no
run is duplicated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

SPEC = {
    "name": "grow",
    "protocol": "fewshot",
    "methods": ["zeroshot", "coop"],
    "datasets": ["digits"],
    "shots": [1],
    "seeds": [1, 2],
    "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
    "train": {"defaults": {"epochs": 1, "batch_size": 16, "num_workers": 0}},
    "search": {
        "coop": {
            "n_trials": 2,
            "seeds": [1],
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 1},
            "space": {"lr": {"type": "float", "low": 0.0005, "high": 0.05, "log": True}},
        }
    },
    "resources": {"cpu": 1, "gpu": 0},
    "tracking": {"experiment": "grow"},
}
#: CoOp's final runs fail (NaN loss) in the first run only: the fault is injected from outside the spec
FAULT = {"PROMPTSWEEP_FAULT_INJECT": "method=coop,stage=final,fault=nan_loss"}


def _cli(tmp: Path, spec: dict, *flags: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", **(env_extra or {}))
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", *([] if env_extra else FAULT)):
        env.pop(k, None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(path),
            "--output",
            str(tmp / "out"),
            "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db",
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=900,
    )


def _rows(tmp: Path) -> dict[str, dict]:
    import pyarrow.feather as feather

    return {r["tune_trial_id"]: r for r in feather.read_table(tmp / "out" / "grow" / "trials.arrow").to_pylist()}


def _started(tmp: Path) -> set[str]:
    """Every trial Tune started in this sweep (one folder each)."""
    return {p.name for p in (tmp / "out" / "grow" / "tune").iterdir() if p.is_dir()}


def _runs(tmp: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    return c.search_runs([c.get_experiment_by_name("grow").experiment_id], max_results=1000)


def test_retry_failed_then_grow_then_restart_runs_only_what_is_new(tmp_path):
    from orchestrator.planner import plan
    from orchestrator.spec import parse_spec

    r = _cli(tmp_path, SPEC, env_extra=FAULT)
    assert r.returncode == 1 and "2 trial(s) failed" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    first = _rows(tmp_path)
    failed = {tid: row for tid, row in first.items() if row["status"] == "ERROR"}
    assert len(first) == 6 and len(failed) == 2 and {r["error_class"] for r in failed.values()} == {"nan_loss"}
    assert _started(tmp_path) == set(first)

    # a plain rerun keeps the failures (and runs nothing); --retry-failed runs exactly them again
    r = _cli(tmp_path, SPEC)
    assert r.returncode == 0 and "already finished" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    r = _cli(tmp_path, SPEC, "--retry-failed")
    assert r.returncode == 0 and "retrying 2 failed trial(s)" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    retried = _rows(tmp_path)
    new = {tid: row for tid, row in retried.items() if tid not in first}
    assert len(retried) == 6 and not set(failed) & set(retried)  # each new attempt replaced its failed row
    assert {row["retry_of_trial"] for row in new.values()} == set(failed)
    assert all(row["status"] == "FINISHED" for row in retried.values())
    for tid, row in first.items():  # everything else stands as it was
        if tid not in failed:
            assert retried[tid]["finished_at"] == row["finished_at"]
    assert _started(tmp_path) == set(first) | set(new)  # only the two retries started
    runs = _runs(tmp_path)
    by_id = {x.info.run_id: x for x in runs}
    for row in new.values():
        old_run = failed[row["retry_of_trial"]]["mlflow_run_id"]
        assert by_id[row["mlflow_run_id"]].data.tags["retry_of"] == old_run
        assert by_id[old_run].info.status == "FAILED"  # the failed attempt's run stays, closed

    # grow: a seed, a dataset and a method; only the new work runs
    grown = dict(SPEC, seeds=[1, 2, 3], datasets=["digits", "shapes"], methods=["zeroshot", "coop", "kgcoop"])
    n_grown = plan(parse_spec(grown)).n_trials
    before, started_before = _rows(tmp_path), _started(tmp_path)
    r = _cli(tmp_path, grown)
    assert r.returncode == 0 and "growing sweep 'grow'" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    after = _rows(tmp_path)
    assert len(after) == n_grown and all(row["status"] == "FINISHED" for row in after.values())
    for tid, row in before.items():
        assert after[tid]["finished_at"] == row["finished_at"]
    assert _started(tmp_path) - started_before == set(after) - set(before)  # no earlier trial started again
    work = [(x["cell_id"], x["stage"], x["seed"], x["optuna_trial_number"]) for x in after.values()]
    assert len(set(work)) == len(work)
    coop_finals = {
        x["optuna_trial_number"]
        for x in after.values()
        if x["cell_id"] == "fewshot.coop.digits.1shot" and x["stage"] == "final"
    }
    assert len(coop_finals) == 1  # seed 3 ran with the proposal seeds 1 and 2 ran with
    runs = _runs(tmp_path)
    trial_runs = [x for x in runs if x.data.tags.get("level") == "trial"]
    assert len(trial_runs) == len(after) + len(failed)  # one per trial that ran; the two failed attempts kept
    assert len({x.data.tags["tune_trial_id"] for x in trial_runs}) == len(trial_runs)
    cell_runs = [x.data.tags["cell_id"] for x in runs if x.data.tags.get("level") == "cell"]
    assert sorted(cell_runs) == sorted(set(cell_runs)) and len(cell_runs) == 6  # no cell run duplicated
    assert [x.info.status for x in runs if x.data.tags.get("level") == "sweep"] == ["FINISHED"]
    assert {x.info.status for x in runs if x.data.tags.get("level") == "cell"} == {"FINISHED"}

    # restart one cell: its trials and its study go, they run again; nothing else does
    r = _cli(tmp_path, grown, "--restart-cells", "fewshot.kgcoop.*")
    assert r.returncode == 0 and "restarting 2 cell(s)" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    restarted = _rows(tmp_path)
    kg_before = {tid for tid, x in after.items() if x["method"] == "kgcoop"}
    kg_after = {tid for tid, x in restarted.items() if x["method"] == "kgcoop"}
    assert len(restarted) == n_grown and len(kg_after) == len(kg_before) == 6 and not kg_before & kg_after
    for tid, row in after.items():
        if row["method"] != "kgcoop":
            assert restarted[tid]["finished_at"] == row["finished_at"]
