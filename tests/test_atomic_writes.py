"""Every file the driver writes (results, report, ``sweep.json``, the MLflow backlog) and every trial checkpoint goes through the one atomic writer, ``fewshot.paths.atomic_open``: the
content is fsynced in a temp file beside the target, the temp file is renamed onto the target, and then
the folder is fsynced (so the rename survives a power loss). Each writer is run with ``os.fsync`` and
``os.replace`` watched."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest


class Watch:
    """The order of fsyncs (of a regular file, by its path, or of a folder) and renames this process does."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            mode = os.fstat(fd).st_mode
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.events.append(("fsync_dir" if stat.S_ISDIR(mode) else "fsync_file", path))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            self.events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def assert_atomic(self, target: Path) -> None:
        """``target`` was written as: fsync of a temp file beside it, that file renamed onto it, its folder fsynced."""
        target = Path(target).resolve()
        renames = [
            i for i, (kind, what) in enumerate(self.events) if kind == "replace" and what.endswith(f" -> {target}")
        ]
        assert renames, f"{target} was not renamed into place: {self.events}"
        i = renames[-1]
        tmp = self.events[i][1].split(" -> ")[0]
        assert Path(tmp).parent == target.parent
        assert ("fsync_file", tmp) in self.events[:i], f"{tmp} was not fsynced before the rename: {self.events}"
        assert ("fsync_dir", str(target.parent)) in self.events[i + 1 :], (
            f"{target.parent} not fsynced after: {self.events}"
        )


@pytest.fixture
def watch(monkeypatch):
    return Watch(monkeypatch)


def test_the_writer_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, watch):
    from fewshot.paths import write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    watch.assert_atomic(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "x" and os.listdir(tmp_path) == ["a.txt"]


def test_checkpoint_state(tmp_path, watch):
    import torch

    from orchestrator import checkpoint

    checkpoint.save(tmp_path / "ckpt", {"epoch": 1, "method": {"w": torch.ones(2)}})
    watch.assert_atomic(tmp_path / "ckpt" / checkpoint.STATE_FILE)
    assert checkpoint.load(tmp_path / "ckpt")["epoch"] == 1
    assert os.listdir(tmp_path / "ckpt") == [checkpoint.STATE_FILE]


def test_sweep_json(tmp_path, watch):
    from orchestrator import sweep

    sweep._write_state(tmp_path, {"status": "running"})
    watch.assert_atomic(tmp_path / sweep.STATE_FILE)


def test_mlflow_backlog(tmp_path, watch):
    from orchestrator.mlflow_backlog import BACKLOG_FILE
    from orchestrator.mlflow_sender import LogBatch
    from orchestrator.tracking import MlflowTracking

    cb = MlflowTracking(f"sqlite:///{tmp_path}/mlflow.db", "e", "s", "h", out_dir=tmp_path)
    cb.sender._retry_at = time.monotonic() + 3600  # as after a failed send: nothing is tried meanwhile
    cb.sender.submit(LogBatch(key="sweep", tags={"a": "b"}))
    assert cb.write_backlog() == tmp_path / BACKLOG_FILE
    watch.assert_atomic(tmp_path / BACKLOG_FILE)


def test_result_tables(tmp_path, watch):
    from orchestrator.results import CELLS_FILE, PARQUET_SUFFIX, TRIALS_FILE, trial_row, write_results

    cfg = {
        "cell_id": "fewshot.coop.digits.1shot",
        "stage": "final",
        "seed": 1,
        "optuna_number": None,
        "params": {},
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
    row = trial_row(cfg, {"test_acc": 50.0, "final": 1}, status="FINISHED", tune_trial_id="t1")
    write_results(tmp_path, [row], {"sweep": "s"})
    for name in (TRIALS_FILE, CELLS_FILE):
        watch.assert_atomic(tmp_path / name)
        watch.assert_atomic((tmp_path / name).with_suffix(PARQUET_SUFFIX))


def test_report(tmp_path, watch):
    from orchestrator.report import _write_text

    _write_text(tmp_path / "report.md", "# r\n")
    watch.assert_atomic(tmp_path / "report.md")
