"""MLflow tracking server outages: unreachable at start is a one-line error before any trial; down
mid-sweep, trials go on, trials.arrow stays complete and tracking catches up when the server returns
(or ``tracking_backlog.json`` lists exactly what was not logged, and a rerun logs it) — never a
duplicate run.

Servers are ``mlflow server`` processes on 127.0.0.1 started here (tests/servers.py), killed and
stopped by PID; Ray runs on 127.0.0.2 (orchestrator.tune_runner.ensure_ray).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.servers import REPO, MlflowServer, env_with_venv, free_port, kill_server


def _trial(tid, shots=2, seed=1, stage="final"):
    req = {
        "method": "coop",
        "dataset": "digits",
        "shots": shots,
        "seed": seed,
        "protocol": "fewshot",
        "stage": stage,
        "overrides": {"lr": 0.01},
    }
    cfg = {
        "cell_id": f"fewshot.coop.digits.{shots}shot",
        "stage": stage,
        "seed": seed,
        "optuna_number": None,
        "params": {},
        "request": req,
    }
    return SimpleNamespace(trial_id=tid, config=cfg, last_result={})


def _trial_runs(uri, experiment):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000) if exp else []
    by_level: dict[str, list] = {}
    for r in runs:
        by_level.setdefault(r.data.tags.get("level"), []).append(r)
    return c, by_level


def _lifecycle(cb, t, fail=False, timings=None):
    """start -> two epochs -> complete/error, each hook timed."""
    calls = [lambda: cb.on_trial_start(0, [], t)]
    calls += [
        lambda ep=ep: cb.on_trial_result(0, [], t, {"epoch": ep, "val_acc": 10.0 + ep, "pid": 1}) for ep in range(2)
    ]
    if fail:
        t.last_result = {"trial_failed": 1, "error_class": "nan_loss", "error_message": "NaN loss"}
        calls.append(lambda: cb.on_trial_error(0, [], t))
    else:
        t.last_result = {"val_acc": 11.0, "final": 1}
        calls.append(lambda: cb.on_trial_complete(0, [], t))
    for call in calls:
        t0 = time.perf_counter()
        call()
        cb.on_step_end(0, [])
        if timings is not None:
            timings.append(time.perf_counter() - t0)


def test_unreachable_server_at_start_is_one_line_before_any_trial(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "down",
                "protocol": "fewshot",
                "methods": ["zeroshot"],
                "datasets": ["digits"],
                "shots": [1],
                "seeds": [1],
                "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
                "resources": {"cpu": 1, "gpu": 0},
                "tracking": {"experiment": "down"},
            }
        )
    )
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(spec),
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            uri,
        ],
        cwd=tmp_path,
        env=env_with_venv(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and uri in lines[0], p.stderr
    assert "not reachable" in lines[0] and "--tracking-uri sqlite:///" in lines[0]
    assert "at a time" not in p.stdout  # the line printed when trials are about to start
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
    assert took < 120


def test_created_run_whose_answer_was_lost_is_not_created_twice(tmp_path):
    """A create that reached the store but whose reply was lost (timeout) is found by its tag on retry."""
    from mlflow.exceptions import MlflowException

    from orchestrator.tracking import MlflowTracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cb = MlflowTracking(uri, "lost", "lost", "h")
    cb.ensure_parent()
    real = cb.client.create_run

    def create_then_lose_reply(*a, **kw):
        real(*a, **kw)
        raise MlflowException("API request to http://x/api/2.0/mlflow/runs/create failed with timeout exception")

    cb.client.create_run = create_then_lose_reply
    t = _trial("x")
    cb.on_trial_start(0, [], t)  # the cell's create "fails" after reaching the store
    assert cb.sender.pending and cb.trial_run_id("x") is None
    cb.client.create_run = real
    _lifecycle(cb, t)
    cb.finish()
    assert not cb.sender.pending
    _, runs = _trial_runs(uri, "lost")
    assert len(runs["cell"]) == 1 and len(runs["trial"]) == 1 and len(runs["sweep"]) == 1
    assert runs["trial"][0].info.run_id == cb.trial_run_id("x")
    assert runs["trial"][0].data.tags["mlflow.parentRunId"] == runs["cell"][0].info.run_id


def test_backlog_file_and_an_older_tune_state_merge_without_duplicates(tmp_path, monkeypatch):
    """Driver restart after an outage: the backlog file (newer) and Tune's restored state (older) unite."""
    from orchestrator.mlflow_backlog import BACKLOG_FILE
    from orchestrator.mlflow_uri import DRIVER_HTTP_ENV, make_client
    from orchestrator.tracking import MlflowTracking

    for k, v in DRIVER_HTTP_ENV.items():
        monkeypatch.setenv(k, v)
    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    out.mkdir()
    cb = MlflowTracking(uri, "merge", "m", "h", out_dir=out)
    cb.ensure_parent()
    t1, t2 = _trial("t1"), _trial("t2", seed=2)
    cb.on_trial_start(0, [], t1)
    older = cb.get_state()  # what Tune checkpointed
    cb._client = make_client(f"http://127.0.0.1:{free_port()}")  # the store goes away
    cb.on_trial_result(0, [], t1, {"epoch": 0, "val_acc": 10.0})
    cb.on_trial_start(0, [], t2)
    t1.last_result = t2.last_result = {"final": 1}
    cb.on_trial_complete(0, [], t1)
    cb.on_trial_complete(0, [], t2)
    assert cb.finish() == out / BACKLOG_FILE
    assert json.loads((out / BACKLOG_FILE).read_text())["trials"] == ["t1", "t2"]

    cb2 = MlflowTracking(uri, "merge", "m", "h", parent_run_id=cb.state["parent"], out_dir=out)  # loads the file
    cb2.set_state(older)
    assert [op.id for op in cb2.sender.pending] == [op.id for op in cb.sender.pending]
    cb2.ensure_parent()
    assert not cb2.sender.pending
    cb2.finish()
    assert not (out / BACKLOG_FILE).exists()
    c, runs = _trial_runs(uri, "merge")
    assert sorted(r.data.tags["tune_trial_id"] for r in runs["trial"]) == ["t1", "t2"]
    assert len(runs["cell"]) == 1 and len(runs["sweep"]) == 1
    assert all(r.info.status == "FINISHED" for r in runs["trial"] + runs["cell"] + runs["sweep"])
    assert [m.value for m in c.get_metric_history(cb2.trial_run_id("t1"), "val_acc")] == [10.0]


@pytest.mark.slow
def test_callback_rides_out_a_server_crash_and_a_driver_restart(tmp_path):
    from orchestrator.mlflow_backlog import BACKLOG_FILE, replay_backlog
    from orchestrator.results import trial_row, write_results
    from orchestrator.tracking import MlflowTracking

    out = tmp_path / "out"
    out.mkdir()
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        cb = MlflowTracking(server.uri, "outage", "unit", "h", out_dir=out)
        cb.ensure_parent()
        trials = {
            tid: _trial(tid, shots=4 if tid == "t3" else 2, seed=i + 1)
            for i, tid in enumerate(["t1", "t2", "t3", "t4", "t5"])
        }
        _lifecycle(cb, trials["t1"])
        assert not cb.sender.pending and cb.trial_run_id("t1")

        assert kill_server(server) == []
        down: list[float] = []
        _lifecycle(cb, trials["t2"], timings=down)
        _lifecycle(cb, trials["t3"], fail=True, timings=down)  # a new cell (placeholder) while down
        assert max(down) < 2.0, down  # no MLflow retry/backoff stall in the Tune loop
        assert cb.trial_run_id("t2") is None and cb.state["cells"]["fewshot.coop.digits.4shot"] is None
        queued = len(cb.sender.pending)
        assert queued >= 10

        cb2 = MlflowTracking(server.uri, "outage", "unit", "h", parent_run_id=cb.state["parent"], out_dir=out)
        cb2.set_state(cb.get_state())  # the driver restarted: the queue comes back with Tune's state
        cb2.sender.retry_interval_s = 0.0
        assert len(cb2.sender.pending) == queued
        server.start()
        _lifecycle(cb2, trials["t4"])  # the first hook sends the queue, then t4 goes straight out
        assert not cb2.sender.pending and all(cb2.trial_run_id(t) for t in ("t1", "t2", "t3", "t4"))

        assert kill_server(server) == []
        _lifecycle(cb2, trials["t5"])
        rows = [
            trial_row(
                t.config, t.last_result, status="FINISHED", tune_trial_id=tid, mlflow_run_id=cb2.trial_run_id(tid)
            )
            for tid, t in trials.items()
        ]
        write_results(out, rows, {"sweep": "unit"})
        t0 = time.perf_counter()
        path = cb2.finish()
        assert time.perf_counter() - t0 < 5
        assert path == out / BACKLOG_FILE
        backlog = json.loads(path.read_text())
        assert backlog["trials"] == ["t5"]  # exactly the trial with unlogged operations
        assert {m["run"] for m in backlog["missing"]} == {
            "trial:t5",
            "cell:fewshot.coop.digits.2shot",
            "cell:fewshot.coop.digits.4shot",
            "sweep",
        }

        server.start()
        assert replay_backlog(out) == 0  # what a rerun of a finished sweep does
        assert not path.exists()

        c, runs = _trial_runs(server.uri, "outage")
        got = {r.data.tags["tune_trial_id"]: r for r in runs["trial"]}
        assert len(runs["trial"]) == 5 and set(got) == set(trials)  # each trial once
        assert len(runs["cell"]) == 2 and len(runs["sweep"]) == 1
        cells = {r.data.tags["cell_id"]: r.info.run_id for r in runs["cell"]}
        for tid, r in got.items():
            assert tid == "t5" or r.info.run_id == cb2.trial_run_id(tid)  # t5's run was made by the replay
            assert r.info.status == ("FAILED" if tid == "t3" else "FINISHED")
            assert r.data.tags["mlflow.parentRunId"] == cells[trials[tid].config["cell_id"]]
            assert r.data.tags["seed"] == str(trials[tid].config["seed"]) and r.data.params["hp.lr"] == "0.01"
            hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "val_acc"))
            assert hist == [(0, 10.0), (1, 11.0)]
        assert got["t3"].data.tags["error_class"] == "nan_loss"
        assert all(r.info.status == "FINISHED" for r in runs["cell"] + runs["sweep"])
        assert {r.data.tags["mlflow.parentRunId"] for r in runs["cell"]} == {runs["sweep"][0].info.run_id}

        from orchestrator.results import read_table

        t = read_table(out / "trials.arrow").to_pylist()
        assert {r["tune_trial_id"]: r["mlflow_run_id"] for r in t} == {k: v.info.run_id for k, v in got.items()}
    finally:
        assert server.stop() == []


# --- end to end -----------------------------------------------------------------------------------

SPEC = {
    "name": "outage",
    "protocol": "fewshot",
    "methods": ["zeroshot", "coop"],
    "datasets": ["digits"],
    "shots": [1],
    "seeds": [1, 2, 3],
    "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
    "train": {"defaults": {"epochs": 2, "batch_size": 16, "num_workers": 0}},
    "resources": {"cpu": 1, "gpu": 0},
    "max_retries": 0,
    "tracking": {"experiment": "outage"},
}
N_TRIALS = 6


def _sweep(tmp: Path, uri: str, coop_epochs: int = 2) -> subprocess.Popen:
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump(dict(SPEC, train=dict(SPEC["train"], methods={"coop": {"epochs": coop_epochs}}))))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(spec),
            "--output",
            str(tmp / "out"),
            "--tracking-uri",
            uri,
            "--max-concurrent",
            "2",
        ],
        cwd=REPO,
        env=env_with_venv(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rows(out_dir: Path) -> list[dict]:
    from orchestrator.results import read_table

    p = out_dir / "trials.arrow"
    try:
        return read_table(p).to_pylist() if p.exists() else []
    except OSError:
        return []


def _kill_after_first_trial(proc: subprocess.Popen, server: MlflowServer, out_dir: Path) -> int:
    deadline = time.monotonic() + 400
    while not _rows(out_dir):
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before a trial finished"
        time.sleep(0.2)
    assert kill_server(server) == []
    return len(_rows(out_dir))


def _check_complete(out_dir: Path, uri: str) -> None:
    rows = _rows(out_dir)
    assert len(rows) == N_TRIALS and len({r["tune_trial_id"] for r in rows}) == N_TRIALS
    assert {r["status"] for r in rows} == {"FINISHED"}
    _, runs = _trial_runs(uri, "outage")
    got = {}
    for r in runs["trial"]:
        assert r.data.tags["tune_trial_id"] not in got, "duplicate trial run"
        got[r.data.tags["tune_trial_id"]] = r
    assert set(got) == {r["tune_trial_id"] for r in rows}
    assert all(r.info.status == "FINISHED" for r in runs["trial"] + runs["cell"] + runs["sweep"])
    assert len(runs["cell"]) == 2 and len(runs["sweep"]) == 1
    assert {r["tune_trial_id"]: r["mlflow_run_id"] for r in rows} == {k: v.info.run_id for k, v in got.items()}


@contextmanager
def _sweep_losing_its_server_after_the_first_trial(tmp_path, **sweep_kw):
    """A sweep against a fresh MLflow server that is killed once the first trial finished; yields
    (server, sweep process, out_dir) and stops exactly those processes afterwards."""
    server = MlflowServer(tmp_path / "mlflow").start()
    proc = _sweep(tmp_path, server.uri, **sweep_kw)
    out_dir = tmp_path / "out" / "outage"
    try:
        _kill_after_first_trial(proc, server, out_dir)
        yield server, proc, out_dir
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert server.stop() == []


@pytest.mark.slow
def test_sweep_goes_on_while_the_server_is_down_and_tracking_catches_up(tmp_path):
    # CoOp trials of ~30 s: the outage is mid-sweep
    with _sweep_losing_its_server_after_the_first_trial(tmp_path, coop_epochs=400) as (server, proc, out_dir):
        time.sleep(1)
        server.start()  # same port, same backend store (the restart itself takes ~15 s here)
        assert proc.poll() is None and len(_rows(out_dir)) < N_TRIALS, "the sweep ended before the server was back"
        stdout, stderr = proc.communicate(timeout=500)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "is not answering" in stderr and "is back" in stderr, stderr[-3000:]
        assert "tracking_backlog.json" not in stderr and not (out_dir / "tracking_backlog.json").exists()
        _check_complete(out_dir, server.uri)


@pytest.mark.slow
def test_server_down_until_the_end_leaves_an_exact_backlog_that_a_rerun_logs(tmp_path):
    with _sweep_losing_its_server_after_the_first_trial(tmp_path) as (server, proc, out_dir):
        stdout, stderr = proc.communicate(timeout=500)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        backlog_file = out_dir / "tracking_backlog.json"
        warning = [ln for ln in stderr.splitlines() if str(backlog_file) in ln]
        assert len(warning) == 1 and warning[0].startswith("warning: "), stderr[-3000:]
        rows = _rows(out_dir)
        assert len(rows) == N_TRIALS and {r["status"] for r in rows} == {"FINISHED"}  # results complete anyway
        backlog = json.loads(backlog_file.read_text())

        server.start()
        _, runs = _trial_runs(server.uri, "outage")
        done = {r.data.tags["tune_trial_id"] for r in runs.get("trial", []) if r.info.status == "FINISHED"}
        assert set(backlog["trials"]) == {r["tune_trial_id"] for r in rows} - done  # exactly the missing ones
        assert backlog["trials"]
        missing_ids = {r["tune_trial_id"] for r in rows if r["mlflow_run_id"] is None}
        assert missing_ids <= set(backlog["trials"])

        r = subprocess.run(proc.args, cwd=REPO, env=env_with_venv(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "already finished" in r.stdout and "logged the" in r.stdout
        assert not backlog_file.exists()
        _check_complete(out_dir, server.uri)
