"""MLflow server mode: `mlflow server` (SQLite backend) on 127.0.0.1:<free port>, a small sweep with
--tracking-uri http://127.0.0.1:<port>, its runs listed by MlflowClient.search_runs with their tags;
the server is stopped by PID and leaves no process behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.servers import REPO, MlflowServer, env_with_venv, process_tree

pytestmark = pytest.mark.slow

SPEC = """\
name: mlflowserver
protocol: fewshot
methods: [zeroshot]
datasets: [digits]
shots: [1]
seeds: [1, 2]
backbone: {arch: promptsweep-tiny, pretrained: null}
train:
  defaults: {epochs: 1, batch_size: 16, num_workers: 0}
resources: {cpu: 1, gpu: 0}
max_retries: 0
tracking: {experiment: promptsweep-server-test}
output: results
"""


def test_sweep_runs_land_on_the_mlflow_server(tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "mlflow").start()
    tree = {}
    try:
        tree = process_tree([server.proc.pid])
        spec = tmp_path / "spec.yaml"
        spec.write_text(SPEC)
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator.sweep",
                str(spec),
                "--output",
                str(tmp_path / "out"),
                "--tracking-uri",
                server.uri,
                "--max-concurrent",
                "1",
            ],
            cwd=REPO,
            env=env_with_venv(),
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert server.uri in p.stdout  # the printed "mlflow:" line points at the server

        client = MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("promptsweep-server-test")
        assert exp is not None
        runs = client.search_runs([exp.experiment_id], max_results=100)
        by_level = {}
        for r in runs:
            by_level.setdefault(r.data.tags.get("level", "sweep"), []).append(r)
        trials = by_level.get("trial", [])
        assert len(trials) == 2 and {t.data.tags["seed"] for t in trials} == {"1", "2"}
        for t in trials:
            assert t.data.tags["sweep"] == "mlflowserver" and t.data.tags["method"] == "zeroshot"
            assert t.data.tags["dataset"] == "digits" and t.info.status == "FINISHED"
        cells = by_level.get("cell", [])
        assert [c.data.tags["cell_id"] for c in cells] == ["fewshot.zeroshot.digits.1shot"]
        assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {cells[0].info.run_id}
        # the same browsing content as with a SQLite file: cell figures, the trial's configuration, and the
        # sweep's spec, report and tables as artifacts (proxied by the server into its artifacts folder)
        assert cells[0].data.metrics["n"] == 2 and "test_acc_mean" in cells[0].data.metrics
        assert all("train.batch_size" in t.data.params for t in trials)
        sweep_run = by_level["sweep"][0]
        assert sweep_run.data.metrics["trials_finished"] == 2
        top = {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
        assert {"spec.json", "report.md", "results"} <= top, top
        assert list((tmp_path / "mlflow" / "artifacts").rglob("trials.parquet"))
        # the sweep's own results point at the same runs
        import pyarrow as pa

        with pa.memory_map(str(tmp_path / "out" / "mlflowserver" / "trials.arrow")) as src:
            rows = pa.ipc.open_file(src).read_all().to_pylist()
        assert {r["mlflow_run_id"] for r in rows} == {t.info.run_id for t in trials}
    finally:
        left = server.stop()
    assert tree and left == []  # the server and its workers are gone (checked by PID + start time)
