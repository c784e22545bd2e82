"""MLflow tracking callback driven with fake Tune trials against a SQLite store: nesting, tags, metrics,
status, and state round-trip (a restored callback reuses its runs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from fewshot.errors import ConfigError
from orchestrator.mlflow_uri import resolve_tracking_uri
from orchestrator.tracking import MlflowTracking


def _trial(tid, stage="search", seed=1, last=None):
    req = {
        "method": "coop",
        "dataset": "digits",
        "shots": 2,
        "seed": seed,
        "protocol": "fewshot",
        "stage": stage,
        "overrides": {"lr": 0.01, "epochs": 1},
    }
    cfg = {
        "cell_id": "fewshot.coop.digits.2shot",
        "stage": stage,
        "seed": seed,
        "optuna_number": 0,
        "params": {"lr": 0.01},
        "request": req,
    }
    return SimpleNamespace(trial_id=tid, config=cfg, last_result=last or {})


@pytest.mark.parametrize("background", [False, True], ids=["inline", "sender-thread"])
def test_runs_nested_tagged_and_closed(tmp_path, background):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cb = MlflowTracking(uri, "exp", "t", "hash1", background=background)
    t1, t2 = _trial("a"), _trial("b", stage="final", seed=2)
    cb.on_trial_start(0, [], t1)
    cb.on_trial_start(0, [], t2)
    for ep in range(2):
        cb.on_trial_result(0, [], t1, {"epoch": ep, "val_acc": 10.0 + ep, "train_loss": 1.0, "pid": 3, "note": "x"})
    t1.last_result = {"val_acc": 11.0}
    cb.on_trial_complete(0, [], t1)
    t2.last_result = {"trial_failed": 1, "error_class": "nan_loss", "error_message": "NaN"}
    cb.on_trial_error(0, [], t2)
    cb.finish()
    c = MlflowClient(uri)
    r1, r2 = c.get_run(cb.trial_run_id("a")), c.get_run(cb.trial_run_id("b"))
    cell = c.get_run(r1.data.tags["mlflow.parentRunId"])
    assert cell.data.tags["mlflow.parentRunId"] == cb.state["parent"]
    assert r2.data.tags["mlflow.parentRunId"] == cell.info.run_id
    for k, v in {
        "method": "coop",
        "dataset": "digits",
        "shots": "2",
        "seed": "1",
        "stage": "search",
        "protocol": "fewshot",
    }.items():
        assert r1.data.tags[k] == v
    assert "config_hash" in r1.data.tags and "git_commit" in r1.data.tags
    assert r1.data.params["hp.lr"] == "0.01"
    # the full configuration the trial runs with: defaults for its cell, then its overrides
    assert r1.data.params["train.lr"] == "0.01" and r1.data.params["train.epochs"] == "1"
    assert r1.data.params["method.n_ctx"] == "16" and r1.data.params["train.batch_size"] == "32"
    hist = c.get_metric_history(r1.info.run_id, "val_acc")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 10.0), (1, 11.0)]
    assert "pid" not in r1.data.metrics
    assert r1.info.status == "FINISHED" and r2.info.status == "FAILED"
    assert r2.data.tags["error_class"] == "nan_loss" and r2.data.tags["error_message"] == "NaN"
    assert "epoch" not in r1.data.metrics  # the step of each point, not a series
    assert c.get_run(cb.state["parent"]).info.status == "FINISHED"


def test_cell_runs_hold_their_figures_hyperparameters_and_own_status(tmp_path):
    from orchestrator.tracking import cell_summary

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cb = MlflowTracking(uri, "exp", "t", "h")
    cb.on_trial_start(0, [], _trial("a", stage="final"))
    other = _trial("b", stage="final")
    other.config = dict(other.config, cell_id="fewshot.coop.shapes.2shot")
    cb.on_trial_start(0, [], other)
    rows = {
        "fewshot.coop.digits.2shot": {
            "cell_id": "fewshot.coop.digits.2shot",
            "n": 3,
            "n_failed": 0,
            "params_json": '{"lr": 0.01, "n_ctx": 4}',
            "test_acc_mean": 61.5,
            "test_acc_std": 1.25,
            "hm_mean": None,
            "search_trials": 4,
            "search_best_val": 70.0,
        },
        "fewshot.coop.shapes.2shot": {
            "cell_id": "fewshot.coop.shapes.2shot",
            "n": 1,
            "n_failed": 2,
            "params_json": None,
            "test_acc_mean": 40.0,
            "test_acc_std": None,
        },
    }
    spec = {
        "name": "t",
        "methods": ["coop"],
        "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        "search": {"coop": {"space": {f"p{i}": {"type": "float", "low": 0, "high": 1} for i in range(40)}}},
    }
    cb.finish(
        "FAILED",
        cells={cid: cell_summary(r, 3) for cid, r in rows.items()},
        metrics={"trials_finished": 6, "trials_failed": 2},
        spec=spec,
    )
    c = MlflowClient(uri)
    good = c.get_run(cb.state["cells"]["fewshot.coop.digits.2shot"])
    assert good.info.status == "FINISHED"  # its own status, not the sweep's FAILED
    assert good.data.metrics == {
        "n": 3,
        "n_failed": 0,
        "test_acc_mean": 61.5,
        "test_acc_std": 1.25,
        "search_trials": 4,
        "search_best_val": 70.0,
    }
    assert good.data.params == {"hp.lr": "0.01", "hp.n_ctx": "4"}
    bad = c.get_run(cb.state["cells"]["fewshot.coop.shapes.2shot"])
    assert bad.info.status == "FAILED" and bad.data.metrics["n_failed"] == 2
    sweep = c.get_run(cb.state["parent"])
    assert sweep.info.status == "FAILED" and sweep.data.metrics == {"trials_finished": 6, "trials_failed": 2}
    # the sweep's settings as params (the runs table can show and compare them), past 100 per batch
    assert sweep.data.params["methods"] == '["coop"]' and sweep.data.params["backbone.arch"] == "promptsweep-tiny"
    assert sweep.data.params["search.coop.space.p39.high"] == "1" and len(sweep.data.params) == 4 + 40 * 3


def test_restored_state_reuses_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cb = MlflowTracking(uri, "exp", "t", "h")
    cb.on_trial_start(0, [], _trial("a"))
    state = cb.get_state()
    cb2 = MlflowTracking(uri, "exp", "t", "h")
    cb2.set_state(state)
    cb2.on_trial_start(0, [], _trial("a"))
    cb2.on_trial_start(0, [], _trial("b", seed=2))
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("exp")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 4  # parent, cell, trial a (reused), trial b
    assert cb2.trial_run_id("a") == cb.trial_run_id("a")


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(None, "sqlite:////x/spec.db") == "sqlite:////x/spec.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, "sqlite:////x/spec.db") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////x/flag.db", None) == "sqlite:////x/flag.db"
    with pytest.raises(ConfigError):
        resolve_tracking_uri("file:///tmp/mlruns", None)


def test_a_restored_tracker_reuses_a_trial_run_created_after_the_last_saved_state(tmp_path):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import MlflowTracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = {
        "cell_id": "fewshot.coop.digits.1shot",
        "stage": "final",
        "seed": 1,
        "optuna_number": None,
        "request": {
            "method": "coop",
            "dataset": "digits",
            "shots": 1,
            "seed": 1,
            "protocol": "fewshot",
            "stage": "final",
            "overrides": {},
        },
    }
    trial = SimpleNamespace(trial_id="t1", config=cfg, last_result={})
    first = MlflowTracking(uri, "restore", "sw", "h")
    saved = first.get_state()  # Tune's last snapshot: before the trial started
    first.on_trial_start(0, [], trial)  # the run is created, then the driver dies
    created = first.trial_run_id("t1")
    again = MlflowTracking(uri, "restore", "sw", "h")
    again.set_state(saved)
    again.on_trial_start(0, [], trial)  # the restored sweep starts the trial again
    assert again.trial_run_id("t1") == created
    exp = MlflowClient(uri).get_experiment_by_name("restore")
    runs = MlflowClient(uri).search_runs([exp.experiment_id], "tags.tune_trial_id = 't1'")
    assert len(runs) == 1


def test_sweep_driver_turns_mlflow_telemetry_off_unless_the_user_chose(monkeypatch, tmp_path):
    """MLflow 3 sends usage telemetry (and spends seconds retrying at exit where no internet is reachable):
    the sweep command sets MLFLOW_DISABLE_TELEMETRY=true, and keeps a value the user set."""
    import os

    from mlflow.telemetry.utils import is_telemetry_disabled

    from orchestrator import sweep

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    assert sweep.main([str(tmp_path / "missing.yaml"), "--dry-run"]) == 2  # a user error: still set first
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and is_telemetry_disabled()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    sweep.main([str(tmp_path / "missing.yaml"), "--dry-run"])
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_background_hooks_never_wait_for_the_server_and_everything_goes_out_in_order(tmp_path):
    """With the sweep driver's sender thread a hook only queues: here every send is held at a gate
    (a server that does not answer), yet all hooks of a trial return; once the gate opens the queue
    drains in submission order, and a Tune snapshot taken meanwhile (get_state) holds what is unsent."""
    import threading

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cb = MlflowTracking(uri, "exp", "t", "h", background=True)
    gate, sent = threading.Event(), []
    real_send = cb.sender._send

    def held_send(op):
        gate.wait(timeout=20)  # (a regression to inline sends fails below instead of hanging)
        real_send(op)
        sent.append((op.KIND, op.key))

    cb.sender._send = held_send
    t = _trial("a", stage="final")
    cb.on_trial_start(0, [], t)
    for ep in range(3):
        cb.on_trial_result(0, [], t, {"epoch": ep, "val_acc": 10.0 + ep})
    t.last_result = {"val_acc": 12.0}
    cb.on_trial_complete(0, [], t)
    cb.on_step_end(0, [])
    assert sent == [] and not gate.is_set()  # every hook returned while the first send is still held
    snapshot = cb.get_state()
    assert len(snapshot["pending"]) >= 7 and snapshot["trials"] == {"a": None}
    gate.set()
    cb.finish()
    assert cb.sender.pending == [] and cb.sender._thread is None
    keys = [k for _, k in sent]
    assert keys.index("sweep") < keys.index("cell:fewshot.coop.digits.2shot") < keys.index("trial:a")
    trial_ops = [o for o, k in sent if k == "trial:a"]
    assert trial_ops[0] == "create" and trial_ops[-1] == "end" and set(trial_ops[1:-1]) == {"log"}
    c = MlflowClient(uri)
    run = c.get_run(cb.trial_run_id("a"))
    assert run.info.status == "FINISHED"
    assert sorted(m.value for m in c.get_metric_history(run.info.run_id, "val_acc")) == [10.0, 11.0, 12.0]


def test_background_tracker_pickles_without_its_thread(tmp_path):
    """Tune pickles its callbacks (tuner.pkl); a restored one starts its own sender when it is needed."""
    import pickle

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cb = MlflowTracking(uri, "exp", "t", "h", background=True)
    cb.on_trial_start(0, [], _trial("a"))
    cb2 = pickle.loads(pickle.dumps(cb))
    assert cb2.sender._thread is None and cb2.sender.background
    cb.finish()
    cb2.set_state(cb.get_state())
    b = _trial("b")
    cb2.on_trial_start(0, [], b)
    cb2.on_trial_complete(0, [], b)
    cb2.finish()
    c = MlflowClient(uri)
    assert c.get_run(cb2.trial_run_id("a")).info.run_id == cb.trial_run_id("a")
    assert c.get_run(cb2.trial_run_id("b")).info.status == "FINISHED"


def test_queued_operations_keep_their_saved_form_and_older_states_load(tmp_path):
    """Operations are saved as the JSON dicts Tune's callback state and the backlog have always held: each
    kind reads back equal, and a state saved before the operations were typed (fewer fields) loads."""
    from orchestrator.mlflow_sender import (
        CreateRun,
        LogArtifact,
        LogBatch,
        LogDict,
        ReopenRun,
        SetTerminated,
        operation_from_dict,
    )

    ops = [
        CreateRun(key="cell:c", name="c", tags={"a": "1"}, parent="sweep"),
        LogBatch(key="trial:t", metrics=[["val_acc", 1.0, 5, 0]], params={"p": "1"}),
        SetTerminated(key="sweep", status="FAILED"),
        LogArtifact(key="sweep", path="/x/report.md", dir=None),
        LogDict(key="sweep", data={"k": [1]}, file="spec.json"),
        ReopenRun(key="sweep"),
    ]
    for op in ops:
        assert operation_from_dict(op.to_dict()) == op
    old = {
        "parent": None,
        "cells": {"c": None},
        "trials": {},
        "closed": [],
        "experiment_id": None,
        "rejected": [],
        "pending": [
            {
                "op": "create",
                "key": "cell:c",
                "name": "c",
                "tags": {},
                "parent": None,
                "start_time": 1,
                "tried": False,
                "id": "i1",
                "t": 1,
            },
            {"op": "log", "key": "cell:c", "metrics": [["m", 2.0, 1, 0]], "id": "i2", "t": 2},
        ],
    }
    cb = MlflowTracking(f"sqlite:///{tmp_path}/mlflow.db", "exp", "t", "h")
    cb.set_state(old)
    assert [type(op).__name__ for op in cb.sender.pending] == ["CreateRun", "LogBatch"]
    assert cb.sender.pending[0].tried  # a saved create may have reached the server: looked up first
    cb.ensure_parent()
    cb.finish()
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(cb.state["cells"]["c"])
    assert run.data.metrics["m"] == 2.0 and run.info.status == "FINISHED"


def test_a_tracker_pickled_before_the_queue_had_its_own_object_restores(tmp_path):
    """tuner.pkl of a sweep started by the previous version holds the queue inside the tracker's state."""
    cb = MlflowTracking(f"sqlite:///{tmp_path}/mlflow.db", "exp", "t", "h")
    d = cb.__getstate__()
    d.pop("sender")
    d["state"] = dict(d["state"], pending=[{"op": "reopen", "key": "sweep", "id": "r", "t": 1}], rejected=[])
    old = MlflowTracking.__new__(MlflowTracking)
    old.__setstate__(d)
    assert [op.KIND for op in old.sender.pending] == ["reopen"] and "pending" not in old.state
    assert old.sender.runs is old
