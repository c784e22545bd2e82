"""A node of a real multi-node cluster disappears mid-sweep (``cluster/local.sh``: a 0-CPU head on 127.0.0.2 and
two 1-CPU workers on 127.0.0.3/4): once both workers run a trial, every process of the second worker node — its
``ray start`` as local.sh recorded it, the raylet, agents and Ray workers — is SIGKILLed at once. Tune retries
the trial that was on it from its checkpoint on the surviving worker, the sweep finishes with every trial exactly
once in trials.arrow and MLflow, and ``cluster/local.sh down`` leaves no process this test started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import yaml

from tests.servers import REPO, LocalCluster, env_with_venv, kill_cluster_node, process_tree, still_running

pytestmark = pytest.mark.slow

EPOCHS = 20
SPEC = {
    "name": "nodeloss",
    "protocol": "fewshot",
    "methods": ["coop"],
    "datasets": ["digits"],
    "shots": [2],
    "seeds": [1, 2, 3],
    "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
    "train": {"defaults": {"epochs": EPOCHS, "batch_size": 8, "num_workers": 0}},
    "resources": {"cpu": 1, "gpu": 0},
    "max_retries": 2,
    "tracking": {"experiment": "nodeloss"},
}
SURVIVOR, DOOMED = "127.0.0.3", "127.0.0.4"  # worker1, worker2


@pytest.fixture
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster-faults-state"), workers=2, cpus=1)
    c.started = {}
    try:
        c.up()
        c.started = c.tree()
        yield c
    finally:
        c.started.update(c.tree())  # Ray workers started since
        p = c.down()
        left = still_running(c.started)
        assert not left, f"cluster/local.sh down left processes running: {left}\n{p.stderr[-2000:]}"


def _results(trial_dir):
    p = trial_dir / "result.json"
    out = []
    for line in p.read_text().splitlines() if p.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_lost_node_trials_are_retried_on_the_other_worker(cluster, tmp_path):
    spec = tmp_path / "nodeloss.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out" / "nodeloss"
    env = env_with_venv(RAY_ADDRESS=cluster.address, PROMPTSWEEP_SHARED_STORAGE=str(tmp_path))
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(spec),
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            uri,
            "--max-concurrent",
            "2",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        victim = None
        deadline = time.monotonic() + 240
        while victim is None:  # both workers train a trial, the one on worker2 has a checkpoint
            assert time.monotonic() < deadline and driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            on = {}
            for d in (out / "tune").glob("*/") if (out / "tune").exists() else []:
                res = [r for r in _results(d) if r.get("epoch")]
                if res and len(res) <= EPOCHS - 6:
                    on[res[-1]["node_ip"]] = (d.name, res[-1]["epoch"])
            if SURVIVOR in on and DOOMED in on and on[DOOMED][1] >= 2:
                victim, epoch_at_kill = on[DOOMED]
            time.sleep(0.2)
        cluster.started.update(cluster.tree())
        killed, alive = kill_cluster_node(cluster, "worker2")
        assert not alive, alive
        assert len(killed) >= 3  # ray start, raylet, agents, the trial's worker ...
        t_kill = time.monotonic()

        rc = driver.wait(timeout=300)
        assert rc == 0, (tmp_path / "driver.log").read_text()[-4000:]
        took = time.monotonic() - t_kill
    finally:
        if driver.poll() is None:
            for p in still_running(process_tree([driver.pid])):
                os.kill(p, signal.SIGKILL)
            driver.wait(timeout=30)
        log.close()

    with pa.memory_map(str(out / "trials.arrow")) as src:
        rows = pa.ipc.open_file(src).read_all().to_pylist()
    assert len(rows) == 3 and sorted(r["seed"] for r in rows) == [1, 2, 3]
    assert len({r["tune_trial_id"] for r in rows}) == 3
    assert all(r["status"] == "FINISHED" and r["epochs_run"] == EPOCHS for r in rows), rows
    by_id = {r["tune_trial_id"]: r for r in rows}
    assert by_id[victim]["node_id"] == SURVIVOR  # retried on the node that is left

    res = [r for r in _results(out / "tune" / victim) if r.get("epoch")]
    nodes = [r["node_ip"] for r in res]
    k = nodes.index(SURVIVOR)
    assert set(nodes[:k]) == {DOOMED} and set(nodes[k:]) == {SURVIVOR}, nodes
    before, after = [r["epoch"] for r in res[:k]], [r["epoch"] for r in res[k:]]
    assert before[-1] >= epoch_at_kill and 1 < after[0] <= before[-1] + 1, (before, after)  # from its checkpoint
    assert after == list(range(after[0], EPOCHS + 1))

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("nodeloss")
    runs = c.search_runs([exp.experiment_id], "tags.level = 'trial'", max_results=100)
    assert sorted(r.data.tags["tune_trial_id"] for r in runs) == sorted(by_id)
    assert {r["mlflow_run_id"] for r in rows} == {r.info.run_id for r in runs}
    print(f"sweep finished {took:.0f}s after worker2 was killed")
