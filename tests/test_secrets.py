"""Credentials in a tracking URI (``http://user:password@host``, from ``--tracking-uri`` or
``$MLFLOW_TRACKING_URI``) reach MLflow only through ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` in the
driver: no message, results file, pickled Tune state, report or MLflow tag/param holds the password, and
a spec's ``tracking.uri`` with credentials is refused."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot.errors import ConfigError
from orchestrator.mlflow_uri import mask_uri, resolve_tracking_uri, split_credentials
from orchestrator.tracking import MlflowTracking
from tests.servers import REPO, MlflowServer, env_with_venv, free_port

PASSWORD = "s3cr3t-pw"

SPEC = """\
name: secrets
protocol: fewshot
methods: [zeroshot]
datasets: [digits]
shots: [1]
seeds: [1]
backbone: {arch: promptsweep-tiny, pretrained: null}
train:
  defaults: {epochs: 1, batch_size: 16, num_workers: 0}
resources: {cpu: 1, gpu: 0}
max_retries: 0
tracking: {experiment: promptsweep-secrets-test}
"""


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_split_credentials_and_mask_uri():
    assert split_credentials("http://bob:p%40ss@host:5000/x?a=1") == ("http://host:5000/x?a=1", "bob", "p@ss")
    assert split_credentials("https://tok@host/") == ("https://host/", "tok", None)
    assert split_credentials("sqlite:////tmp/m.db") == ("sqlite:////tmp/m.db", None, None)
    assert mask_uri("http://bob:pw@host:5000/") == "http://bob:***@host:5000/"
    assert mask_uri("https://tok@host/") == "https://***@host/"
    assert mask_uri("http://host/?token=abc&x=1") == "http://host/?token=***&x=1"
    assert mask_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


@pytest.mark.parametrize("source", ["flag", "env"])
def test_resolved_uri_has_no_credentials_and_mlflow_gets_them_from_its_variables(clean_env, source):
    uri = f"http://bob:{PASSWORD}@127.0.0.1:5000"
    if source == "env":
        clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    got = resolve_tracking_uri(uri if source == "flag" else None, None)
    assert got == "http://127.0.0.1:5000"
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob" and os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    if source == "env":  # processes started by the driver do not inherit the password in the URI
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_spec_uri_with_credentials_is_refused_without_showing_them(clean_env):
    with pytest.raises(ConfigError) as err:
        resolve_tracking_uri(None, f"http://bob:{PASSWORD}@127.0.0.1:5000")
    msg = str(err.value)
    assert PASSWORD not in msg and "tracking.uri" in msg and "MLFLOW_TRACKING_PASSWORD" in msg


def test_pickled_tracker_holds_no_password(clean_env, tmp_path):
    tracker = MlflowTracking(f"http://bob:{PASSWORD}@127.0.0.1:1", "e", "s", "h", out_dir=tmp_path)
    assert tracker.tracking_uri == "http://127.0.0.1:1"
    assert PASSWORD.encode() not in pickle.dumps(tracker)


def _sweep(tmp_path: Path, uri: str, **env) -> subprocess.CompletedProcess:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    args = [sys.executable, "-m", "orchestrator.sweep", str(spec), "--output", str(tmp_path / "out")]
    e = env_with_venv(**env)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        e.pop(k, None)
    e.update(env)
    if "MLFLOW_TRACKING_URI" not in env:
        args += ["--tracking-uri", uri]
    return subprocess.run(args, cwd=REPO, env=e, capture_output=True, text=True, timeout=500)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_unreachable_server_error_line_hides_the_password(tmp_path, source):
    uri = f"http://bob:{PASSWORD}@127.0.0.1:{free_port()}"
    p = _sweep(tmp_path, uri, **({"MLFLOW_TRACKING_URI": uri} if source == "env" else {}))
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the MLflow tracking server http://127.0.0.1:"), lines
    assert PASSWORD not in p.stdout + p.stderr
    assert not (tmp_path / "out").exists()


def _files_with(root: Path, needle: bytes) -> list[str]:
    return [str(f) for f in root.rglob("*") if f.is_file() and needle in f.read_bytes()]


@pytest.mark.slow
def test_sweep_with_credentials_leaves_the_password_nowhere(tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "mlflow").start()  # no auth: it ignores the basic-auth header
    try:
        uri = server.uri.replace("http://", f"http://bob:{PASSWORD}@")
        p = _sweep(tmp_path, uri)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert PASSWORD not in p.stdout + p.stderr
        assert f"mlflow:   open {server.uri} " in p.stdout
        out = tmp_path / "out" / "secrets"
        assert (out / "sweep.json").exists() and (out / "report.md").exists() and list((out / "tune").glob("*.pkl"))
        assert _files_with(tmp_path / "out", PASSWORD.encode()) == []
        client = MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("promptsweep-secrets-test")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        assert len(runs) == 3  # sweep, cell, trial
        for r in runs:
            assert PASSWORD not in repr(r.data.tags) + repr(r.data.params)
    finally:
        server.stop()
