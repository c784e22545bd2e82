"""cluster/local.sh end to end: a head (0 CPU) + two 1-CPU worker nodes on 127.0.0.2-4, a small sweep
through RAY_ADDRESS that places trials on both workers, the same sweep through `ray job submit` with an
absolute shared --output, the storage check against the live cluster, and `down` stopping every
process `up` started. One cluster for the module; always torn down."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from tests.servers import REPO, VENV_BIN, LocalCluster, env_with_venv, still_running

pytestmark = pytest.mark.slow

SPEC = """\
name: {name}
protocol: fewshot
methods: [zeroshot]
datasets: [digits]
shots: [1, 2]
seeds: [1, 2]
backbone: {{arch: promptsweep-tiny, pretrained: null}}
train:
  defaults: {{epochs: 1, batch_size: 16, num_workers: 0}}
resources: {{cpu: 1, gpu: 0}}
max_retries: 0
tracking: {{experiment: promptsweep-cluster-test}}
output: results
"""
WORKER_IPS = {"127.0.0.3", "127.0.0.4"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster-state"), workers=2, cpus=1)
    try:
        c.up()
        c.started = c.tree()  # every process up started (ray start, gcs, raylets, agents, ...)
        yield c
    finally:
        c.down()
        left = still_running(getattr(c, "started", {}))
        assert not left, f"cluster/local.sh down left processes running: {left}"


def _spec(tmp_path, name):
    p = tmp_path / f"{name}.yaml"
    p.write_text(SPEC.format(name=name))
    return p


def _trials(out_dir):
    with pa.memory_map(str(out_dir / "trials.arrow")) as src:
        return pa.ipc.open_file(src).read_all().to_pylist()


def test_up_prints_the_address_and_starts_three_nodes(cluster):
    assert cluster.address == f"127.0.0.2:{cluster.gcs_port}"
    assert cluster.dashboard == f"http://127.0.0.2:{cluster.dashboard_port}"
    roles = [line.split()[2] for line in (cluster.state_dir / "pids").read_text().splitlines()]
    assert roles == ["head", "worker1", "worker2"]
    st = cluster.run("status")
    assert st.returncode == 0 and "up (3 node(s))" in st.stdout
    again = cluster.run("up")
    assert again.returncode == 2 and "already up" in again.stderr


def test_sweep_through_ray_address_places_trials_on_two_worker_nodes(cluster, tmp_path):
    env = env_with_venv(RAY_ADDRESS=cluster.address, PROMPTSWEEP_SHARED_STORAGE=str(tmp_path))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(_spec(tmp_path, "multinode")),
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--max-concurrent",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _trials(tmp_path / "out" / "multinode")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED"}
    nodes = {r["node_id"] for r in rows}
    assert nodes <= WORKER_IPS and len(nodes) == 2, nodes  # never the 0-CPU head, both workers used


# Ray 2.60 re-extracts a job's working_dir (rmtree + unzip) when the driver's own runtime env is created by
# ray.init; orchestrator.tune_runner.ensure_ray stands outside it during init and returns to the same path.
def test_ray_job_submit_writes_results_to_the_absolute_output(cluster, tmp_path):
    out = tmp_path / "job-out"
    env = env_with_venv(PROMPTSWEEP_SHARED_STORAGE=str(tmp_path))
    runtime_env = (
        '{"env_vars": {"PROMPTSWEEP_SHARED_STORAGE": "%s", "OMP_NUM_THREADS": "1", '
        '"PROMPTSWEEP_CACHE": "%s"}}' % (tmp_path, env["PROMPTSWEEP_CACHE"])
    )
    p = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster.dashboard,
            "--working-dir",
            ".",
            "--runtime-env-json",
            runtime_env,
            "--",
            "python",
            "-m",
            "orchestrator.sweep",
            str(_spec(tmp_path, "viajob")),
            "--output",
            str(out),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--max-concurrent",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "succeeded" in p.stdout + p.stderr
    rows = _trials(out / "viajob")  # where the README says: <absolute --output>/<sweep name>/
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED"}
    assert {r["node_id"] for r in rows} <= WORKER_IPS
    assert (out / "viajob" / "cells.arrow").exists() and (out / "viajob" / "report.md").exists()


def test_storage_check_against_the_live_cluster(cluster, tmp_path):
    code = textwrap.dedent(f"""
        import ray
        from fewshot.errors import ConfigError
        from orchestrator.cluster_checks import alive_nodes, check_cluster_storage
        ray.init(address="{cluster.address}", logging_level="ERROR", log_to_driver=False)
        print("nodes", sorted(n["NodeManagerAddress"] for n in alive_nodes()))
        check_cluster_storage("{tmp_path}/shared/out")
        try:
            check_cluster_storage("{tmp_path}/local/out")
        except ConfigError as e:
            print("refused:", e)
        ray.shutdown()
    """)
    env = env_with_venv(PROMPTSWEEP_SHARED_STORAGE=str(tmp_path / "shared"))
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nodes ['127.0.0.2', '127.0.0.3', '127.0.0.4']" in p.stdout
    assert (
        f"refused: sweep output {tmp_path}/local/out is not shared storage, but the Ray cluster has 3 nodes" in p.stdout
    )


def test_down_stops_every_process_up_started(cluster):
    assert still_running(cluster.started)  # sanity: they were running
    p = cluster.down()
    assert p.returncode == 0, p.stderr
    assert still_running(cluster.started) == []
    assert not (cluster.state_dir / "pids").exists()
    st = cluster.run("status")
    assert st.returncode == 3
