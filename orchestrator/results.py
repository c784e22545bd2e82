"""The sweep's Arrow results: ``trials.arrow`` (one row per trial) and ``cells.arrow`` (per cell over final seeds).

Owns the row layout, the schema metadata (schema version, spec hash, package versions), the
per-cell aggregation (n, mean, std of each metric; base2novel HM from the seed-mean base and
novel accuracies) and atomic writes (temp file in the same directory, flushed to disk, then
``os.replace``; the file gets the usual ``0666 & ~umask`` mode, not ``mkstemp``'s 0600). Each table is
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from fewshot.paths import atomic_open

SCHEMA_VERSION = "1"
TRIALS_FILE, CELLS_FILE = "trials.arrow", "cells.arrow"
PARQUET_SUFFIX = ".parquet"  # each Arrow file's Parquet twin: trials.parquet, cells.parquet
#: metrics every row has a column for (others, e.g. acc_<target>, are added when present)
CORE_METRICS = ("val_acc", "test_acc", "base_acc", "novel_acc", "hm", "target_avg")
KEY_COLUMNS = ("cell_id", "protocol", "method", "dataset", "shots")
OK_STATUS = "TERMINATED"
FAULT_KILL_IN_WRITE_ENV = "PROMPTSWEEP_FAULT_KILL_IN_WRITE"
_writes = 0  # atomic writes by this process (for the fault-injection hook)


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
        "cell_id": config["cell_id"], "protocol": req["protocol"], "method": req["method"],
        "dataset": req["dataset"], "shots": int(req["shots"]), "seed": int(config["seed"]),
        "stage": config["stage"], "params_json": json.dumps(config.get("params") or {}, sort_keys=True),
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


def trials_table(rows: list[dict], meta: dict) -> pa.Table:
    rows = sorted(rows, key=lambda r: (r["cell_id"], r["stage"] != "search", r["optuna_trial_number"] or 0, r["seed"],
                                       r["tune_trial_id"]))
    col = lambda k: [r.get(k) for r in rows]  # noqa: E731
    arrays: dict[str, pa.Array] = {
        "cell_id": pa.array(col("cell_id"), pa.string()), "protocol": pa.array(col("protocol"), pa.string()),
        "method": pa.array(col("method"), pa.string()), "dataset": pa.array(col("dataset"), pa.string()),
        "shots": pa.array(col("shots"), pa.int16()), "seed": pa.array(col("seed"), pa.int64()),
        "stage": pa.array(col("stage"), pa.string()), "params_json": pa.array(col("params_json"), pa.string()),
    }
    for name in sorted({k for r in rows for k in r["params"]}):
        arrays[f"param_{name}"] = _param_array([r["params"].get(name) for r in rows])
    for m in CORE_METRICS:
        arrays[m] = pa.array(col(m), pa.float64())
    for name in sorted({k for r in rows for k in r["extra_metrics"]}):
        arrays[name] = pa.array([r["extra_metrics"].get(name) for r in rows], pa.float64())
    arrays |= {
        "epochs_run": pa.array(col("epochs_run"), pa.int32()), "wall_time_s": pa.array(col("wall_time_s"), pa.float64()),
        "test_images_read": pa.array(col("test_images_read"), pa.int64()),
        "status": pa.array(col("status"), pa.string()), "error_class": pa.array(col("error_class"), pa.string()),
        "error_message": pa.array(col("error_message"), pa.string()), "node_id": pa.array(col("node_id"), pa.string()),
        "tune_trial_id": pa.array(col("tune_trial_id"), pa.string()),
        "optuna_trial_number": pa.array(col("optuna_trial_number"), pa.int32()),
        "mlflow_run_id": pa.array(col("mlflow_run_id"), pa.string()),
        "config_hash": pa.array(col("config_hash"), pa.string()),
        "finished_at": pa.array(col("finished_at"), pa.timestamp("ms", tz="UTC")),
    }
    table = pa.table(arrays)
    return table.replace_schema_metadata(_metadata(meta))


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cells_table(rows: list[dict], meta: dict, cell_order: Optional[list[str]] = None) -> pa.Table:
    """Per cell over its successful final-stage rows: n, mean and std of each metric."""
    by_cell: dict[str, list[dict]] = {}
    keys: dict[str, dict] = {}
    for r in rows:
        keys.setdefault(r["cell_id"], {k: r[k] for k in KEY_COLUMNS})
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
    schema = [pa.field("cell_id", pa.string()), pa.field("protocol", pa.string()), pa.field("method", pa.string()),
              pa.field("dataset", pa.string()), pa.field("shots", pa.int16()), pa.field("n", pa.int32()),
              pa.field("n_failed", pa.int32()), pa.field("params_json", pa.string())]
    for m in list(CORE_METRICS) + extra:
        schema += [pa.field(f"{m}_mean", pa.float64()), pa.field(f"{m}_std", pa.float64())]
    schema += [pa.field("search_trials", pa.int32()), pa.field("search_best_val", pa.float64())]
    sch = pa.schema(schema, metadata=_metadata(meta))
    return pa.Table.from_pylist(out, schema=sch)


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
    names = [n for f in (TRIALS_FILE, CELLS_FILE) for n in (f, str(Path(f).with_suffix(PARQUET_SUFFIX)))]
    for name in names:
        for p in Path(out_dir).glob(f".{name}.*.tmp"):
            try:
                p.unlink()
                gone.append(p)
            except FileNotFoundError:
                pass
    return gone


def write_results(out_dir: Path, rows: Iterable[dict], meta: dict, cell_order: Optional[list[str]] = None) -> None:
    rows = list(rows)
    write_tables(out_dir, {TRIALS_FILE: trials_table(rows, meta), CELLS_FILE: cells_table(rows, meta, cell_order)})


def read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return ipc.open_file(src).read_all()


_ROW_COLUMNS = {"cell_id", "protocol", "method", "dataset", "shots", "seed", "stage", "params_json", *CORE_METRICS,
                "epochs_run", "wall_time_s", "test_images_read", "status", "error_class", "error_message", "node_id",
                "tune_trial_id", "optuna_trial_number", "mlflow_run_id", "config_hash", "finished_at"}


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``trials.arrow`` as ``trial_row`` dicts (the inverse of ``trials_table``)."""
    rows = []
    for rec in read_table(path).to_pylist():
        row = {k: rec.get(k) for k in _ROW_COLUMNS}
        row["params"] = json.loads(rec["params_json"] or "{}")
        row["extra_metrics"] = {k: v for k, v in rec.items() if k.startswith("acc_") and v is not None}
        rows.append(row)
    return rows
