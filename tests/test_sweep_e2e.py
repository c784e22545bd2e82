"""End-to-end: the sweep CLI on local Ray (2 CPUs), tiny backbone, offline digits, real trials.

One small sweep (zero-shot + CoOp, 1 shot, 2 final seeds, 2 CoOp proposals on 1 search seed) is run
once per module; the tests then check the plan against trials.arrow and MLflow, the nesting of
runs, the cell aggregation, the readers, the report, the test-split isolation of the search stage,
and that re-running starts nothing while a changed spec is refused. --dry-run needs no Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "e2e",
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
    "tracking": {"experiment": "e2e"},
    "report": {"baseline": "zeroshot"},
}


def _cli(args, tmp, timeout=600):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=timeout,
    )


def _write(tmp: Path, spec: dict, name="spec.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(spec))
    return p


def _runs(uri):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("e2e")
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def test_dry_run_starts_nothing(tmp_path):
    spec = _write(tmp_path, SPEC)
    r = _cli([str(spec), "--dry-run", "--output", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 cells, 6 trials (2 search + 4 final)" in r.stdout and "cpu=1" in r.stdout
    assert "fewshot.coop.digits.1shot" in r.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    spec = _write(tmp, SPEC)
    uri = f"sqlite:///{tmp}/mlflow.db"
    r = _cli([str(spec), "--output", str(tmp / "out"), "--tracking-uri", uri], tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"tmp": tmp, "spec": spec, "uri": uri, "out": tmp / "out" / "e2e", "stdout": r.stdout}


@pytest.mark.slow
def test_plan_rows_and_mlflow_runs_agree(sweep):
    import pyarrow.feather as feather

    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    n = plan(load_spec(sweep["spec"])).n_trials
    t = feather.read_table(sweep["out"] / "trials.arrow").to_pylist()
    assert len(t) == n == 6
    assert all(r["status"] == "FINISHED" for r in t), [(r["status"], r["error_message"]) for r in t]
    assert {r["sweep"] for r in t} == {"e2e"} and {r["backbone"] for r in t} == {"promptsweep-tiny:random-init"}
    # epochs.parquet: one row per CoOp trial x epoch (1 epoch each); zero-shot trials train no epoch
    epochs = feather.read_table(sweep["out"] / "epochs.arrow").to_pylist()
    coop_ids = {r["tune_trial_id"] for r in t if r["method"] == "coop"}
    assert sorted((r["tune_trial_id"], r["epoch"]) for r in epochs) == sorted((i, 1) for i in coop_ids)
    assert all(r["train_loss"] > 0 and r["wall_time_s"] > 0 and r["lr"] >= 0 for r in epochs), (
        epochs
    )  # cosine ends at 0
    client, runs = _runs(sweep["uri"])
    by_level = {lvl: [r for r in runs if r.data.tags.get("level") == lvl] for lvl in ("sweep", "cell", "trial")}
    assert len(by_level["sweep"]) == 1 and len(by_level["cell"]) == 2 and len(by_level["trial"]) == n
    parent = by_level["sweep"][0].info.run_id
    assert by_level["sweep"][0].data.tags["output_dir"] == str(sweep["out"].absolute())  # where its files are
    cells = {r.info.run_id for r in by_level["cell"]}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in by_level["cell"])
    assert all(r.data.tags["mlflow.parentRunId"] in cells for r in by_level["trial"])
    assert {r["mlflow_run_id"] for r in t} == {r.info.run_id for r in by_level["trial"]}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "mlflow ui --backend-store-uri " + sweep["uri"] in sweep["stdout"]
    # what a researcher browses: each cell run holds its figures and its chosen hyperparameters; the sweep run
    # its counts; trial runs have per-epoch series without an `epoch` series of their own
    for cell in by_level["cell"]:
        assert (
            cell.data.metrics["n"] == 2 and "test_acc_mean" in cell.data.metrics and "test_acc_std" in cell.data.metrics
        )
    coop = next(r for r in by_level["cell"] if r.data.tags["method"] == "coop")
    assert set(coop.data.params) == {"hp.lr"} and coop.data.metrics["search_trials"] == 2
    sweep_metrics = by_level["sweep"][0].data.metrics
    assert sweep_metrics["trials_finished"] == n and sweep_metrics["trials_failed"] == 0
    assert all("epoch" not in r.data.metrics and "val_acc" in r.data.metrics for r in by_level["trial"])
    assert all(
        "train.lr" in r.data.params and "method.n_ctx" in r.data.params
        for r in by_level["trial"]
        if r.data.tags["method"] == "coop"
    )
    # the sweep run keeps the spec, the report, its plots and the result tables, beside the SQLite file
    top = {a.path for a in client.list_artifacts(parent)}
    assert {"spec.json", "report.md", "results"} <= top, top
    assert {a.path for a in client.list_artifacts(parent, "results")} == {
        "results/trials.parquet",
        "results/cells.parquet",
        "results/comparisons.parquet",
        "results/epochs.parquet",
    }
    import mlflow

    spec_logged = mlflow.artifacts.load_dict(f"{by_level['sweep'][0].info.artifact_uri}/spec.json")
    assert spec_logged["name"] == "e2e" and spec_logged["methods"] == ["zeroshot", "coop"]
    assert by_level["sweep"][0].info.artifact_uri.startswith(Path(sweep["uri"][len("sqlite:///") :]).parent.as_uri())


@pytest.mark.slow
def test_each_cell_study_names_its_mlflow_cell_run(sweep):
    """optuna-dashboard shows, beside a cell's search, the id of the cell's MLflow run (cells without a search
    have no study)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    _, runs = _runs(sweep["uri"])
    cell_runs = {r.data.tags["cell_id"]: r.info.run_id for r in runs if r.data.tags.get("level") == "cell"}
    storage = JournalStorage(JournalFileBackend(str(sweep["out"] / "optuna.journal")))
    assert [s.study_name for s in storage.get_all_studies()] == ["fewshot.coop.digits.1shot"]
    study = optuna.load_study(study_name="fewshot.coop.digits.1shot", storage=storage)
    assert study.user_attrs["mlflow_run_id"] == cell_runs["fewshot.coop.digits.1shot"]
    assert study.user_attrs["method"] == "coop"


@pytest.mark.slow
def test_ray_shows_the_sweep_on_its_job_and_trial_actors(tmp_path):
    """While a sweep runs, Ray's state API (what the dashboard shows) lists its trial actors under the sweep's
    name (class and repr) and its driver's job with the sweep's name and output folder as metadata."""
    import time

    from ray.util.state import list_actors, list_jobs

    from orchestrator.tune_runner import ray_label
    from tests.servers import free_port

    port = free_port()
    spec = _write(tmp_path, dict(SPEC, name="named", methods=["coop"], search={}, seeds=[1, 2], report={}))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(spec),
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--dashboard",
            f"127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"http://127.0.0.1:{port}"
    actors, jobs = {}, {}
    try:
        while proc.poll() is None and not (any(a.repr_name for a in actors.values()) and jobs):
            time.sleep(0.5)
            try:
                actors.update({a.actor_id: a for a in list_actors(address=address, detail=True)})
                jobs.update({j.job_id: j for j in list_jobs(address=address, detail=True) if j.metadata})
            except Exception:  # noqa: BLE001 - the dashboard is not up yet, or already going
                continue
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert actors, "no actor was seen while the sweep ran"
    assert {a.class_name for a in actors.values()} == {ray_label("named")}
    assert {a.repr_name for a in actors.values() if a.repr_name} == {ray_label("named")}  # once started
    [job] = jobs.values()
    assert job.metadata == {"promptsweep.sweep": "named", "promptsweep.output": str(tmp_path / "out" / "named")}


@pytest.mark.slow
def test_search_stage_never_reads_test_split(sweep):
    import pyarrow.feather as feather

    t = feather.read_table(sweep["out"] / "trials.arrow").to_pylist()
    search = [r for r in t if r["stage"] == "search"]
    final = [r for r in t if r["stage"] == "final"]
    assert len(search) == 2 and len(final) == 4
    assert all(r["test_images_read"] == 0 and r["test_acc"] is None for r in search)
    assert all(r["test_images_read"] > 0 and r["test_acc"] is not None for r in final)


@pytest.mark.slow
def test_cells_are_means_of_final_rows_and_readers_agree(sweep):
    import duckdb
    import pandas as pd
    import polars as pl

    trials = pd.read_feather(sweep["out"] / "trials.arrow")
    cells = pl.read_ipc(sweep["out"] / "cells.arrow")
    final = trials[trials.stage == "final"]
    for row in cells.iter_rows(named=True):
        f = final[final.cell_id == row["cell_id"]]
        assert row["n"] == len(f) == 2
        assert row["test_acc_mean"] == pytest.approx(f.test_acc.mean())
        assert row["test_acc_std"] == pytest.approx(f.test_acc.std(ddof=1))
    path = str(sweep["out"] / "trials.parquet").replace("'", "''")
    got = duckdb.sql(f"select count(*) from '{path}'").fetchall()[0][0]  # the Parquet twin, no extension needed
    assert got == len(trials)
    coop_final = final[final.method == "coop"]
    best = json.loads(cells.filter(pl.col("method") == "coop")["params_json"][0])
    assert set(coop_final.params_json) == {json.dumps(best, sort_keys=True)}


@pytest.mark.slow
def test_report_has_the_table(sweep):
    md = (sweep["out"] / "report.md").read_text()
    assert "| dataset | zeroshot | coop |" in md and "| **Average** |" in md
    assert (sweep["out"] / "fewshot_curves.png").exists()
    # the reviewer's sections: coop against the zero-shot baseline, seeds, cost on a CPU-only sweep, the search
    assert "### fewshot, 1-shot: test accuracy (method − zeroshot)" in md and "## Unstable seeds" in md
    assert (
        "The sweep reserved no GPU, so its plots show CPU-hours." in md and (sweep["out"] / "cost_fewshot.png").exists()
    )
    assert "fewer than 5: not evaluated" in md  # CoOp's study has 2 completed trials


@pytest.mark.slow
def test_cost_seeds_and_comparisons_of_a_real_sweep(sweep):
    import pyarrow.feather as feather

    trials = feather.read_table(sweep["out"] / "trials.arrow").to_pylist()
    assert all(r["cpus"] == 1.0 and r["gpu_fraction"] == 0.0 and r["gpu_seconds"] == 0.0 for r in trials)
    assert all(r["cpu_seconds"] == pytest.approx(r["wall_time_s"]) and r["cpu_seconds"] > 0 for r in trials)
    assert all(r["images_trained"] > 0 for r in trials if r["method"] == "coop")
    assert all(r["images_evaluated"] >= r["test_images_read"] > 0 for r in trials if r["stage"] == "final")
    cells = {c["method"]: c for c in feather.read_table(sweep["out"] / "cells.arrow").to_pylist()}
    assert cells["coop"]["cpu_seconds"] == pytest.approx(sum(r["cpu_seconds"] for r in trials if r["method"] == "coop"))
    assert cells["coop"]["seeds"] == [1, 2] and len(cells["coop"]["test_acc_values"]) == 2
    assert cells["coop"]["test_acc_ci_low"] <= cells["coop"]["test_acc_mean"] <= cells["coop"]["test_acc_ci_high"]
    comp = feather.read_table(sweep["out"] / "comparisons.arrow").to_pylist()
    assert [(r["method"], r["baseline"], r["dataset"], r["n_pairs"]) for r in comp] == [
        ("coop", "zeroshot", "digits", 2)
    ]
    finals = {(r["method"], r["seed"]): r["test_acc"] for r in trials if r["stage"] == "final"}
    assert comp[0]["diff_mean"] == pytest.approx(sum(finals[("coop", s)] - finals[("zeroshot", s)] for s in (1, 2)) / 2)


@pytest.mark.slow
def test_rerun_starts_nothing_and_changed_spec_is_refused(sweep):
    before = (sweep["out"] / "trials.arrow").read_bytes()
    _, runs_before = _runs(sweep["uri"])
    r = _cli([str(sweep["spec"]), "--output", str(sweep["tmp"] / "out"), "--tracking-uri", sweep["uri"]], sweep["tmp"])
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stdout and "fewshot.coop.digits.1shot" in r.stdout
    assert (sweep["out"] / "trials.arrow").read_bytes() == before
    _, runs_after = _runs(sweep["uri"])
    assert len(runs_after) == len(runs_before)
    # another baseline changes no trial: the comparisons and the report are rewritten, nothing runs
    import pyarrow.feather as feather

    rows_before = feather.read_table(sweep["out"] / "trials.arrow").to_pylist()
    reread = _write(sweep["tmp"], dict(SPEC, report={"baseline": "coop"}), "reread.yaml")
    r = _cli([str(reread), "--output", str(sweep["tmp"] / "out"), "--tracking-uri", sweep["uri"]], sweep["tmp"])
    assert r.returncode == 0 and "report settings changed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    comp = feather.read_table(sweep["out"] / "comparisons.arrow").to_pylist()
    assert [(c["method"], c["baseline"]) for c in comp] == [("zeroshot", "coop")]
    assert "(method − coop)" in (sweep["out"] / "report.md").read_text()
    assert feather.read_table(sweep["out"] / "trials.arrow").to_pylist() == rows_before  # no trial ran
    client, runs_now = _runs(sweep["uri"])
    assert len(runs_now) == len(runs_before)
    # what MLflow keeps of the sweep is rewritten too: its report, comparisons table and spec
    import mlflow
    import pyarrow.parquet as pq

    sweep_run = next(x for x in runs_now if x.data.tags.get("level") == "sweep")
    logged = Path(client.download_artifacts(sweep_run.info.run_id, "report.md", str(sweep["tmp"] / "dl")))
    assert logged.read_text() == (sweep["out"] / "report.md").read_text()
    logged = client.download_artifacts(sweep_run.info.run_id, "results/comparisons.parquet", str(sweep["tmp"] / "dl"))
    assert [(c["method"], c["baseline"]) for c in pq.read_table(logged).to_pylist()] == [("zeroshot", "coop")]
    assert mlflow.artifacts.load_dict(f"{sweep_run.info.artifact_uri}/spec.json")["report"]["baseline"] == "coop"
    # a change that alters what finished trials computed is refused, naming the cell and the key
    changed = _write(
        sweep["tmp"], dict(SPEC, train={"defaults": {**SPEC["train"]["defaults"], "epochs": 2}}), "changed.yaml"
    )
    r = _cli([str(changed), "--output", str(sweep["tmp"] / "out"), "--tracking-uri", sweep["uri"]], sweep["tmp"])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "cell fewshot.coop.digits.1shot: overrides" in r.stderr and '"epochs": 2' in r.stderr
    assert (
        "--fresh" in r.stderr and "--restart-cells fewshot.coop.digits.1shot,fewshot.zeroshot.digits.1shot" in r.stderr
    )
    assert feather.read_table(sweep["out"] / "trials.arrow").to_pylist() == rows_before


def test_trial_no_node_can_fit_is_a_user_error_before_the_data_check_and_mlflow(tmp_path):
    """Resources are checked first: no data preflight, no Ray, no MLflow run left RUNNING (none is made)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so a gpu: 1 trial fits")
    spec = _write(tmp_path, dict(SPEC, resources={"cpu": 1, "gpu": 1}))  # the CI machine has no GPU
    r = _cli([str(spec), "--output", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.startswith(
            "error: resources: nothing on this machine (the local Ray) can run a trial asking cpu=1 gpu=1"
        )
        and "Traceback" not in r.stderr
    )
    assert "checking data" not in r.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(tmp_path):
    import signal
    import time

    import pyarrow.feather as feather

    # 400 optimizer steps (seconds here) per trial: with 1-step trials, seeds 3 and 4 could both finish
    # between the first row appearing and the driver handling SIGINT (seen once in CI)
    spec = _write(
        tmp_path,
        dict(
            SPEC,
            methods=["coop"],
            search={},
            seeds=[1, 2, 3, 4],
            report={},
            train={"defaults": {"epochs": 80, "batch_size": 2}},
        ),
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        sys.executable,
        "-m",
        "orchestrator.sweep",
        str(spec),
        "--output",
        str(tmp_path / "out"),
        "--tracking-uri",
        uri,
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = tmp_path / "out" / "e2e" / "trials.arrow"
    deadline = time.time() + 300
    while not rows.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Tune stops gracefully and saves its state
    out, err = proc.communicate(timeout=300)
    state = json.loads((tmp_path / "out" / "e2e" / "sweep.json").read_text())
    assert state["status"] == "incomplete", out[-2000:] + err[-2000:]
    assert proc.returncode == 130 and "sweep interrupted (" in err and "rerun the same command" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    sweep_runs = [
        x
        for x in c.search_runs([c.get_experiment_by_name("e2e").experiment_id], max_results=1000)
        if x.data.tags.get("level") == "sweep"
    ]
    assert [x.info.status for x in sweep_runs] == ["KILLED"]
    first = {r["tune_trial_id"]: r for r in feather.read_table(rows).to_pylist()}
    assert 0 < len(first) < 4

    r = _cli([str(spec), "--output", str(tmp_path / "out"), "--tracking-uri", uri], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resuming: {len(first)} of 4 trials already recorded" in r.stdout, r.stdout[-2000:]
    final = feather.read_table(rows).to_pylist()
    assert len(final) == 4 and sorted(x["seed"] for x in final) == [1, 2, 3, 4], (
        [(x["seed"], x["tune_trial_id"], x["status"]) for x in final],
        first.keys(),
        r.stdout[-3000:],
    )
    for tid, row in first.items():  # rows finished before the interrupt are kept, not re-run
        again = [x for x in final if x["tune_trial_id"] == tid]
        assert len(again) == 1 and again[0]["finished_at"] == row["finished_at"]
    runs = c.search_runs([c.get_experiment_by_name("e2e").experiment_id], max_results=1000)
    trial_runs = [x for x in runs if x.data.tags.get("level") == "trial"]
    assert len(trial_runs) == 4 and len([x for x in runs if x.data.tags.get("level") == "sweep"]) == 1
    assert [x.info.status for x in runs if x.data.tags.get("level") == "sweep"] == ["FINISHED"]  # reopened, ended
    assert {x["mlflow_run_id"] for x in final} == {x.info.run_id for x in trial_runs}


def test_exit_without_teardown_keeps_the_code_the_output_and_the_atexit_handlers(tmp_path):
    """The sweep command ends with os._exit after the atexit handlers: nothing written is lost."""
    import subprocess
    import sys

    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys; from orchestrator.sweep import exit_without_teardown; "
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes')); "
        "print('out', end=''); print('err', end='', file=sys.stderr); exit_without_teardown(3)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (3, "out", "err")
    assert marker.read_text() == "yes"


@pytest.mark.slow
def test_stopping_the_local_ray_waits_for_its_processes_and_kills_a_lingering_one(tmp_path):
    """When the sweep command returns, no process of the Ray it started runs on: ``ray.shutdown()`` only
    signals them (the GCS and raylet can take seconds on a loaded machine), so the driver waits, and one
    that ignores SIGTERM (here a child that does) is SIGKILLed after the grace period. A process whose parent
    exited first (here a grandchild orphaned on purpose, as a worker is when its raylet goes) is adopted by
    the driver (child subreaper) and stopped too, not left running under PID 1."""
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="pss.", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    code = f"""
import json, os, subprocess, sys, time
os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR={ray_tmp!r})
import psutil
from orchestrator import sweep
from orchestrator.tune_runner import ensure_ray
sweep._adopt_orphans()
assert ensure_ray(None)
maker = subprocess.run([sys.executable, "-c",
    "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], stdout=subprocess.DEVNULL, "
    "stderr=subprocess.DEVNULL); print(p.pid)"],
    capture_output=True, text=True, check=True)
orphan = psutil.Process(int(maker.stdout.strip()))  # its parent has exited: re-parented to this process
assert orphan.ppid() == os.getpid(), orphan.ppid()
stubborn = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
assert stubborn.stdout.readline().strip() == "ready"
ours = psutil.Process().children(recursive=True)
names = sorted({{p.name() for p in ours}})
sweep.RAY_STOP_GRACE_S = 2.0
t0 = time.monotonic()
sweep._shutdown_ray(True)
took = time.monotonic() - t0
def running(p):
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
left = [p.pid for p in ours + [orphan] if running(p)]
rc = stubborn.poll()
for p in ours + [orphan]:  # whatever a failing shutdown left, so that the test leaves nothing running
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
print(json.dumps({{"names": names, "left": left, "took": took, "stubborn_rc": rc}}))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"raylet", "gcs_server"} <= set(got["names"]), got["names"]  # Ray's own processes were among them
    assert got["left"] == [], got
    assert got["stubborn_rc"] == -9 and got["took"] >= 2.0, got  # the one ignoring SIGTERM: killed after the grace
