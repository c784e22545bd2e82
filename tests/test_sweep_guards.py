"""Guards of the sweep driver: one sweep per output directory at a time (a second command, a real process,
is refused naming the holder; a lock a dead driver leaves does not block), an unusable output root or
Ray address and a trial this machine cannot run are one line leaving nothing behind, ``--fresh`` keeps a
finished sweep a check refuses, SIGTERM stops a sweep as Ctrl-C does (exit 143, resumable), and a disk
that fills mid-sweep is one line and loses nothing (the rerun completes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.sweep import LOCK_FILE, SIGTERM_EXIT, STATE_FILE, _lock_output, main

ROOT = Path(__file__).resolve().parents[1]
SPEC = "name: locked\nmethods: [zeroshot]\ndatasets: [digits]\nshots: [1]\nseeds: [1]\n"
#: a CoOp cell of 4 one-epoch trials on the tiny backbone: ~30-60 s on 2 cores
RUN_SPEC = {
    "name": "g",
    "protocol": "fewshot",
    "methods": ["coop"],
    "datasets": ["digits"],
    "shots": [1],
    "seeds": [1, 2, 3, 4],
    "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
    "train": {"defaults": {"epochs": 1, "batch_size": 16}},
    "resources": {"cpu": 1, "gpu": 0},
    "tracking": {"experiment": "g"},
}


def _spec(tmp_path: Path, **changes) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({**RUN_SPEC, **changes}))
    return p


def _main(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _sweep(spec: Path, out: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(spec),
            "--output",
            str(out),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_second_sweep_on_a_locked_output_is_refused_naming_the_holder(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out_dir = tmp_path / "out" / "locked"
    out_dir.mkdir(parents=True)
    held = _lock_output(out_dir)  # this test process plays the running sweep
    try:
        proc = _sweep(spec, tmp_path / "out", tmp_path)
    finally:
        held.close()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error: sweep output ") and "in use by a running sweep" in lines[-1], proc.stderr
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [LOCK_FILE]  # nothing of the second command


def test_a_lock_left_by_a_dead_driver_does_not_block(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = (
        "import sys, time; from pathlib import Path; from orchestrator.sweep import _lock_output; "
        "_lock_output(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()  # SIGKILL: no cleanup runs, the file stays, the kernel drops the lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (out_dir / LOCK_FILE).read_text().startswith(f"pid {holder.pid} ")
    _lock_output(out_dir).close()


def test_a_second_command_on_a_running_sweeps_folder_is_refused_before_its_own_checks(tmp_path, capsys):
    """The folder of a running sweep (its sweep.json written) is locked before anything is read: a second
    command whose own check would fail (a trial asking 64 CPUs) is refused for the lock and changes nothing."""
    out_dir = tmp_path / "out" / "g"
    out_dir.mkdir(parents=True)
    (out_dir / STATE_FILE).write_text(json.dumps({"status": "running", "spec": {}}))
    held = _lock_output(out_dir)
    try:
        code, err = _main(
            capsys,
            _spec(tmp_path, resources={"cpu": 64, "gpu": 0}),
            "--output",
            tmp_path / "out",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}",
        )
    finally:
        held.close()
    assert code == 2 and err.startswith("error: sweep output ") and f"pid {os.getpid()} " in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([LOCK_FILE, STATE_FILE])
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    "where, flag", [("file", "--output"), ("under_dev_null", "--output"), ("proc", "--output"), ("file", "output")]
)
def test_an_unusable_output_root_is_one_line_naming_the_flag_or_key(tmp_path, capsys, where, flag):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    root = {"file": str(a_file), "under_dev_null": "/dev/null/out", "proc": "/proc/promptsweep-out"}[where]
    spec = _spec(tmp_path, output=root) if flag == "output" else _spec(tmp_path)
    argv = [spec, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"] + (
        ["--output", root] if flag == "--output" else []
    )
    code, err = _main(capsys, *argv)
    assert code == 2 and err.startswith(f"error: {flag}: '{root}' ") and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "not a folder" and not (tmp_path / "m.db").exists()


def test_address_auto_with_no_cluster_on_this_machine_is_one_line(tmp_path, capsys):
    from ray._private import services

    if services.find_bootstrap_address(None) or services.find_gcs_addresses():
        pytest.skip("a Ray cluster runs on this machine, so auto finds one")
    code, err = _main(
        capsys,
        _spec(tmp_path),
        "--output",
        tmp_path / "out",
        "--address",
        "auto",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'm.db'}",
    )
    assert code == 2 and err.startswith("error: --address: auto finds no Ray cluster running on this machine"), err
    assert not (tmp_path / "out").exists()


def test_a_malformed_ray_address_env_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "no-port-here")
    code, err = _main(capsys, _spec(tmp_path), "--output", tmp_path / "out")
    assert code == 2 and err.startswith("error: $RAY_ADDRESS: 'no-port-here' is not a Ray address"), err
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_cuda_is_refused_at_the_resources_check(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, err = _main(
        capsys,
        _spec(tmp_path, device="cuda", resources={"cpu": 1, "gpu": 1}),
        "--output",
        tmp_path / "out",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'm.db'}",
    )
    assert code == 2 and err.startswith("error: device: cuda, but CUDA is not available"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("resources", [{"cpu": 1, "gpu": 3}, {"cpu": 64, "gpu": 0}, {"cpu": 1, "gpu": 0.0001}])
def test_fresh_keeps_a_finished_sweep_that_the_resources_check_refuses(tmp_path, capsys, resources):
    """--fresh deletes only once every check has passed: a refused rerun leaves the earlier results as they were
    (and a first run refused the same way leaves no folder)."""
    import torch

    if resources["gpu"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out_dir = tmp_path / "out" / "g"
    out_dir.mkdir(parents=True)
    (out_dir / STATE_FILE).write_text(json.dumps({"status": "finished", "spec": {}}))
    (out_dir / "trials.arrow").write_bytes(b"results")
    spec = _spec(tmp_path, resources=resources)
    code, err = _main(
        capsys, spec, "--fresh", "--output", tmp_path / "out", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"
    )
    assert code == 2 and err.startswith("error: resources: nothing on this machine"), err
    assert (out_dir / "trials.arrow").read_bytes() == b"results" and (out_dir / STATE_FILE).is_file()
    code, err = _main(capsys, spec, "--output", tmp_path / "first", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert code == 2 and not (tmp_path / "first").exists() and not (tmp_path / "m.db").exists(), err


@pytest.mark.slow
def test_fresh_moves_the_discarded_runs_mlflow_runs_to_the_deleted_ones(tmp_path):
    """--fresh discards the earlier run's MLflow runs with its files: the sweep run and its cell and trial runs
    become deleted (restorable) runs, so the experiment shows one sweep; runs outside that tree stay."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    spec = _spec(tmp_path, methods=["zeroshot"], seeds=[1, 2])
    r = _sweep(spec, tmp_path / "out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("g").experiment_id
    old = {run.info.run_id: run.data.tags.get("level") for run in client.search_runs([exp], max_results=1000)}
    assert sorted(old.values()) == ["cell", "sweep", "trial", "trial"]
    other = client.create_run(exp, tags={"sweep": "g", "level": "note"}).info.run_id  # not under the sweep run

    r = _sweep(spec, tmp_path / "out", tmp_path, "--fresh")
    assert r.returncode == 0, r.stderr[-3000:]
    sweep_run = next(k for k, v in old.items() if v == "sweep")
    assert f"--fresh: the earlier sweep run {sweep_run} and its 3 cell and trial runs" in r.stdout, r.stdout[-2000:]
    deleted = {run.info.run_id for run in client.search_runs([exp], run_view_type=ViewType.DELETED_ONLY)}
    active = client.search_runs([exp], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    assert deleted == set(old)
    assert other in {run.info.run_id for run in active}
    assert sorted(run.data.tags.get("level") for run in active) == ["cell", "note", "sweep", "trial", "trial"]
    assert not set(old) & {run.info.run_id for run in active}


def test_fresh_with_an_unreadable_earlier_run_warns_and_goes_on(tmp_path, capsys):
    from orchestrator.mlflow_fresh import retire_runs

    assert retire_runs(f"sqlite:///{tmp_path / 'm.db'}", "0" * 32) == 0
    err = capsys.readouterr().err
    assert (
        err.startswith(f"warning: --fresh could not move the earlier sweep run {'0' * 32}")
        and "stay as they are" in err
    )


def _start(spec: Path, out: Path, uri: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sweep", str(spec), "--output", str(out), "--tracking-uri", uri],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert path.exists(), proc.communicate(timeout=60)


def _rerun_completes_each_trial_once(spec: Path, out: Path, uri: str) -> None:
    import pyarrow.feather as feather
    from mlflow.tracking import MlflowClient

    proc = _start(spec, out, uri)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    rows = feather.read_table(out / "g" / "trials.arrow").to_pylist()
    assert sorted(r["seed"] for r in rows) == [1, 2, 3, 4]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("g").experiment_id], max_results=1000)
    assert len([r for r in runs if r.data.tags.get("level") == "trial"]) == 4
    assert [r.info.status for r in runs if r.data.tags.get("level") == "sweep"] == ["FINISHED"]


@pytest.mark.slow
def test_sigterm_stops_the_sweep_like_ctrl_c_and_a_rerun_completes_it(tmp_path):
    from mlflow.tracking import MlflowClient

    # 400 optimizer steps per trial: with 1-step trials the other three could finish before the driver handles
    # the signal (seen in CI)
    spec, uri = (
        _spec(tmp_path, train={"defaults": {"epochs": 80, "batch_size": 2}}),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    proc = _start(spec, tmp_path / "out", uri)
    _wait_for(tmp_path / "out" / "g" / "trials.arrow", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == SIGTERM_EXIT, stdout[-2000:] + stderr[-2000:]
    assert "sweep stopped by SIGTERM" in stderr and "rerun the same command to resume" in stderr
    for dump in ("Traceback", "SIGTERM received", "logging.cc", "Aborted"):
        assert dump not in stderr, stderr[-3000:]
    c = MlflowClient(uri)
    sweep_runs = [
        r
        for r in c.search_runs([c.get_experiment_by_name("g").experiment_id], max_results=1000)
        if r.data.tags.get("level") == "sweep"
    ]
    assert [r.info.status for r in sweep_runs] == ["KILLED"]
    assert json.loads((tmp_path / "out" / "g" / STATE_FILE).read_text())["status"] == "incomplete"
    _rerun_completes_each_trial_once(spec, tmp_path / "out", uri)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MiB tmpfs at ``tmp_path/disk`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount is not permitted here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _sweep_run_statuses(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return [
        r.info.status
        for r in c.search_runs([c.get_experiment_by_name("g").experiment_id], max_results=1000)
        if r.data.tags.get("level") == "sweep"
    ]


def _assert_one_line_write_error(proc: subprocess.Popen, strerror: str) -> None:
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, stdout[-2000:] + stderr[-3000:]
    assert lines[-1].startswith("error: cannot write ") and strerror in lines[-1], stderr[-3000:]
    assert "rerun the same command to resume" in lines[-1] and "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_disk_that_fills_mid_sweep_is_one_line_and_keeps_what_was_recorded(tmp_path, small_tmpfs):
    """The output's disk fills after the first result: one line naming the file and the fix, exit 2, the MLflow
    run FAILED; the rows recorded before stay as they were, and the rerun with space freed completes every
    planned trial (Tune's state file the full disk cut short is set aside, the ledger says what is done)."""
    import pyarrow.feather as feather

    spec, uri, out = _spec(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}", small_tmpfs / "out"
    proc = _start(spec, out, uri)
    rows = out / "g" / "trials.arrow"
    _wait_for(rows, proc)
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # every byte left, so the sweep's next write fails with ENOSPC
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    _assert_one_line_write_error(proc, "No space left on device")
    assert _sweep_run_statuses(uri) == ["FAILED"]
    first = {r["tune_trial_id"]: r["finished_at"] for r in feather.read_table(rows).to_pylist()}
    assert first
    filler.unlink()
    again = _start(spec, out, uri)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0 and "Traceback" not in stderr, stdout[-2000:] + stderr[-2000:]
    final = feather.read_table(rows).to_pylist()
    assert {r["tune_trial_id"]: r["finished_at"] for r in final if r["tune_trial_id"] in first} == first
    assert sorted(r["seed"] for r in final) == [1, 2, 3, 4] and {r["status"] for r in final} == {"FINISHED"}


def test_an_unwritable_file_behind_tunes_error_is_one_line_naming_it(tmp_path):
    """Tune wraps a callback's OSError; the driver finds it among the causes and names the file and the fix."""
    from ray.tune.error import TuneError

    from orchestrator.sweep import _disk_error

    target = Path("/sys/promptsweep-results.arrow")  # sysfs: creating a file there fails (EACCES), even as root
    try:
        try:
            target.open("w")
        except OSError as e:
            raise TuneError("The Ray Tune run failed.") from e
    except TuneError as wrapped:
        found = _disk_error(wrapped, tmp_path)
    else:
        pytest.skip("/sys takes new files here")
    assert str(found) == (
        f"cannot write {target}: Permission denied; free space / fix permissions and rerun the same command to resume"
    )
    assert _disk_error(TuneError("The Ray Tune run failed."), tmp_path) is None
    assert _disk_error(FileNotFoundError(2, "No such file or directory", "x"), tmp_path) is None


@pytest.mark.parametrize("damage", ["truncated_json", "empty_pickle", "truncated_tuner_pkl"])
def test_a_damaged_tune_state_save_is_set_aside_whole(tmp_path, damage):
    """Tune, failing to load its state, would start a one-trial run: the save with an unreadable file (and
    tuner.pkl) is renamed *.damaged, an older driver's save is left, and intact state is not touched."""
    import pickle

    from orchestrator.tune_runner import DAMAGED_SUFFIX, set_aside_damaged_state

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    old, new = "2026-01-01_00-00-00", "2026-01-02_00-00-00"
    for stamp in (old, new):
        (tune_dir / f"experiment_state-{stamp}.json").write_text(json.dumps({"trial_data": [], "runner_data": {}}))
        for stem in ("search_gen_state", "searcher-state", "callback-states"):
            ext = "json" if stem == "search_gen_state" else "pkl"
            (tune_dir / f"{stem}-{stamp}.{ext}").write_bytes(pickle.dumps({"state": list(range(50))}))
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps({"tuner": "config"}))
    before = sorted(p.name for p in tune_dir.iterdir())
    assert set_aside_damaged_state(tune_dir) is None and sorted(p.name for p in tune_dir.iterdir()) == before
    target = {
        "truncated_json": f"experiment_state-{new}.json",
        "empty_pickle": f"searcher-state-{new}.pkl",
        "truncated_tuner_pkl": "tuner.pkl",
    }[damage]
    data = (tune_dir / target).read_bytes()
    (tune_dir / target).write_bytes(b"" if damage == "empty_pickle" else data[: len(data) // 2])
    line = set_aside_damaged_state(tune_dir)
    assert line.startswith(f"resume: Tune's saved state {target} cannot be read"), line
    names = sorted(p.name for p in tune_dir.iterdir())
    assert names == sorted([n + DAMAGED_SUFFIX if (new in n or n == "tuner.pkl") else n for n in before])
