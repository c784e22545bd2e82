"""The sweep's Arrow results: ``trials.arrow`` (one row per trial), ``cells.arrow`` (per cell over final seeds)
and ``epochs.arrow`` (one row per trial x epoch).

Owns the column tables (``TRIAL_HEAD`` / ``TRIAL_TAIL``, ``CELL_HEAD`` / ``CELL_TAIL``, ``EPOCH_COLUMNS``:
name, Arrow type, description and unit — the schemas, the field metadata and the row readers all come
from them; accuracies are percent), the schema metadata (schema version, spec hash, package versions), the
per-cell aggregation (n, mean, std of each metric; base2novel HM from the seed-mean base and
novel accuracies) and atomic writes (``fewshot.paths.atomic_open``: temp file in the same directory, flushed
to disk, ``os.replace``, the directory flushed; the file gets the usual ``0666 & ~umask`` mode, not
``mkstemp``'s 0600). Each table is
written twice, the same rows and schema metadata: Arrow IPC (Feather v2: ``trials.arrow``, the ledger a
resumed sweep reads; pyarrow, pandas ``read_feather``, polars ``read_ipc``) and Parquet
(``trials.parquet``, which DuckDB reads without an extension; pandas / polars ``read_parquet``). Only
the driver writes them. ``read_rows`` turns ``trials.arrow`` back into rows (the
ledger a restarted driver resumes from); ``remove_stale_temps`` deletes the temp files a killed
writer left behind.

Fault-injection hook (tests only): with ``PROMPTSWEEP_FAULT_KILL_IN_WRITE=N`` (N >= 1) in its
environment, the process SIGKILLs itself during its N-th atomic write — after the temp file is
complete, before ``os.replace`` — the worst moment for a driver to die.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from fewshot.paths import atomic_open

SCHEMA_VERSION = "2"
TRIALS_FILE, CELLS_FILE, EPOCHS_FILE = "trials.arrow", "cells.arrow", "epochs.arrow"
RESULT_FILES = (TRIALS_FILE, CELLS_FILE, EPOCHS_FILE)
PARQUET_SUFFIX = ".parquet"  # each Arrow file's Parquet twin: trials.parquet, cells.parquet, epochs.parquet
#: metrics every row has a column for (others, e.g. acc_<target>, are added when present)
CORE_METRICS = ("val_acc", "test_acc", "base_acc", "novel_acc", "hm", "target_avg")
KEY_COLUMNS = ("cell_id", "protocol", "method", "dataset", "shots")
#: a trial's ``status``: it ran to its final metrics / its cell's pruner stopped it early / it failed
OK_STATUS, PRUNED_STATUS, ERROR_STATUS = "FINISHED", "PRUNED", "ERROR"
_LEGACY_STATUS = {"TERMINATED": OK_STATUS}  # schema 1 wrote Tune's name for a finished trial
FAULT_KILL_IN_WRITE_ENV = "PROMPTSWEEP_FAULT_KILL_IN_WRITE"
_writes = 0  # atomic writes by this process (for the fault-injection hook)


@dataclass(frozen=True)
class Column:
    """One column of a results table: its Arrow type, and the description and unit stored in the field's
    metadata (``schema.field(name).metadata``: ``b"description"``, ``b"unit"``)."""

    name: str
    type: pa.DataType
    description: str
    unit: str = ""

    def field(self) -> pa.Field:
        meta = {"description": self.description, **({"unit": self.unit} if self.unit else {})}
        return pa.field(self.name, self.type, metadata=meta)


_METRIC_TEXT = {"val_acc": "validation accuracy (the searched objective; few-shot val split)",
                "test_acc": "test accuracy", "base_acc": "test accuracy on the base classes (base2novel)",
                "novel_acc": "test accuracy on the novel classes (base2novel)",
                "hm": "harmonic mean of base_acc and novel_acc (base2novel)",
                "target_avg": "mean test accuracy over the target datasets (cross_dataset, domain_generalization)"}


def metric_column(name: str) -> Column:
    if name.startswith("acc_"):
        return Column(name, pa.float64(), f"test accuracy on target dataset {name[4:]}", "%")
    return Column(name, pa.float64(), _METRIC_TEXT[name], "%")


def param_column(name: str, type_: pa.DataType) -> Column:
    return Column(f"param_{name}", type_, f"hyperparameter {name} of the trial (searched by Optuna or fixed by the spec)")


#: the columns every results table starts with (``sweep`` and ``backbone`` are the same in every row of a sweep)
_ID_COLUMNS = (
    Column("sweep", pa.string(), "sweep name (the spec's name)"),
    Column("backbone", pa.string(), "CLIP backbone as arch:pretrained (pretrained 'random-init' when none)"),
    Column("cell_id", pa.string(), "cell: protocol.method.dataset.<shots>shot"),
    Column("protocol", pa.string(), "evaluation protocol: fewshot, base2novel, cross_dataset, domain_generalization"),
    Column("method", pa.string(), "prompt-tuning method (python -m methods list)"),
    Column("dataset", pa.string(), "training dataset"),
    Column("shots", pa.int16(), "training images per class (K of the K-shot split)", "images"),
)
_SEED = Column("seed", pa.int64(), "seed of the few-shot split and of training")
TRIAL_HEAD = _ID_COLUMNS + (
    _SEED,
    Column("stage", pa.string(), "search (an Optuna trial, scored on val) or final (chosen parameters, one per seed)"),
    Column("params_json", pa.string(), "the trial's hyperparameters as a JSON object"),
)
TRIAL_TAIL = (
    Column("epochs_run", pa.int32(), "training epochs completed", "epochs"),
    Column("wall_time_s", pa.float64(), "wall time of the trial", "s"),
    Column("test_images_read", pa.int64(), "test images the trial read (0 for search trials: they never see test)",
           "images"),
    Column("status", pa.string(), "FINISHED (ran to its final metrics), PRUNED (stopped early by its cell's pruner) "
                                  "or ERROR"),
    Column("error_class", pa.string(), "kind of failure (status ERROR), e.g. nan_loss, data_error"),
    Column("error_message", pa.string(), "the failure's one-line message (status ERROR)"),
    Column("node_id", pa.string(), "address of the Ray node that ran the trial"),
    Column("tune_trial_id", pa.string(), "Ray Tune trial id (its folder under tune/)"),
    Column("optuna_trial_number", pa.int32(), "number of the Optuna trial in the cell's study"),
    Column("mlflow_run_id", pa.string(), "MLflow run of the trial"),
    Column("config_hash", pa.string(), "hash of everything that defines the trial's training"),
    Column("finished_at", pa.timestamp("ms", tz="UTC"), "when the driver recorded the trial"),
)
CELL_HEAD = _ID_COLUMNS + (
    Column("n", pa.int32(), "final runs (seeds) that finished", "runs"),
    Column("n_failed", pa.int32(), "final runs that did not finish", "runs"),
    Column("params_json", pa.string(), "the cell's chosen hyperparameters as a JSON object"),
)
CELL_TAIL = (
    Column("search_trials", pa.int32(), "Optuna search trials run for the cell", "trials"),
    Column("search_best_val", pa.float64(), "best validation accuracy among the search trials", "%"),
)
EPOCH_COLUMNS = _ID_COLUMNS + (
    _SEED,
    Column("stage", pa.string(), "search or final"),
    Column("tune_trial_id", pa.string(), "Ray Tune trial id (the trial's row in trials.arrow)"),
    Column("epoch", pa.int32(), "epoch number, from 1", "epochs"),
    Column("train_loss", pa.float64(), "mean training loss over the epoch"),
    Column("val_acc", pa.float64(), "validation accuracy after the epoch", "%"),
    Column("lr", pa.float64(), "learning rate at the end of the epoch"),
    Column("wall_time_s", pa.float64(), "wall time since the trial started, at the end of the epoch", "s"),
)


def backbone_label(backbone: Optional[dict]) -> Optional[str]:
    """``arch:pretrained`` of a trial request's backbone (``random-init`` when it has no pretrained weights)."""
    if not backbone:
        return None
    return f"{backbone.get('arch')}:{backbone.get('pretrained') or 'random-init'}"


def _trial_identity(config: dict) -> dict[str, Any]:
    """The columns a trial's row and its epochs' rows share (from the searcher's trial config)."""
    req = config["request"]
    return {"backbone": backbone_label(req.get("backbone")), "cell_id": config["cell_id"], "protocol": req["protocol"],
            "method": req["method"], "dataset": req["dataset"], "shots": int(req["shots"]), "seed": int(config["seed"]),
            "stage": config["stage"]}


def upgrade_row(row: dict) -> dict:
    """A trial row recorded by a schema-1 driver (``trials.arrow`` or Tune's saved callback state) in schema 2:
    Tune's ``TERMINATED`` reads ``FINISHED``."""
    row["status"] = _LEGACY_STATUS.get(row["status"], row["status"])
    return row


def config_hash(request: dict) -> str:
    """Stable hash of everything that defines one trial's training (its TrialRequest)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:16]


def harmonic_mean(base: Optional[float], novel: Optional[float]) -> Optional[float]:
    if base is None or novel is None:
        return None
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@functools.lru_cache(maxsize=None)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """Looked up once per process: ``importlib.metadata`` scans site-packages on every call (~25 ms, and the
    results files are rewritten after every trial)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("promptsweep", "torch", "open_clip_torch", "ray", "optuna", "mlflow", "pyarrow"):
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            pass
    return tuple(out)


def package_versions() -> dict[str, str]:
    return dict(_installed_versions())


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def trial_row(config: dict, result: Optional[dict], *, status: str, tune_trial_id: str,
              error_class: Optional[str] = None, error_message: Optional[str] = None,
              node_id: Optional[str] = None, mlflow_run_id: Optional[str] = None) -> dict:
    """One ``trials.arrow`` row from a trial's config (from the searcher) and its last result."""
    result = result or {}
    req = config["request"]
    row: dict[str, Any] = {
        **_trial_identity(config), "params_json": json.dumps(config.get("params") or {}, sort_keys=True),
        "params": dict(config.get("params") or {}),
        "epochs_run": result.get("epochs_run"), "wall_time_s": _num(result.get("wall_time_s")),
        "test_images_read": result.get("test_images_read"),
        "status": status, "error_class": error_class or result.get("error_class"),
        "error_message": error_message or result.get("error_message"),
        "node_id": node_id or result.get("node_ip"), "tune_trial_id": tune_trial_id,
        "optuna_trial_number": config.get("optuna_number"), "mlflow_run_id": mlflow_run_id,
        "config_hash": config_hash(req), "finished_at": datetime.now(timezone.utc),
    }
    for m in CORE_METRICS:
        row[m] = _num(result.get(m))
    row["extra_metrics"] = {k: _num(v) for k, v in result.items() if k.startswith("acc_") and _num(v) is not None}
    return row


def _param_array(values: list) -> pa.Array:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, pa.int64())
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values], pa.string())


def _metadata(meta: dict) -> dict[bytes, bytes]:
    out = {b"schema_version": SCHEMA_VERSION.encode(), b"producer": b"orchestrator.sweep",
           b"package_versions": json.dumps(package_versions()).encode()}
    for k, v in meta.items():
        out[k.encode()] = (v if isinstance(v, str) else json.dumps(v)).encode()
    return out


def _table(columns: list[Column], records: list[dict], meta: dict) -> pa.Table:
    schema = pa.schema([c.field() for c in columns], metadata=_metadata(meta))
    return pa.Table.from_pylist([{**r, "sweep": meta.get("sweep")} for r in records], schema=schema)


def trials_table(rows: list[dict], meta: dict) -> pa.Table:
    """``trials.arrow``: ``TRIAL_HEAD``, a ``param_<name>`` column per hyperparameter, the metrics, ``TRIAL_TAIL``."""
    rows = sorted(rows, key=lambda r: (r["cell_id"], r["stage"] != "search", r["optuna_trial_number"] or 0, r["seed"],
                                       r["tune_trial_id"]))
    params = sorted({k for r in rows for k in r["params"]})
    param_cols = [param_column(n, _param_array([r["params"].get(n) for r in rows]).type) for n in params]
    extra = sorted({k for r in rows for k in r["extra_metrics"]})
    columns = [*TRIAL_HEAD, *param_cols, *(metric_column(m) for m in (*CORE_METRICS, *extra)), *TRIAL_TAIL]
    records = []
    for r in rows:
        rec = {**r, **r["extra_metrics"]}
        for n, c in zip(params, param_cols):
            v = r["params"].get(n)
            rec[c.name] = v if v is None or not pa.types.is_string(c.type) or isinstance(v, str) else json.dumps(v)
        records.append(rec)
    return _table(columns, records, meta)


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cells_table(rows: list[dict], meta: dict, cell_order: Optional[list[str]] = None) -> pa.Table:
    """Per cell over its successful final-stage rows: n, mean and std of each metric."""
    by_cell: dict[str, list[dict]] = {}
    keys: dict[str, dict] = {}
    for r in rows:
        keys.setdefault(r["cell_id"], {k: r.get(k) for k in ("backbone", *KEY_COLUMNS)})
        by_cell.setdefault(r["cell_id"], [])
        if r["stage"] == "final":
            by_cell[r["cell_id"]].append(r)
    order = [c for c in (cell_order or []) if c in by_cell] + sorted(c for c in by_cell if c not in (cell_order or []))
    extra = sorted({k for r in rows if r["stage"] == "final" for k in r["extra_metrics"]})
    out: list[dict] = []
    for cid in order:
        finals = by_cell[cid]
        ok = [r for r in finals if r["status"] == OK_STATUS]
        rec: dict[str, Any] = dict(keys[cid], n=len(ok), n_failed=len(finals) - len(ok),
                                   params_json=ok[0]["params_json"] if ok else None)
        for m in CORE_METRICS:
            rec[f"{m}_mean"], rec[f"{m}_std"] = _mean_std([r[m] for r in ok if r[m] is not None])
        for m in extra:
            rec[f"{m}_mean"], rec[f"{m}_std"] = _mean_std([r["extra_metrics"][m] for r in ok if m in r["extra_metrics"]])
        if rec["base_acc_mean"] is not None and rec["novel_acc_mean"] is not None:
            rec["hm_mean"] = harmonic_mean(rec["base_acc_mean"], rec["novel_acc_mean"])  # HM of the seed means
        searched = [r["val_acc"] for r in rows if r["cell_id"] == cid and r["stage"] == "search" and r["val_acc"] is not None]
        rec["search_trials"] = sum(1 for r in rows if r["cell_id"] == cid and r["stage"] == "search")
        rec["search_best_val"] = max(searched) if searched else None
        out.append(rec)
    stats = [Column(f"{m}_{k}", pa.float64(), f"{what} over the cell's finished final runs of: "
                    + metric_column(m).description, "%")
             for m in (*CORE_METRICS, *extra) for k, what in (("mean", "mean"), ("std", "sample standard deviation"))]
    return _table([*CELL_HEAD, *stats, *CELL_TAIL], out, meta)


def epochs_table(epochs: Iterable[dict], meta: dict) -> pa.Table:
    """``epochs.arrow``: one row per trial x epoch (``EPOCH_COLUMNS``), ordered by cell, trial, epoch."""
    rows = sorted(epochs, key=lambda r: (r["cell_id"], r["stage"] != "search", r["seed"], r["tune_trial_id"], r["epoch"]))
    return _table(list(EPOCH_COLUMNS), rows, meta)


def epoch_row(config: dict, result: dict, tune_trial_id: str) -> Optional[dict]:
    """The ``epochs.arrow`` row of one per-epoch report of a trial (None for reports that are not an epoch's)."""
    if result.get("final") or result.get("epoch") is None:
        return None
    return {**_trial_identity(config), "tune_trial_id": tune_trial_id, "epoch": int(result["epoch"]), "train_loss": _num(result.get("train_loss")),
            "val_acc": _num(result.get("val_acc")), "lr": _num(result.get("lr")),
            "wall_time_s": _num(result.get("time_total_s"))}


def _fault_hook() -> None:
    """``PROMPTSWEEP_FAULT_KILL_IN_WRITE=N``: SIGKILL this process in its N-th atomic write (see module docstring)."""
    global _writes
    _writes += 1
    want = os.environ.get(FAULT_KILL_IN_WRITE_ENV, "").strip()
    if want.isdigit() and int(want) == _writes:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write an Arrow IPC file (a Parquet file when ``path`` ends in ``.parquet``) so readers only ever see
    a complete file (``fewshot.paths.atomic_open``)."""
    path = Path(path)
    with atomic_open(path, "wb", before_replace=_fault_hook) as f:
        if path.suffix == PARQUET_SUFFIX:
            pq.write_table(table, f)
        else:
            with ipc.new_file(f, table.schema) as w:
                w.write_table(table)


def write_tables(out_dir: Path, tables: dict[str, pa.Table]) -> None:
    """``{arrow file name: table}`` into ``out_dir``: every Arrow file first, in order, then their Parquet twins."""
    for name, table in tables.items():
        write_atomic(table, Path(out_dir) / name)
    for name, table in tables.items():
        write_atomic(table, (Path(out_dir) / name).with_suffix(PARQUET_SUFFIX))


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete the temp files of ``write_atomic`` a killed writer left in ``out_dir``; returns them.

    Only call this where no other process writes results into ``out_dir`` (the driver, at start)."""
    gone = []
    names = [n for f in RESULT_FILES for n in (f, str(Path(f).with_suffix(PARQUET_SUFFIX)))]
    for name in names:
        for p in Path(out_dir).glob(f".{name}.*.tmp"):
            try:
                p.unlink()
                gone.append(p)
            except FileNotFoundError:
                pass
    return gone


def write_results(out_dir: Path, rows: Iterable[dict], meta: dict, cell_order: Optional[list[str]] = None,
                  epochs: Optional[Iterable[dict]] = None) -> None:
    """trials, cells (and, when ``epochs`` is given, epochs) tables with their Parquet twins into ``out_dir``."""
    rows = list(rows)
    tables = {TRIALS_FILE: trials_table(rows, meta), CELLS_FILE: cells_table(rows, meta, cell_order)}
    if epochs is not None:
        tables[EPOCHS_FILE] = epochs_table(epochs, meta)
    write_tables(out_dir, tables)


def read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return ipc.open_file(src).read_all()


_ROW_COLUMNS = tuple(c.name for c in (*TRIAL_HEAD, *TRIAL_TAIL) if c.name != "sweep") + CORE_METRICS


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``trials.arrow`` as ``trial_row`` dicts (the inverse of ``trials_table``; a schema-1 file,
    without ``backbone`` and with Tune's ``TERMINATED``, reads as its schema-2 rows)."""
    rows = []
    for rec in read_table(path).to_pylist():
        row = upgrade_row({k: rec.get(k) for k in _ROW_COLUMNS})
        row["params"] = json.loads(rec["params_json"] or "{}")
        row["extra_metrics"] = {k: v for k, v in rec.items() if k.startswith("acc_") and v is not None}
        rows.append(row)
    return rows


def read_epochs(path: Path) -> list[dict]:
    """The rows of an ``epochs.arrow`` (what a resumed sweep keeps of the epochs recorded before it)."""
    names = [c.name for c in EPOCH_COLUMNS if c.name != "sweep"]
    return [{k: rec.get(k) for k in names} for rec in read_table(path).to_pylist()]
