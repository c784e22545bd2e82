"""Faults injected for real into a running sweep (CLI driver on a local loopback Ray, tiny backbone, digits):

* the Ray worker process running a trial is SIGKILLed mid-training: Tune retries the trial from its
  last checkpoint (no epoch lost or repeated), it finishes with every planned epoch, and it is one
  row in trials.arrow and one MLflow run;
* the driver (``python -m orchestrator.sweep``) is SIGKILLed several times at seeded random moments
  and once inside a results write (``PROMPTSWEEP_FAULT_KILL_IN_WRITE``, orchestrator.results): after
  each kill the Arrow files that exist open in pyarrow and pandas; re-running the same command
  finishes the sweep with every planned trial exactly once in trials.arrow and in MLflow, and no
  trial that had a row is run again (its row, finished_at and Tune result log stay as they were).

Every process a test starts is stopped by PID: a killed driver's Ray processes (its children, which
Ray binds to it) are waited for and SIGKILLed if they linger; each driver gets its own RAY_TMPDIR,
so a last check can name any leftover process of this test exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.servers import process_tree, still_running

BASE = {
    "protocol": "fewshot",
    "datasets": ["digits"],
    "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
    "resources": {"cpu": 1, "gpu": 0},
    "max_retries": 1,
}


# --- helpers ----------------------------------------------------------------------------------------


def _write_spec(tmp: Path, spec: dict) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (a temp dir this test created: only its processes have it)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _zombie_until_reaped(pid: int, timeout: float) -> bool:
    """True when ``pid`` is a zombie (exited, waiting for its parent to collect it) that is gone within
    ``timeout``: an exited process re-parented as the driver exits is reaped by PID 1 a moment later, and is
    not a process left running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
        except OSError:
            return True  # reaped
        if state != "Z":
            return False
        time.sleep(0.1)
    return False


def _sigkill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Driver:
    """One ``python -m orchestrator.sweep`` run in its own session with its own RAY_TMPDIR."""

    def __init__(self, spec: Path, out: Path, uri: str, cwd: Path, **env):
        self.ray_tmp = tempfile.mkdtemp(prefix="psf.", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RAY_TMPDIR=self.ray_tmp, **env)
        for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            self.env.pop(k, None)
        self.args = [
            sys.executable,
            "-m",
            "orchestrator.sweep",
            str(spec),
            "--output",
            str(out),
            "--tracking-uri",
            uri,
            "--max-concurrent",
            "2",
        ]
        self.cwd = cwd
        self.log = cwd / f"driver-{os.path.basename(self.ray_tmp)}.log"
        self.proc = None
        self.started_at = None
        self.tree: dict = {}

    def start(self) -> "Driver":
        self.started_at = time.time()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def snapshot(self) -> dict:
        """The driver and its descendants now (Ray's GCS, raylet, workers, ...), with start times."""
        self.tree.update(process_tree([self.proc.pid]))
        return self.tree

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the sweep did not finish within {timeout:.0f}s:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL the driver (a crash); its Ray processes die with it — any still there after 3 s are SIGKILLed."""
        self.snapshot()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reap(grace=3)

    def reap(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.tree.update(process_tree(still_running(self.tree)))  # children forked since the snapshot
            if not still_running(self.tree):
                break
            time.sleep(0.2)
        _sigkill(still_running(self.tree))
        time.sleep(0.3)

    def cleanup(self) -> list[int]:
        """Stop whatever of this run is left (by PID); returns the PIDs that had to be killed."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        left = sorted(set(still_running(self.tree)) | set(_pids_mentioning(self.ray_tmp)))
        left = [pid for pid in left if not _zombie_until_reaped(pid, timeout=5.0)]
        _sigkill(left)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left


def _rows(path: Path) -> list[dict]:
    """trials.arrow through pyarrow, cross-checked with pandas (both must open it)."""
    import pandas as pd
    import pyarrow.feather as feather

    rows = feather.read_table(path).to_pylist()
    assert len(pd.read_feather(path)) == len(rows)
    return rows


def _check_readable(out: Path) -> list[dict]:
    """Every Arrow file that exists opens; returns the trials.arrow rows (empty when there is none yet)."""
    import pandas as pd
    import pyarrow.feather as feather

    if (out / "cells.arrow").exists():
        assert len(pd.read_feather(out / "cells.arrow")) == feather.read_table(out / "cells.arrow").num_rows
    return _rows(out / "trials.arrow") if (out / "trials.arrow").exists() else []


def _results(trial_dir: Path) -> list[dict]:
    p = trial_dir / "result.json"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


def _mlflow_runs_by_trial(uri: str, experiment: str, tids) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return {tid: c.search_runs([exp.experiment_id], f"tags.tune_trial_id = '{tid}'", max_results=10) for tid in tids}


def _trial_level_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], "tags.level = 'trial'", max_results=1000)


# --- 1. a trial's worker process is killed ------------------------------------------------------------


@pytest.mark.slow
def test_killed_trial_process_is_retried_from_its_checkpoint(tmp_path):
    epochs = 16
    spec = _write_spec(
        tmp_path,
        dict(
            BASE,
            name="killtrial",
            methods=["coop"],
            shots=[2],
            seeds=[1, 2],
            train={"defaults": {"epochs": epochs, "batch_size": 8, "num_workers": 0}},
            tracking={"experiment": "killtrial"},
        ),
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out" / "killtrial"
    drv = Driver(spec, tmp_path / "out", uri, tmp_path).start()
    try:
        victim, pid, epoch_at_kill = None, None, None
        deadline = time.monotonic() + 240
        while victim is None:
            assert time.monotonic() < deadline and drv.proc.poll() is None, drv.output()[-3000:]
            for d in sorted((out / "tune").glob("*/")) if (out / "tune").exists() else []:
                res = [r for r in _results(d) if r.get("epoch")]
                if 2 <= len(res) <= epochs - 6:  # checkpointed, and well before its end
                    victim, pid, epoch_at_kill = d.name, res[-1]["pid"], res[-1]["epoch"]
                    break
            time.sleep(0.1)
        ours = drv.snapshot()
        assert pid in ours, f"pid {pid} of trial {victim} is not a process this test started"
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"default_worker.py" in cmd or b"ray::" in cmd, cmd[:200]
        os.kill(pid, signal.SIGKILL)  # the trial's Ray worker dies mid-epoch

        rc = drv.wait(timeout=300)
        assert rc == 0, drv.output()[-4000:]
        rows = _rows(out / "trials.arrow")
        assert len(rows) == 2 and sorted(r["seed"] for r in rows) == [1, 2]
        assert [r["tune_trial_id"] for r in rows].count(victim) == 1
        assert all(r["status"] == "FINISHED" and r["epochs_run"] == epochs for r in rows), rows

        # the retry (another process) resumed from the last checkpoint Tune registered: Tune fetches a function
        # trainable's checkpoint with a separate call after logging its result, so the epoch whose checkpoint
        # was in flight when the process died may be trained again — never more than that one
        res = [r for r in _results(out / "tune" / victim) if r.get("epoch")]
        pids = [r["pid"] for r in res]
        shown = [(r["epoch"], r["pid"]) for r in res]
        assert pids[0] == pid and len(set(pids)) == 2, shown
        k = next(i for i, p in enumerate(pids) if p != pid)
        before, after = [r["epoch"] for r in res[:k]], [r["epoch"] for r in res[k:]]
        assert before == list(range(1, len(before) + 1)) and before[-1] >= epoch_at_kill, shown
        assert after == list(range(after[0], epochs + 1)), shown
        assert 1 < after[0] and before[-1] <= after[0] <= before[-1] + 1, shown

        runs = _mlflow_runs_by_trial(uri, "killtrial", [r["tune_trial_id"] for r in rows])
        assert all(len(v) == 1 for v in runs.values()), {k: len(v) for k, v in runs.items()}
        assert {r["mlflow_run_id"] for r in rows} == {v[0].info.run_id for v in runs.values()}
        assert runs[victim][0].info.status == "FINISHED"
        assert len(_trial_level_runs(uri, "killtrial")) == 2
    finally:
        left = drv.cleanup()
    assert not left, f"processes of this test still running after the sweep: {left}"


# --- 2. the driver is killed, again and again -------------------------------------------------------

DRIVER_EPOCHS = 40  # long enough that the third driver still has work when its kill lands
DRIVER_SPEC = dict(
    BASE,
    name="killdriver",
    methods=["zeroshot", "coop"],
    shots=[1],
    seeds=[1, 2],
    train={"defaults": {"epochs": DRIVER_EPOCHS, "batch_size": 16, "num_workers": 0}},
    search={
        "coop": {
            "n_trials": 2,
            "seeds": [1],
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 1},
            "space": {"lr": {"type": "float", "low": 0.0005, "high": 0.05, "log": True}},
        }
    },
    tracking={"experiment": "killdriver"},
)


def _reported_since(tune_dir: Path, t0: float) -> bool:
    """Some trial reported a result to this driver run (a result.json line written after ``t0``; Tune
    creates the file empty when the trial starts)."""
    if not tune_dir.exists():
        return False
    for p in tune_dir.glob("*/result.json"):
        st = p.stat()
        if st.st_size > 0 and st.st_mtime > t0:
            return True
    return False


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_rerunning_trials(tmp_path):
    import pyarrow.feather as feather

    from orchestrator.planner import plan
    from orchestrator.spec import load_spec

    rng = random.Random(8)  # the kill moments are random, and reproducible
    spec = _write_spec(tmp_path, DRIVER_SPEC)
    the_plan = plan(load_spec(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out" / "killdriver"
    kills = ["random", "write", "random"]
    finished: dict[str, tuple] = {}  # tune trial id -> (finished_at, wall_time_s, result.json lines) at a kill
    drivers: list[Driver] = []
    log = []
    cut_off = None  # the trial whose results write was killed
    try:
        for kind in kills:
            # the driver's 2nd atomic write is cells.arrow of the first trial it records: that trial's row is in
            # trials.arrow, cells.arrow is the old one, and Tune's snapshot still has the trial running
            drv = Driver(
                spec,
                tmp_path / "out",
                uri,
                tmp_path,
                **({"PROMPTSWEEP_FAULT_KILL_IN_WRITE": "2"} if kind == "write" else {}),
            )
            drivers.append(drv.start())
            if kind == "write":  # dies by itself between the temp file and os.replace
                before = {r["tune_trial_id"] for r in _check_readable(out)}
                rc = drv.wait(timeout=240)
                assert rc == -signal.SIGKILL, (rc, drv.output()[-3000:])
                drv.reap(grace=3)
                assert list(out.glob(".cells.arrow.*.tmp")), "the hook did not fire inside write_atomic"
                new = {r["tune_trial_id"] for r in _check_readable(out)} - before
                assert len(new) == 1, new
                cut_off = new.pop()
            else:
                deadline = time.monotonic() + 240
                while not _reported_since(out / "tune", drv.started_at) and drv.proc.poll() is None:
                    assert time.monotonic() < deadline, drv.output()[-3000:]
                    time.sleep(0.1)
                delay = rng.uniform(0.0, 3.0)
                time.sleep(delay)
                if drv.proc.poll() is not None:  # the sweep finished before the kill: nothing left to kill
                    break
                drv.kill()
            rows = _check_readable(out)
            log.append((kind, round(time.time() - drv.started_at, 1), len(rows)))
            for r in rows:
                lines = len(_results(out / "tune" / r["tune_trial_id"]))
                finished.setdefault(r["tune_trial_id"], (r["finished_at"], r["wall_time_s"], lines))
        assert len(finished) < the_plan.n_trials, f"kills came too late to test anything: {log}"

        drv = Driver(spec, tmp_path / "out", uri, tmp_path)
        drivers.append(drv.start())
        rc = drv.wait(timeout=300)
        assert rc == 0, drv.output()[-4000:]
        print(f"kills (kind, seconds into the run, rows): {log}; last run {time.time() - drv.started_at:.0f}s")
        for d in drivers:
            print("".join(line for line in d.output().splitlines(True) if line.startswith("resume:")), end="")
        assert not list(out.glob(".*.arrow.*.tmp"))  # the killed write's temp file was cleaned up
        nxt = drivers[kills.index("write") + 1].output()
        assert f"resume: trial {cut_off} finished after Tune's last snapshot" in nxt, nxt[-3000:]
        assert json.loads((out / "sweep.json").read_text())["status"] == "finished"

        rows = _rows(out / "trials.arrow")
        assert len(rows) == the_plan.n_trials == 6, [(r["cell_id"], r["stage"], r["seed"]) for r in rows]
        assert all(r["status"] == "FINISHED" for r in rows), [(r["status"], r["error_message"]) for r in rows]
        tids = [r["tune_trial_id"] for r in rows]
        assert len(set(tids)) == len(tids)
        work = [
            (r["cell_id"], r["stage"], r["seed"], r["optuna_trial_number"] if r["stage"] == "search" else None)
            for r in rows
        ]
        assert len(set(work)) == len(work), work  # each planned trial once
        for c in the_plan.cells:
            mine = [r for r in rows if r["cell_id"] == c.cell_id]
            assert sorted(r["seed"] for r in mine if r["stage"] == "final") == sorted(c.final_seeds)
            assert sorted(r["optuna_trial_number"] for r in mine if r["stage"] == "search") == list(range(c.n_trials))

        by_id = {r["tune_trial_id"]: r for r in rows}
        for tid, (fin, wall, lines) in finished.items():  # a trial with a row was never run again
            assert tid in by_id, f"trial {tid} had a row after a kill and lost it: {log}"
            assert (by_id[tid]["finished_at"], by_id[tid]["wall_time_s"]) == (fin, wall), tid
            assert len(_results(out / "tune" / tid)) == lines, f"trial {tid} reported again after it had a row"

        # trials that were running when their driver died were resumed from a checkpoint, not from scratch: at
        # each restart the epoch goes on from about where the saved log stops (the log on storage is synced with
        # Tune's snapshot; the epoch in flight may be done again, or — when the snapshot's checkpoint was deleted
        # already — the trial resumes one checkpoint later)
        restarts = 0
        for r in rows:
            res = _results(out / "tune" / r["tune_trial_id"])
            epochs = [x.get("epoch") for x in res]
            for i in range(1, len(res)):
                if res[i].get("iterations_since_restore") == 1 and epochs[i] is not None:
                    done = max((e for e in epochs[:i] if e is not None), default=0)
                    assert done > 0 and done <= epochs[i] <= done + 2, (r["tune_trial_id"], epochs)
                    restarts += 1
            if r["method"] == "coop":
                assert r["epochs_run"] == DRIVER_EPOCHS
        assert restarts >= 1, "no kill hit a running trial"

        cells = feather.read_table(out / "cells.arrow").to_pylist()
        assert sorted(c["n"] for c in cells) == [2, 2]

        import optuna

        study = optuna.load_study(
            study_name="fewshot.coop.digits.1shot",
            storage=optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))
            ),
        )
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]  # 2 proposals, none left open

        runs = _mlflow_runs_by_trial(uri, "killdriver", tids)
        assert all(len(v) == 1 for v in runs.values()), {k: len(v) for k, v in runs.items()}
        assert {r["mlflow_run_id"] for r in rows} == {v[0].info.run_id for v in runs.values()}
        trial_runs = _trial_level_runs(uri, "killdriver")
        assert len(trial_runs) == len(rows), sorted(r.data.tags["tune_trial_id"] for r in trial_runs)
    finally:
        left = [p for d in drivers for p in d.cleanup()]
    assert not left, f"processes of this test still running after the sweep: {left}"


# --- the reconciliation pieces, driven directly (fast) ----------------------------------------------


def _cell_searcher(tmp_path, n_trials=3, search_seeds=(1,), final_seeds=(1, 2), space=None):
    from orchestrator.planner import plan
    from orchestrator.searcher import CellSearcher
    from orchestrator.spec import parse_spec

    space = space or {"lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}}
    spec = parse_spec(
        {
            "name": "t",
            "methods": ["coop"],
            "datasets": ["digits"],
            "shots": [2],
            "seeds": list(final_seeds),
            "train": {"methods": {"coop": {"lr": 0.002}}},
            "search": {
                "coop": {
                    "n_trials": n_trials,
                    "seeds": list(search_seeds),
                    "space": space,
                    "sampler": {"name": "tpe", "n_startup_trials": 1},
                }
            },
        }
    )
    p = plan(spec)
    return p, CellSearcher(p.cells, {"backbone": {"arch": "promptsweep-tiny"}}, str(tmp_path / "optuna.journal"))


def _restart(tmp_path, live=(), rows=(), **kw):
    """A new driver's searcher: nothing of the killed driver's searcher is kept but the Optuna journal; it gets
    the rows on file (``set_ledger``) and the trials Tune restores to run again (``adopt``: (id, config))."""
    _, s = _cell_searcher(tmp_path, **kw)
    s.set_ledger(list(rows))
    for tid, cfg in live:
        s.adopt(tid, cfg)
    return s


def _value(cfg):
    return 10 + 100 * cfg["params"].get("lr", 0.0) + cfg["seed"]


def _drain(s, prefix):
    from ray.tune.search import Searcher

    emitted, i = [], 0
    while True:
        cfg = s.suggest(f"{prefix}{i}")
        if cfg is Searcher.FINISHED:
            return emitted
        assert isinstance(cfg, dict), "the searcher waits on a trial nobody runs"
        emitted.append(cfg)
        s.on_trial_complete(f"{prefix}{i}", {"val_acc": _value(cfg)})
        i += 1


def _study_trials(s):
    return s.study(s.cells[0]).get_trials(deepcopy=False)


def test_searcher_adopts_a_proposal_asked_after_the_last_snapshot(tmp_path):
    p, s = _cell_searcher(tmp_path)
    first = s.suggest("a0")  # the killed driver asked Optuna for the defaults proposal (journal) ...
    assert first["params"] == {"lr": 0.002}
    s2 = _restart(tmp_path)  # ... and died before Tune's next snapshot held the trial
    again = s2.suggest("b0")
    assert again["optuna_number"] == 0 and again["params"] == first["params"]
    s2.on_trial_complete("b0", {"val_acc": _value(again)})
    rest = _drain(s2, "c")
    assert len(rest) + 1 == p.n_trials
    trials = _study_trials(s2)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # no orphan RUNNING trial, no second defaults trial
    assert sum(t.user_attrs.get("source") == "method defaults" for t in trials) == 1


def test_searcher_skips_a_tell_the_journal_already_has(tmp_path):
    p, s = _cell_searcher(tmp_path)
    cfg = s.suggest("a0")  # the trial is running in Tune's snapshot ...
    s.on_trial_complete("a0", {"val_acc": 50.0})  # ... finished and was told after it, before its row was written
    s2 = _restart(tmp_path, live=[("a0", cfg)])
    s2.on_trial_complete("a0", {"val_acc": 50.0})  # the restored trial completes again: no "Cannot tell"
    assert _study_trials(s2)[0].value == 50.0
    assert len(_drain(s2, "b")) + 1 == p.n_trials
    assert cfg["optuna_number"] == 0


def test_searcher_counts_work_from_the_ledger_instead_of_emitting_it(tmp_path):
    from orchestrator.results import trial_row

    p, s = _cell_searcher(tmp_path)
    rows = []
    for i in range(3):  # a killed driver ran the first proposals (one search seed each) after the snapshot
        cfg = s.suggest(f"g{i}")
        if i < 2:
            s.on_trial_complete(f"g{i}", {"val_acc": _value(cfg)})
            rows.append(
                trial_row(
                    cfg, {"val_acc": _value(cfg), "test_images_read": 0}, status="FINISHED", tune_trial_id=f"g{i}"
                )
            )
    s2 = _restart(tmp_path, rows=rows)  # Tune's snapshot held none of them
    emitted = _drain(s2, "n")
    assert [(c["stage"], c["optuna_number"]) for c in emitted] == [("search", 2), ("final", None), ("final", None)] or [
        c["stage"] for c in emitted
    ] == ["search", "final", "final"]
    assert len(emitted) + len(rows) == p.n_trials
    assert {"g0", "g1"} <= set(s2.trials) and all(s2.trials[t]["done"] for t in ("g0", "g1"))
    assert [t.state.name for t in _study_trials(s2)] == ["COMPLETE"] * 3
    best_value, best_params = s2.best(p.cells[0].cell_id)
    finals = [c for c in emitted if c["stage"] == "final"]
    assert all(c["params"] == best_params for c in finals) and best_value is not None


def test_ledger_scheduler_does_not_rerun_a_restored_trial_that_has_a_row():
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from orchestrator.tune_runner import LedgerScheduler

    adopted = []
    searcher = SimpleNamespace(adopt=lambda tid, cfg: adopted.append(tid))
    live: set = set()
    controller = SimpleNamespace(
        get_live_trials=lambda: live, _checkpoint_manager=SimpleNamespace(_should_force_sync_up=False)
    )
    ledger = {"done": {"status": "FINISHED", "val_acc": 40.0}, "failed": {"status": "ERROR", "val_acc": None}}
    sched = LedgerScheduler(searcher, prune=False, ledger=ledger)

    import pyarrow.fs as pafs

    class FakeTrial:
        checkpoint = None
        config = {}
        storage = SimpleNamespace(
            storage_filesystem=pafs.LocalFileSystem(),  # no checkpoint on storage either
            trial_fs_path="/nonexistent-promptsweep-trial",
        )

        def __init__(self, trial_id):
            self.trial_id, self.status = trial_id, Trial.PENDING  # as Tune re-queues a restored unfinished trial

        def set_status(self, status):
            self.status = status

    trials = {tid: FakeTrial(tid) for tid in ("done", "failed", "new")}
    for t in trials.values():
        live.add(t)  # Tune files the trial as live before it calls on_trial_add
        sched.on_trial_add(controller, t)
    # a row stands, failed or not (a failed one runs again only under --retry-failed, as a new trial)
    assert trials["done"].status == trials["failed"].status == Trial.TERMINATED
    assert trials["new"].status == Trial.PENDING and {t.trial_id for t in live} == {"new"}  # Tune runs it
    assert adopted == ["new"]  # the searcher learns which trial runs that work
    assert controller._checkpoint_manager._should_force_sync_up  # Tune saves its snapshot at the end of the step
    assert LedgerScheduler(searcher).__getstate__()["ledger"] == {}


def test_rows_read_back_and_the_write_hook_kills_between_temp_and_replace(tmp_path):
    from fewshot.paths import FILE_MODE
    from orchestrator import results as R

    def cfg(seed):
        return {
            "cell_id": "fewshot.coop.digits.2shot",
            "stage": "final",
            "seed": seed,
            "optuna_number": 0,
            "params": {"lr": 0.01},
            "request": {
                "method": "coop",
                "dataset": "digits",
                "shots": 2,
                "seed": seed,
                "protocol": "fewshot",
                "stage": "final",
                "overrides": {"lr": 0.01},
            },
        }

    rows = [
        R.trial_row(
            cfg(s),
            {"val_acc": 50.0 + s, "test_acc": 40.0, "acc_x": 1.0, "epochs_run": 2},
            status="FINISHED",
            tune_trial_id=f"t{s}",
        )
        for s in (1, 2)
    ]
    R.write_results(tmp_path, rows, {"sweep": "t"})
    assert (os.stat(tmp_path / R.TRIALS_FILE).st_mode & 0o777) == FILE_MODE
    back = {r["tune_trial_id"]: r for r in R.read_rows(tmp_path / R.TRIALS_FILE)}
    for r in rows:
        b = back[r["tune_trial_id"]]
        assert b["params"] == r["params"] and b["extra_metrics"] == r["extra_metrics"] == {"acc_x": 1.0}
        assert abs((b["finished_at"] - r["finished_at"]).total_seconds()) < 0.001
        assert {k: b[k] for k in r if k != "finished_at"} == {k: r[k] for k in r if k != "finished_at"}
    before = (tmp_path / R.TRIALS_FILE).read_bytes()
    code = (
        "import sys; from orchestrator import results as R; rows = R.read_rows(sys.argv[1] + '/trials.arrow'); "
        "R.write_results(sys.argv[1], rows[:1], {'sweep': 't'})"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=dict(os.environ, **{R.FAULT_KILL_IN_WRITE_ENV: "1"})
    )
    assert p.returncode == -signal.SIGKILL
    assert (tmp_path / R.TRIALS_FILE).read_bytes() == before  # the old file is whole; the new one never landed
    left = list(tmp_path.glob(".trials.arrow.*.tmp"))
    assert len(left) == 1 and R.remove_stale_temps(tmp_path) == left and not left[0].exists()


def test_a_restored_trial_whose_checkpoint_tune_deleted_resumes_from_the_next_one(tmp_path):
    from types import SimpleNamespace

    import torch
    from ray.tune import Checkpoint

    from orchestrator import checkpoint as C
    from orchestrator.tune_runner import _restorable_checkpoint

    def state(epoch):
        return {"method": {"ctx": torch.zeros(2)}, "epoch": epoch}

    trial_dir = tmp_path / "trial"
    C.save(trial_dir / "checkpoint_000005", state(6))  # registered after the snapshot that names 000004
    (trial_dir / "checkpoint_000006").mkdir()  # being copied when the driver died
    (trial_dir / "checkpoint_000006" / C.STATE_FILE).write_bytes(b"PK\x03\x04 half")

    registered = []

    class FakeTrial:
        checkpoint = Checkpoint(str(trial_dir / "checkpoint_000004"))  # what Tune's snapshot says, deleted
        storage = SimpleNamespace(current_checkpoint_index=4)  # the index of checkpoint_000004
        run_metadata = SimpleNamespace(
            checkpoint_manager=SimpleNamespace(
                latest_checkpoint_result=SimpleNamespace(metrics={"training_iteration": 5})
            )
        )

        def on_checkpoint(self, result):
            registered.append(result)
            self.checkpoint = result.checkpoint

    t = FakeTrial()
    assert _restorable_checkpoint(t) == str(trial_dir / "checkpoint_000005")
    assert registered[0].metrics == {"training_iteration": 6} and t.storage.current_checkpoint_index == 5
    assert _restorable_checkpoint(t) is None  # it exists now: nothing to do

    C.save(trial_dir / "checkpoint_000007", state(8))
    t2 = FakeTrial()
    t2.checkpoint = Checkpoint(str(trial_dir / "checkpoint_000005"))
    (trial_dir / "checkpoint_000005" / C.STATE_FILE).unlink()
    (trial_dir / "checkpoint_000005").rmdir()
    assert _restorable_checkpoint(t2) == str(trial_dir / "checkpoint_000007")  # skips the half-written one
