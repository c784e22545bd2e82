"""The sweep's ledger: what the driver records as trials start and finish, on disk at once and at a cost per
trial that does not grow with the sweep.

The ledger is the result files (``trials.arrow``, ``epochs.arrow`` and the tables derived from them, see
``orchestrator.results``) plus ``trials.journal``, JSON lines appended and flushed to disk as things happen:

* ``start``: a trial started — its Tune id, its unit of work (cell, stage, seed, proposal) and its MLflow
  run (once known), so a driver that restarts from an older Tune snapshot knows the work was under way
  and the trial that takes it up continues the same MLflow run;
* ``row``: a trial finished — its ``trials.arrow`` row, with the epoch rows reported since the last append.

Rewriting every result file after every trial would cost O(N) bytes per trial (O(N^2) for a sweep). So a
finished trial's row is appended to the journal, and the files are rewritten (the row going straight into
them, not through the journal) only when the journal would hold at least ``1/COMPACT_FRACTION`` as many
rows as ``trials.arrow`` — after every trial while a sweep is small, every few hundred trials in a sweep of
thousands — and at the end of every driver; a rewrite then replaces the journal (atomically) by the starts
of trials that have no row yet. Reading the ledger (``Ledger(out_dir)``, ``read_ledger_rows``) takes the
files' rows, then the journal's in order: a later row of the same Tune trial replaces the earlier one, a row
that retries a failed trial replaces the failed one. A driver killed at any moment — mid-append (a torn last
line is ignored), between a rewrite and the journal's replacement (the rows are then in both) — leaves a
ledger that reads as everything it had recorded.

While a sweep runs, ``trials.arrow`` may lag the journal by that fraction; the sweep's own summary, the
report and every file are complete once the driver ends (also on Ctrl-C or an error).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional

from fewshot.paths import atomic_open, fsync_dir

JOURNAL_FILE = "trials.journal"
#: rewrite the result files when journal rows >= trials.arrow rows / COMPACT_FRACTION
COMPACT_FRACTION = 8


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _decode(obj: dict) -> Any:
    if len(obj) == 1 and "$datetime" in obj:
        return datetime.fromisoformat(obj["$datetime"])
    return obj


def work_key(cell_id: str, stage: str, seed: int, number: Optional[int]) -> tuple:
    """A planned unit of work: (cell, stage, seed, proposal number for a search trial)."""
    return (cell_id, stage, int(seed), number if stage == "search" else None)


def read_journal(out_dir: Path) -> list[dict]:
    """The journal's entries in order (a line cut short by a killed driver, always the last, is skipped)."""
    path = Path(out_dir) / JOURNAL_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line, object_hook=_decode))
        except ValueError:
            continue
    return entries


class Ledger:
    """The rows, epoch rows and unfinished starts of a sweep's output directory; appends and rewrites.

    ``rows``: Tune trial id -> ``trials.arrow`` row; ``epochs``: (trial id, epoch) -> ``epochs.arrow`` row;
    ``starts``: trial id -> the ``start`` entry of a trial that has no row. Rows of ``drop_cells``
    (``--restart-cells``) are left out (``dropped`` says whether there were any)."""

    def __init__(self, out_dir: Path, meta: dict, cell_order: list[str], drop_cells: Optional[set] = None):
        from orchestrator.results import EPOCHS_FILE, TRIALS_FILE, read_epochs, read_rows

        self.out_dir = Path(out_dir)
        self.meta = dict(meta)
        self.cell_order = list(cell_order)
        self.drop_cells = set(drop_cells or ())
        self.rows: dict[str, dict] = {}
        self.epochs: dict[tuple[str, int], dict] = {}
        self.starts: dict[str, dict] = {}
        self.file_rows = 0  # rows trials.arrow had when last read or written
        self.journal_rows = 0  # row entries appended since
        self._new_epochs: list[dict] = []
        path = self.out_dir / TRIALS_FILE
        if path.exists():
            try:
                for r in read_rows(path):
                    self.rows[r["tune_trial_id"]] = r
            except Exception as e:  # noqa: BLE001 - damaged from outside: the journal (and Tune's old state) stay
                kept = path.with_name(path.name + ".unreadable")
                os.replace(path, kept)
                print(
                    f"warning: {path} is unreadable ({type(e).__name__}: {e}; moved to {kept.name}); continuing "
                    "from the rows in the journal and Tune's experiment state",
                    file=sys.stderr,
                    flush=True,
                )
        self.file_rows = len(self.rows)
        try:
            self.epochs = {(r["tune_trial_id"], r["epoch"]): r for r in read_epochs(self.out_dir / EPOCHS_FILE)}
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - the trials' rows matter, the curves are extra
            print(
                f"warning: {self.out_dir / EPOCHS_FILE} is unreadable ({type(e).__name__}: {e}); the epochs "
                "recorded before this run are left out of the new one",
                file=sys.stderr,
                flush=True,
            )
        for entry in read_journal(self.out_dir):
            kind = entry.get("t")
            if kind == "start":
                self.starts[entry["tune_trial_id"]] = entry
            elif kind == "row":
                self._add_row(entry["row"])
                self.journal_rows += 1
            elif kind == "epoch":
                r = entry["row"]
                self.epochs[(r["tune_trial_id"], r["epoch"])] = r
        self.starts = {t: s for t, s in self.starts.items() if t not in self.rows}
        dropped = [t for t, r in self.rows.items() if r["cell_id"] in self.drop_cells]
        for t in dropped:
            del self.rows[t]
        self.starts = {t: s for t, s in self.starts.items() if s["work"][0] not in self.drop_cells}
        self.epochs = {k: r for k, r in self.epochs.items() if r.get("cell_id") not in self.drop_cells}
        self.dropped = bool(dropped)

    def _add_row(self, row: dict) -> None:
        retried = row.get("retry_of_trial")
        if retried and retried != row["tune_trial_id"]:
            self.rows.pop(retried, None)  # the new attempt replaces the failed row
        self.rows[row["tune_trial_id"]] = row
        self.starts.pop(row["tune_trial_id"], None)

    # --- appends ---------------------------------------------------------------------------------
    def _append(self, entries: list[dict]) -> None:
        path = self.out_dir / JOURNAL_FILE
        new = not path.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write("".join(json.dumps(e, default=_encode, allow_nan=True) + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.out_dir)

    def started(self, tune_trial_id: str, work: tuple, mlflow_run_id: Optional[str]) -> None:
        """A trial started (or was started again by a restored driver): on record before it can finish."""
        entry = {"t": "start", "tune_trial_id": tune_trial_id, "work": list(work), "mlflow_run_id": mlflow_run_id}
        if self.starts.get(tune_trial_id) == entry:
            return
        self.starts[tune_trial_id] = entry
        self._append([entry])

    def epoch(self, row: dict) -> None:
        """An epoch row (kept in memory, appended with the next finished row; a re-run epoch replaces its row)."""
        self.epochs[(row["tune_trial_id"], row["epoch"])] = row
        self._new_epochs.append(row)

    def finished(self, row: dict) -> None:
        """A trial's row: appended to the journal at once; the result files are rewritten when it is time."""
        self._add_row(row)
        if (self.journal_rows + 1) * COMPACT_FRACTION >= self.file_rows:
            self.write()  # the row goes straight into trials.arrow
            return
        entries = [{"t": "epoch", "row": r} for r in self._new_epochs] + [{"t": "row", "row": row}]
        self._new_epochs = []
        self._append(entries)
        self.journal_rows += 1

    # --- the result files ----------------------------------------------------------------------
    def write(self) -> None:
        """Rewrite every result file from the ledger, then replace the journal by the open starts."""
        from orchestrator.results import write_results

        write_results(self.out_dir, self.rows.values(), self.meta, self.cell_order, epochs=self.epochs.values())
        self.file_rows, self.journal_rows, self._new_epochs = len(self.rows), 0, []
        path = self.out_dir / JOURNAL_FILE
        if self.starts:
            with atomic_open(path, "w") as f:
                f.write("".join(json.dumps(e, default=_encode) + "\n" for e in self.starts.values()))
        elif path.exists():
            path.unlink()
            fsync_dir(self.out_dir)


def read_ledger_rows(out_dir: Path) -> list[dict]:
    """Every recorded trial row of a sweep's output directory (``trials.arrow`` and the journal)."""
    return list(Ledger(out_dir, {}, []).rows.values())


def open_starts(entries: Iterable[dict]) -> dict[tuple, dict]:
    """Work key -> the ``start`` entry of its latest trial, for starts without a row."""
    return {tuple(e["work"]): e for e in entries}
