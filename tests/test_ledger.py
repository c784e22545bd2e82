"""The ledger (trials.arrow + trials.journal): every row on disk at once, files rewritten geometrically (bytes per
trial flat in N), reads the same after a kill at any point; a trial an older Tune snapshot lost continues its run."""

from __future__ import annotations

import json

import pytest
from result_rows import cfg as _cfg

from orchestrator import ledger as L
from orchestrator import results as R


def _row(i: int, **kw) -> dict:
    return R.trial_row(
        _cfg(seed=i),
        {"val_acc": 50.0, "test_acc": float(i % 100), "epochs_run": 1},
        status=kw.pop("status", "FINISHED"),
        tune_trial_id=f"t{i}",
        **kw,
    )


def _book(tmp_path, **kw):
    return L.Ledger(tmp_path, {"sweep": "t"}, [], **kw)


def _same(a: dict, b: dict) -> bool:
    keys = set(a) - {"finished_at"}
    return {k: a[k] for k in keys} == {k: b[k] for k in keys} and abs(
        (a["finished_at"] - b["finished_at"]).total_seconds()
    ) < 0.001


def test_rows_are_on_disk_at_once_and_read_back_whole(tmp_path):
    book = _book(tmp_path)
    rows = [_row(i) for i in range(1, 41)]
    for r in rows:
        book.finished(r)
    assert book.journal_rows > 0  # the last rows are only in the journal: files are rewritten geometrically
    again = _book(tmp_path)
    assert sorted(again.rows) == sorted(r["tune_trial_id"] for r in rows)
    assert all(_same(again.rows[r["tune_trial_id"]], r) for r in rows)
    book.write()  # the end of a driver: every file complete, the journal gone (no trial open)
    assert not (tmp_path / L.JOURNAL_FILE).exists()
    assert [r["tune_trial_id"] for r in R.read_rows(tmp_path / R.TRIALS_FILE)] == sorted(
        (r["tune_trial_id"] for r in rows), key=lambda t: int(t[1:])
    )


def test_small_sweeps_rewrite_the_files_after_every_row(tmp_path):
    book = _book(tmp_path)
    for i in range(1, L.COMPACT_FRACTION + 1):
        book.finished(_row(i))
        assert book.journal_rows == 0 and len(R.read_rows(tmp_path / R.TRIALS_FILE)) == i


def test_rows_rewritten_in_all_grow_linearly_not_quadratically(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(R, "write_results", lambda out, rows, *a, **k: written.append(len(list(rows))))
    book = _book(tmp_path)
    n = 3000
    for i in range(1, n + 1):
        book.finished(_row(i))
    # each rewrite follows >= 1/COMPACT_FRACTION new rows: sum of rows rewritten <= (COMPACT_FRACTION + 1) * n
    assert sum(written) <= (L.COMPACT_FRACTION + 1) * n, (len(written), sum(written))
    assert len(written) < 80  # ~log(n) / log(1 + 1/8) rewrites, not n
    size = (tmp_path / L.JOURNAL_FILE).stat().st_size
    assert size < 3000 * (book.journal_rows + 1)  # the journal holds only the rows since the last rewrite


def test_a_killed_append_or_rewrite_leaves_a_ledger_that_reads_the_same(tmp_path):
    book = _book(tmp_path)
    for i in range(1, 21):
        book.finished(_row(i))
    book.started("t21", L.work_key("c", "final", 21, None), "run21")
    with open(tmp_path / L.JOURNAL_FILE, "a") as f:  # a driver killed in the middle of an append
        f.write('{"t": "row", "row": {"tune_trial_id": "t2')
    again = _book(tmp_path)
    assert len(again.rows) == 20 and list(again.starts) == ["t21"]
    # killed after the files were rewritten but before the journal was replaced: rows in both, read once
    R.write_results(tmp_path, again.rows.values(), {"sweep": "t"})
    third = _book(tmp_path)
    assert sorted(third.rows) == sorted(again.rows) and list(third.starts) == ["t21"]
    third.write()  # an open start survives a rewrite (the trial is still running)
    assert [e["tune_trial_id"] for e in L.read_journal(tmp_path)] == ["t21"]


def test_a_retry_replaces_the_failed_row_and_restarted_cells_are_dropped(tmp_path):
    book = _book(tmp_path)
    for i in range(1, 12):
        book.finished(_row(i, status="ERROR" if i == 3 else "FINISHED"))
    retry = dict(_row(3), tune_trial_id="r3", retry_of_trial="t3")
    book.finished(retry)
    again = _book(tmp_path)
    assert "t3" not in again.rows and again.rows["r3"]["status"] == "FINISHED" and len(again.rows) == 11
    cell = retry["cell_id"]
    dropped = _book(tmp_path, drop_cells={cell})
    assert dropped.dropped and not dropped.rows


def test_epoch_rows_travel_with_the_next_row(tmp_path):
    book = _book(tmp_path)
    for i in range(1, 10):
        book.finished(_row(i))
    cfg = _cfg(seed=99)
    for e in (1, 2):
        book.epoch(R.epoch_row(cfg, {"epoch": e, "train_loss": 1.0 / e, "val_acc": 10.0 * e}, "t99"))
    book.finished(_row(10))
    lines = [json.loads(x) for x in (tmp_path / L.JOURNAL_FILE).read_text().splitlines()]
    assert [x["t"] for x in lines][-3:] == ["epoch", "epoch", "row"]
    again = _book(tmp_path)
    assert {k for k in again.epochs if k[0] == "t99"} == {("t99", 1), ("t99", 2)}


def test_a_restored_trial_that_names_no_checkpoint_resumes_from_the_one_on_storage(tmp_path):
    """In a large sweep Tune's snapshot may predate a trial's first checkpoint: the trial resumes from the
    checkpoint on storage, not from scratch (a half-copied newer one is skipped); a new trial has no folder."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    import torch

    from orchestrator import checkpoint as C
    from orchestrator.tune_runner import _restorable_checkpoint

    trial_dir = tmp_path / "trial"
    C.save(trial_dir / "checkpoint_000003", {"method": {"ctx": torch.zeros(2)}, "epoch": 4})
    (trial_dir / "checkpoint_000002").mkdir()  # a leftover that does not load
    (trial_dir / "checkpoint_000004").mkdir()  # being copied when the driver died
    registered = []

    class FakeTrial:
        checkpoint = None
        storage = SimpleNamespace(
            storage_filesystem=pafs.LocalFileSystem(),
            trial_fs_path=str(trial_dir),
            trial_dir_name="trial",
            current_checkpoint_index=-1,
        )
        run_metadata = SimpleNamespace(checkpoint_manager=SimpleNamespace(latest_checkpoint_result=None))

        def on_checkpoint(self, result):
            registered.append(result)
            self.checkpoint = result.checkpoint

    t = FakeTrial()
    assert _restorable_checkpoint(t) == str(trial_dir / "checkpoint_000003")
    assert t.storage.current_checkpoint_index == 3 and len(registered) == 1
    assert _restorable_checkpoint(t) is None  # it names one that exists now
    new = FakeTrial()
    new.storage = SimpleNamespace(trial_dir_name=None)
    assert _restorable_checkpoint(new) is None


def test_the_driver_keeps_only_a_trials_newest_checkpoint(tmp_path):
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from orchestrator.tune_runner import ResultsCallback

    for i in range(4):
        (tmp_path / "trial" / f"checkpoint_00000{i}").mkdir(parents=True)
    (tmp_path / "trial" / "result.json").write_text("")
    cb = ResultsCallback(tmp_path / "out", {"sweep": "t"}, [])
    ckpt = SimpleNamespace(path=str(tmp_path / "trial" / "checkpoint_000002"), filesystem=pafs.LocalFileSystem())
    cb.on_checkpoint(0, [], None, ckpt)
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == [
        "checkpoint_000002",
        "checkpoint_000003",
        "result.json",
    ]


# --- the sweep: work an older snapshot lost is taken up by a new trial that continues its MLflow run ----------


@pytest.mark.slow
def test_a_trial_missing_from_tunes_snapshot_continues_its_mlflow_run(tmp_path):
    """A driver dies while a trial runs and Tune's saved state does not hold that trial (in a large sweep
    snapshots are periodic; here the state is removed): the next driver runs the work again as a new trial,
    which continues the old trial's MLflow run (no orphan RUNNING run, no duplicate), and every row is kept."""
    import shutil
    import time

    import yaml
    from mlflow.tracking import MlflowClient

    from tests.test_faults import Driver

    spec = {
        "name": "lost",
        "protocol": "fewshot",
        "methods": ["coop"],
        "datasets": ["digits"],
        "shots": [1],
        "seeds": [1, 2, 3],
        "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        "train": {"defaults": {"epochs": 60, "batch_size": 2, "num_workers": 0}},
        "resources": {"cpu": 1, "gpu": 0},
        "tracking": {"experiment": "lost"},
    }
    path = tmp_path / "lost.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out" / "lost"
    drivers = []
    try:
        drv = Driver(path, tmp_path / "out", uri, tmp_path)
        drv.args[-1] = "1"  # one trial at a time
        drivers.append(drv.start())
        deadline = time.monotonic() + 300
        while True:  # kill the driver once one trial has a row and the next one has started
            assert time.monotonic() < deadline and drv.proc.poll() is None, drv.output()[-3000:]
            book = L.Ledger(out, {}, []) if out.exists() else None
            if book is not None and len(book.rows) == 1 and book.starts:
                break
            time.sleep(0.2)
        drv.kill()
        book = L.Ledger(out, {}, [])
        assert len(book.rows) == 1 and len(book.starts) == 1, drv.output()[-3000:]
        ((lost_tid, lost),) = book.starts.items()
        shutil.rmtree(out / "tune")  # Tune's snapshot never held the trial that was running
        drv = Driver(path, tmp_path / "out", uri, tmp_path)
        drv.args[-1] = "1"
        drivers.append(drv.start())
        assert drv.wait(timeout=600) == 0, drv.output()[-4000:]
    finally:
        left = [p for d in drivers for p in d.cleanup()]
    assert not left, f"processes of this test still running after the sweep: {left}"
    rows = R.read_rows(out / R.TRIALS_FILE)
    assert sorted(x["seed"] for x in rows) == [1, 2, 3] and all(x["status"] == "FINISHED" for x in rows)
    mine = [x for x in rows if x["seed"] == lost["work"][2]][0]
    assert mine["tune_trial_id"] != lost_tid
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("lost").experiment_id], "tags.level = 'trial'")
    assert len(runs) == 3 and {x.info.status for x in runs} == {"FINISHED"}, [
        (x.info.status, x.data.tags) for x in runs
    ]
    assert {x["mlflow_run_id"] for x in rows} == {x.info.run_id for x in runs}
    cont = [x for x in runs if x.data.tags.get("continues_trial") == lost_tid]
    assert len(cont) == 1 and cont[0].data.tags["tune_trial_id"] == mine["tune_trial_id"]
    if lost["mlflow_run_id"]:
        assert cont[0].info.run_id == lost["mlflow_run_id"]


def test_the_scheduler_picks_the_first_waiting_trial_without_scanning_finished_ones():
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from orchestrator.tune_runner import LedgerScheduler

    class FakeTrial:
        checkpoint, config = None, {}
        storage = SimpleNamespace(trial_dir_name=None)

        def __init__(self, tid, status):
            self.trial_id, self.status = tid, status

    sched = LedgerScheduler(SimpleNamespace(adopt=lambda *a: None), prune=False)
    controller = SimpleNamespace(
        get_live_trials=lambda: set(), _checkpoint_manager=SimpleNamespace(_should_force_sync_up=False)
    )
    done = [FakeTrial(f"d{i}", Trial.RUNNING) for i in range(500)]
    waiting = [FakeTrial("p1", Trial.PENDING), FakeTrial("p2", Trial.PENDING)]
    for t in [*done, *waiting]:
        sched.on_trial_add(controller, t)
    for t in done:
        t.status = Trial.TERMINATED
    assert sched.choose_trial_to_run(controller) is waiting[0]
    assert list(sched._unfinished) == ["p1", "p2"]  # finished trials are not looked at again
    waiting[0].status = Trial.RUNNING
    assert sched.choose_trial_to_run(controller) is waiting[1]
    waiting[1].status = Trial.PAUSED
    assert sched.choose_trial_to_run(controller) is waiting[1]
    waiting[1].status = Trial.ERROR
    assert sched.choose_trial_to_run(controller) is None


def test_a_restored_trial_is_adopted_even_when_its_checkpoint_cannot_be_repaired(monkeypatch, capsys):
    """Adoption comes first: a failing checkpoint lookup must not let the searcher emit the trial's work again
    (Tune runs the restored trial anyway: the work would run twice)."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from orchestrator import tune_runner

    def broken(trial):
        raise OSError("storage unreachable")

    monkeypatch.setattr(tune_runner, "_restorable_checkpoint", broken)
    adopted = []
    sched = tune_runner.LedgerScheduler(SimpleNamespace(adopt=lambda tid, cfg: adopted.append(tid)), prune=False)
    controller = SimpleNamespace(
        get_live_trials=lambda: set(), _checkpoint_manager=SimpleNamespace(_should_force_sync_up=False)
    )
    sched.on_trial_add(controller, SimpleNamespace(trial_id="r1", status=Trial.PENDING, config={}, checkpoint=None))
    assert adopted == ["r1"] and "storage unreachable" in capsys.readouterr().err
