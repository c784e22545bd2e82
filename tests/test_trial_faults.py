"""Injected faults inside a trial (``TrainConfig.fault``): NaN/inf losses stop at once with error class
``nan_loss``; out-of-memory is error class ``oom``, or — with ``oom_retry`` — is retried with halved
micro-batches whose accumulated gradient equals the full batch's; and in a sweep a NaN cell fails its
trials, the other cells finish, and the report lists the failed trials and the incomplete cells."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from fewshot.errors import TrainingError
from orchestrator import checkpoint as ckpt
from orchestrator.trial import TrialRequest, run_trial

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(method="coop", dataset="digits", shots=4, seed=1, device="cpu")
TRAIN = {"epochs": 2, "batch_size": 8, "n_ctx": 4}


def _trained_ctx(tmp_path, name, **over):
    out = tmp_path / name
    final = run_trial(TrialRequest(**BASE, overrides={**TRAIN, **over}), output_dir=out)
    last = sorted((out / "checkpoints").iterdir())[-1]
    return final, ckpt.load(last)["method"]["ctx"]


@pytest.mark.parametrize("fault,shown", [("nan_loss", "nan"), ("inf_loss", "inf")])
def test_nan_or_inf_loss_stops_at_once(tiny_backbone, fault, shown):
    reports = []
    with pytest.raises(TrainingError) as err:
        run_trial(
            TrialRequest(**BASE, overrides={**TRAIN, "fault": fault, "fault_step": 3}),
            report=lambda m, d=None: reports.append(m),
        )
    assert err.value.error_class == "nan_loss"
    assert f"loss became {shown} at epoch 1 step 3" in str(err.value)
    assert reports == []  # stopped inside the first epoch (5 steps), before any epoch report


def test_oom_without_retry_is_error_class_oom(tiny_backbone):
    with pytest.raises(TrainingError) as err:
        run_trial(TrialRequest(**BASE, overrides={**TRAIN, "fault": "oom", "fault_step": 2}))
    assert err.value.error_class == "oom"
    assert "out of memory at step 2 with a micro-batch of 8" in str(err.value) and "oom_retry" in str(err.value)


def test_oom_retry_accumulates_micro_batches_to_the_same_update(tiny_backbone, tmp_path):
    ref, ctx_ref = _trained_ctx(tmp_path, "ref")
    got, ctx_got = _trained_ctx(tmp_path, "retry", fault="oom", fault_step=2, fault_oom_batch=2, oom_retry=True)
    assert "micro_batch" not in ref and got["micro_batch"] == 2  # 8 -> 4 -> 2 (fits)
    assert got["epochs_run"] == ref["epochs_run"] == 2
    assert not torch.equal(ctx_ref, torch.zeros_like(ctx_ref))
    # same effective batch: the accumulated gradient is the full batch's (up to float summation order)
    assert torch.allclose(ctx_got, ctx_ref, atol=1e-5), (ctx_got - ctx_ref).abs().max()
    with pytest.raises(TrainingError) as err:  # nothing fits: still a clear oom after reaching 1
        run_trial(TrialRequest(**BASE, overrides={**TRAIN, "fault": "oom", "fault_oom_batch": 0, "oom_retry": True}))
    assert err.value.error_class == "oom" and "micro-batch of 1" in str(err.value)


@pytest.mark.slow
def test_sweep_goes_on_past_a_nan_cell_and_reports_it(tmp_path):
    spec = {
        "name": "nan",
        "protocol": "fewshot",
        "methods": ["zeroshot", "coop"],
        "datasets": ["digits"],
        "shots": [1],
        "seeds": [1, 2],
        "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        "train": {
            "defaults": {"epochs": 1, "batch_size": 4, "num_workers": 0},
            "methods": {"coop": {"fault": "nan_loss"}},
        },
        "resources": {"cpu": 1, "gpu": 0},
        "max_retries": 1,
        "tracking": {"experiment": "nan"},
    }
    p = tmp_path / "nan.yaml"
    p.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(p),
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # finished, with failures
    assert "2 trial(s) failed" in r.stderr
    out = tmp_path / "out" / "nan"
    with pa.memory_map(str(out / "trials.arrow")) as src:
        rows = pa.ipc.open_file(src).read_all().to_pylist()
    by_method = {m: [x for x in rows if x["method"] == m] for m in ("zeroshot", "coop")}
    assert len(rows) == 4
    assert {x["status"] for x in by_method["zeroshot"]} == {"FINISHED"}
    assert {(x["status"], x["error_class"]) for x in by_method["coop"]} == {("ERROR", "nan_loss")}
    assert all("loss became nan" in x["error_message"] for x in by_method["coop"])
    report = (out / "report.md").read_text()
    assert "## Failed trials and incomplete cells" in report
    assert report.count("| fewshot.coop.digits.1shot | final |") == 2 and "nan_loss" in report
    assert "| fewshot.coop.digits.1shot | 0/2 | 2 |" in report
    assert "fewshot.zeroshot.digits.1shot | 0/2" not in report


def test_trial_past_max_trial_s_stops_with_error_class_timeout(tiny_backbone):
    reports = []
    with pytest.raises(TrainingError) as err:
        run_trial(
            TrialRequest(**BASE, overrides={**TRAIN, "max_trial_s": 1e-6}), report=lambda m, d=None: reports.append(m)
        )
    assert err.value.error_class == "timeout"
    assert "max_trial_s=1e-06 s (at epoch 1 step 1)" in str(err.value) and "raise max_trial_s" in str(err.value)
    assert reports == []
    final = run_trial(TrialRequest(**BASE, overrides={**TRAIN, "max_trial_s": 3600}))  # a limit not reached
    assert final["epochs_run"] == 2


def test_time_limit_also_stops_a_long_evaluation(tiny_backbone):
    from methods.base import TrainConfig
    from orchestrator.trial import TimeLimit, evaluate

    limit = TimeLimit(TrainConfig(max_trial_s=5), t0=0.0)  # started long ago
    loader = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(TrainingError) as err:
        evaluate(torch.nn.Identity(), loader, torch.device("cpu"), TrainConfig(), "the test split of digits", limit)
    assert err.value.error_class == "timeout" and "evaluating the test split of digits" in str(err.value)


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_max_trial_s_must_be_positive_and_finite(bad):
    from pydantic import ValidationError

    from methods.base import TrainConfig

    with pytest.raises(ValidationError):
        TrainConfig(max_trial_s=bad)


@pytest.mark.slow
def test_sweep_records_a_timed_out_trial_and_goes_on(tmp_path):
    spec = {
        "name": "slow",
        "protocol": "fewshot",
        "methods": ["zeroshot", "coop"],
        "datasets": ["digits"],
        "shots": [1],
        "seeds": [1],
        "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        "train": {
            "defaults": {"epochs": 1, "batch_size": 4, "num_workers": 0},
            "methods": {"coop": {"max_trial_s": 1e-3}},
        },
        "resources": {"cpu": 1, "gpu": 0},
        "max_retries": 1,
        "tracking": {"experiment": "slow"},
    }
    p = tmp_path / "slow.yaml"
    p.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(p),
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # finished, with a failure
    assert "1 trial(s) failed" in r.stderr
    with pa.memory_map(str(tmp_path / "out" / "slow" / "trials.arrow")) as src:
        rows = {x["method"]: x for x in pa.ipc.open_file(src).read_all().to_pylist()}
    assert rows["zeroshot"]["status"] == "FINISHED"
    assert (rows["coop"]["status"], rows["coop"]["error_class"]) == ("ERROR", "timeout")
    assert "max_trial_s=0.001" in rows["coop"]["error_message"]
