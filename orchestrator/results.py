"""The sweep's Arrow results: ``trials.arrow`` (one row per trial), ``cells.arrow`` (per cell over final seeds),
``comparisons.arrow`` (each method against the spec's baseline, per dataset and on the Average) and
``epochs.arrow`` (one row per trial x epoch).

Owns the column tables (``TRIAL_HEAD`` / ``TRIAL_TAIL``, ``CELL_HEAD`` / ``CELL_TAIL``, ``COMPARISON_COLUMNS``,
``EPOCH_COLUMNS``: name, Arrow type, description and unit — the schemas, the field metadata and the row
readers all come from them; accuracies are percent, differences percentage points), the schema metadata
(schema version, spec hash, package versions, the spec's ``report`` settings), the per-cell aggregation (n,
mean, std, 95 % interval and per-seed values of each metric, base2novel HM from the seed-mean base and
novel accuracies, unstable seeds, summed cost), the paired comparisons (numbers from
``orchestrator.statistics``) and atomic writes (``fewshot.paths.atomic_open``: temp file in the same directory, flushed
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
COMPARISONS_FILE = "comparisons.arrow"
RESULT_FILES = (TRIALS_FILE, CELLS_FILE, COMPARISONS_FILE, EPOCHS_FILE)
PARQUET_SUFFIX = ".parquet"  # each Arrow file's Parquet twin: trials.parquet, cells.parquet, ...
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


_METRIC_TEXT = {
    "val_acc": "validation accuracy (the searched objective; few-shot val split)",
    "test_acc": "test accuracy",
    "base_acc": "test accuracy on the base classes (base2novel)",
    "novel_acc": "test accuracy on the novel classes (base2novel)",
    "hm": "harmonic mean of base_acc and novel_acc (base2novel)",
    "target_avg": "mean test accuracy over the target datasets (cross_dataset, domain_generalization)",
}


def metric_column(name: str) -> Column:
    if name.startswith("acc_"):
        return Column(name, pa.float64(), f"test accuracy on target dataset {name[4:]}", "%")
    return Column(name, pa.float64(), _METRIC_TEXT[name], "%")


def param_column(name: str, type_: pa.DataType) -> Column:
    return Column(
        f"param_{name}", type_, f"hyperparameter {name} of the trial (searched by Optuna or fixed by the spec)"
    )


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
    Column(
        "test_images_read",
        pa.int64(),
        "test images the trial read (0 for search trials: they never see test)",
        "images",
    ),
    Column(
        "images_trained",
        pa.int64(),
        "training images the trial stepped through (every epoch; a closed-form "
        "method its training split once; the run that finished the trial)",
        "images",
    ),
    Column(
        "images_evaluated",
        pa.int64(),
        "images the trial scored: its validation split after every evaluation, plus the test images",
        "images",
    ),
    Column("cpus", pa.float64(), "CPUs Ray reserved for the trial", "CPUs"),
    Column("gpu_fraction", pa.float64(), "share of a GPU Ray reserved for the trial (0 without a GPU)", "GPUs"),
    Column(
        "cpu_seconds",
        pa.float64(),
        "cpus x wall_time_s (reserved, not measured; a trial without wall_time_s, "
        "pruned or failed, Tune's time_total_s at its last report)",
        "CPU-s",
    ),
    Column("gpu_seconds", pa.float64(), "gpu_fraction x the same time as cpu_seconds", "GPU-s"),
    Column(
        "status",
        pa.string(),
        "FINISHED (ran to its final metrics), PRUNED (stopped early by its cell's pruner) or ERROR",
    ),
    Column("error_class", pa.string(), "kind of failure (status ERROR), e.g. nan_loss, data_error"),
    Column("error_message", pa.string(), "the failure's one-line message (status ERROR)"),
    Column("node_id", pa.string(), "address of the Ray node that ran the trial"),
    Column("tune_trial_id", pa.string(), "Ray Tune trial id (its folder under tune/)"),
    Column("optuna_trial_number", pa.int32(), "number of the Optuna trial in the cell's study"),
    Column("mlflow_run_id", pa.string(), "MLflow run of the trial"),
    Column(
        "run_notes",
        pa.string(),
        "facts the method recorded about the run, a JSON object (e.g. tgpt_content_loss: on/off and why)",
    ),
    Column(
        "retry_of_trial",
        pa.string(),
        "tune_trial_id of the failed trial this one ran again (--retry-failed); its row was replaced by this one",
    ),
    Column("config_hash", pa.string(), "hash of everything that defines the trial's training"),
    Column("finished_at", pa.timestamp("ms", tz="UTC"), "when the driver recorded the trial"),
)
CELL_HEAD = _ID_COLUMNS + (
    Column("n", pa.int32(), "final runs (seeds) that finished", "runs"),
    Column("n_failed", pa.int32(), "final runs that did not finish", "runs"),
    Column(
        "seeds",
        pa.list_(pa.int64()),
        "seeds of the finished final runs, ascending (the order of every <metric>_values list)",
    ),
    Column("failed_seeds", pa.list_(pa.int64()), "seeds of the final runs that did not finish"),
    Column("params_json", pa.string(), "the cell's chosen hyperparameters as a JSON object"),
)
#: per metric of a cell: (column suffix, what it is over the cell's finished final runs)
CELL_STATS = (
    ("mean", "mean"),
    ("std", "sample standard deviation"),
    ("ci_low", "lower end of the 95 % confidence interval of the mean (Student t; hm: bootstrap)"),
    ("ci_high", "upper end of the 95 % confidence interval of the mean (Student t; hm: bootstrap)"),
    ("values", "per-seed values, in the order of seeds (null where a seed lacks the metric)"),
)
CELL_TAIL = (
    Column(
        "unstable_seeds",
        pa.list_(pa.int64()),
        "seeds whose value of a reported metric lies more than report.unstable.mads scaled MADs from the cell's median",
    ),
    Column("high_std_metrics", pa.list_(pa.string()), "reported metrics whose std exceeds report.unstable.max_std"),
    Column("search_trials", pa.int32(), "Optuna search trials run for the cell", "trials"),
    Column("search_best_val", pa.float64(), "best validation accuracy among the search trials", "%"),
    Column("images_trained", pa.int64(), "sum of images_trained over the cell's trials (search and final)", "images"),
    Column("images_evaluated", pa.int64(), "sum of images_evaluated over the cell's trials", "images"),
    Column("cpu_seconds", pa.float64(), "sum of cpu_seconds over the cell's trials (every status)", "CPU-s"),
    Column("gpu_seconds", pa.float64(), "sum of gpu_seconds over the cell's trials (every status)", "GPU-s"),
)
COST_COLUMNS = ("images_trained", "images_evaluated", "cpu_seconds", "gpu_seconds")
#: the name of the comparisons' row over all datasets of a (protocol, shots) (no dataset is called so)
AVERAGE = "Average"
_PP = "pp"  # percentage points: a difference of two accuracies in %
COMPARISON_COLUMNS = (
    Column("sweep", pa.string(), "sweep name (the spec's name)"),
    Column("backbone", pa.string(), "CLIP backbone as arch:pretrained"),
    Column("protocol", pa.string(), "evaluation protocol"),
    Column("shots", pa.int16(), "training images per class", "images"),
    Column(
        "dataset",
        pa.string(),
        f"training dataset, or '{AVERAGE}': the mean over the datasets compared (base2novel "
        "hm: the HM of the averaged base and novel)",
    ),
    Column("metric", pa.string(), "the compared metric (a column of cells.arrow without _mean)"),
    Column("method", pa.string(), "the compared method"),
    Column("baseline", pa.string(), "the baseline method (the spec's report.baseline)"),
    Column("cell_id", pa.string(), "the method's cell (null on Average rows)"),
    Column("baseline_cell_id", pa.string(), "the baseline's cell (null on Average rows)"),
    Column(
        "seeds",
        pa.list_(pa.int64()),
        "seeds both cells finished, the pairs compared (same seed = same few-shot split); empty on Average rows",
    ),
    Column("n_pairs", pa.int32(), "number of seeds compared (Average rows: the datasets compared)", "runs"),
    Column("method_mean", pa.float64(), "the method's mean over the compared seeds", "%"),
    Column("baseline_mean", pa.float64(), "the baseline's mean over the compared seeds", "%"),
    Column("diff_mean", pa.float64(), "method_mean - baseline_mean", _PP),
    Column("diff_ci_low", pa.float64(), "lower end of the 95 % confidence interval of diff_mean", _PP),
    Column("diff_ci_high", pa.float64(), "upper end of the 95 % confidence interval of diff_mean", _PP),
    Column(
        "ci_method",
        pa.string(),
        "t: Student t over the per-seed differences; bootstrap: paired percentile "
        "bootstrap of the seeds (hm, Average rows); null: too few seeds",
    ),
    Column("ci_excludes_zero", pa.bool_(), "the interval lies entirely above or below 0"),
    Column(
        "p_ttest",
        pa.float64(),
        "two-sided paired t-test p-value (Average rows: over the per-dataset differences; "
        "hm: on per-seed HMs); null with fewer than 2 pairs or identical differences",
    ),
    Column("p_wilcoxon", pa.float64(), "two-sided Wilcoxon signed-rank p-value, from 6 pairs on (else null)"),
    Column("datasets_better", pa.int32(), "Average rows: datasets where diff_mean > 0", "datasets"),
    Column("datasets_worse", pa.int32(), "Average rows: datasets where diff_mean < 0", "datasets"),
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
    return {
        "backbone": backbone_label(req.get("backbone")),
        "cell_id": config["cell_id"],
        "protocol": req["protocol"],
        "method": req["method"],
        "dataset": req["dataset"],
        "shots": int(req["shots"]),
        "seed": int(config["seed"]),
        "stage": config["stage"],
    }


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


def _cost(result: dict, resources: Optional[dict]) -> dict[str, Any]:
    """The cost columns of a trial row: reserved CPUs / GPU share (Ray's resources, ``{"CPU": .., "GPU": ..}``;
    a resource it does not name is 0) times the trial's wall time (else Tune's ``time_total_s``: a pruned or
    failed trial reports no wall time)."""
    cpus, gpus = (None, None) if resources is None else (_num(resources.get(k, 0.0)) for k in ("CPU", "GPU"))
    busy = _num(result.get("wall_time_s"))
    busy = busy if busy is not None else _num(result.get("time_total_s"))
    return {
        "images_trained": result.get("images_trained"),
        "images_evaluated": result.get("images_evaluated"),
        "cpus": cpus,
        "gpu_fraction": gpus,
        "cpu_seconds": None if cpus is None or busy is None else cpus * busy,
        "gpu_seconds": None if gpus is None or busy is None else gpus * busy,
    }


def trial_row(
    config: dict,
    result: Optional[dict],
    *,
    status: str,
    tune_trial_id: str,
    error_class: Optional[str] = None,
    error_message: Optional[str] = None,
    node_id: Optional[str] = None,
    mlflow_run_id: Optional[str] = None,
    resources: Optional[dict] = None,
) -> dict:
    """One ``trials.arrow`` row from a trial's config (from the searcher), its last result and the resources
    Ray reserved for it."""
    result = result or {}
    req = config["request"]
    row: dict[str, Any] = {
        **_trial_identity(config),
        "params_json": json.dumps(config.get("params") or {}, sort_keys=True),
        "params": dict(config.get("params") or {}),
        "epochs_run": result.get("epochs_run"),
        "wall_time_s": _num(result.get("wall_time_s")),
        "test_images_read": result.get("test_images_read"),
        **_cost(result, resources),
        "status": status,
        "error_class": error_class or result.get("error_class"),
        "error_message": error_message or result.get("error_message"),
        "node_id": node_id or result.get("node_ip"),
        "tune_trial_id": tune_trial_id,
        "optuna_trial_number": config.get("optuna_number"),
        "mlflow_run_id": mlflow_run_id,
        "retry_of_trial": (config.get("retry_of") or {}).get("tune_trial_id"),
        "run_notes": result.get("run_notes") if isinstance(result.get("run_notes"), str) else None,
        "config_hash": config_hash(req),
        "finished_at": datetime.now(timezone.utc),
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
    out = {
        b"schema_version": SCHEMA_VERSION.encode(),
        b"producer": b"orchestrator.sweep",
        b"package_versions": json.dumps(package_versions()).encode(),
    }
    for k, v in meta.items():
        out[k.encode()] = (v if isinstance(v, str) else json.dumps(v)).encode()
    return out


def _table(columns: list[Column], records: list[dict], meta: dict) -> pa.Table:
    schema = pa.schema([c.field() for c in columns], metadata=_metadata(meta))
    return pa.Table.from_pylist([{**r, "sweep": meta.get("sweep")} for r in records], schema=schema)


def trials_table(rows: list[dict], meta: dict) -> pa.Table:
    """``trials.arrow``: ``TRIAL_HEAD``, a ``param_<name>`` column per hyperparameter, the metrics, ``TRIAL_TAIL``."""
    rows = sorted(
        rows,
        key=lambda r: (
            r["cell_id"],
            r["stage"] != "search",
            r["optuna_trial_number"] or 0,
            r["seed"],
            r["tune_trial_id"],
        ),
    )
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


def _metric_stats(rec: dict, metric: str, seeds: list[int], by_seed: dict[int, float]) -> None:
    """``<metric>_{mean,std,ci_low,ci_high,values}`` of a cell record from its per-seed values."""
    from orchestrator.statistics import t_interval

    values = [by_seed[s] for s in seeds if s in by_seed]
    rec[f"{metric}_mean"], rec[f"{metric}_std"] = _mean_std(values)
    rec[f"{metric}_ci_low"], rec[f"{metric}_ci_high"] = t_interval(values)
    rec[f"{metric}_values"] = [by_seed.get(s) for s in seeds]


def _hm_stats(rec: dict, seeds: list[int], base: dict[int, float], novel: dict[int, float]) -> None:
    """base2novel: HM of the seed means, with the bootstrap interval over the seeds (Base and Novel together)."""
    from orchestrator.statistics import bootstrap, hm_of_means

    pairs = [(base[s], novel[s]) for s in seeds if s in base and s in novel]
    if pairs:
        rec["hm_mean"] = harmonic_mean(rec["base_acc_mean"], rec["novel_acc_mean"])  # HM of the seed means
        rec["hm_ci_low"], rec["hm_ci_high"] = bootstrap([pairs], hm_of_means)[1]


def reported_metrics(rec: dict) -> list[str]:
    """The metrics a cell record has values of, without val_acc (the selection split, not a result)."""
    return [k[: -len("_mean")] for k, v in rec.items() if k.endswith("_mean") and v is not None and k != "val_acc_mean"]


def _instability(rec: dict, unstable) -> None:
    """``unstable_seeds`` / ``high_std_metrics`` of a cell record (``spec.UnstableSpec`` settings)."""
    from orchestrator.statistics import outlier_seeds

    flagged: set[int] = set()
    high = []
    for m in reported_metrics(rec):
        values = {s: v for s, v in zip(rec["seeds"], rec[f"{m}_values"]) if v is not None}
        flagged |= set(outlier_seeds(values, unstable.mads, unstable.min_spread))
        if (rec[f"{m}_std"] or 0.0) > unstable.max_std:
            high.append(m)
    rec["unstable_seeds"], rec["high_std_metrics"] = sorted(flagged), high


def _sum(values: Iterable) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def report_settings(meta: dict):
    """The spec's ``report`` section (``spec.ReportSpec``) that travels in the tables' metadata."""
    from orchestrator.spec import ReportSpec

    return ReportSpec.model_validate(meta.get("report") or {})


def cells_table(rows: list[dict], meta: dict, cell_order: Optional[list[str]] = None) -> pa.Table:
    """Per cell over its successful final-stage rows: n, seeds, mean, std, 95 % interval and per-seed values of
    each metric, the unstable seeds; the cost summed over all its trials."""
    by_cell: dict[str, list[dict]] = {}
    keys: dict[str, dict] = {}
    for r in rows:
        keys.setdefault(r["cell_id"], {k: r.get(k) for k in ("backbone", *KEY_COLUMNS)})
        by_cell.setdefault(r["cell_id"], [])
        if r["stage"] == "final":
            by_cell[r["cell_id"]].append(r)
    order = [c for c in (cell_order or []) if c in by_cell] + sorted(c for c in by_cell if c not in (cell_order or []))
    extra = sorted({k for r in rows if r["stage"] == "final" for k in r["extra_metrics"]})
    unstable = report_settings(meta).unstable
    out: list[dict] = []
    for cid in order:
        finals = by_cell[cid]
        ok = sorted((r for r in finals if r["status"] == OK_STATUS), key=lambda r: r["seed"])
        seeds = [r["seed"] for r in ok]
        rec: dict[str, Any] = dict(
            keys[cid],
            n=len(ok),
            n_failed=len(finals) - len(ok),
            seeds=seeds,
            failed_seeds=sorted(r["seed"] for r in finals if r["status"] != OK_STATUS),
            params_json=ok[0]["params_json"] if ok else None,
        )
        by_metric = {m: {r["seed"]: r[m] for r in ok if r[m] is not None} for m in CORE_METRICS}
        by_metric.update({m: {r["seed"]: r["extra_metrics"][m] for r in ok if m in r["extra_metrics"]} for m in extra})
        for m, by_seed in by_metric.items():
            _metric_stats(rec, m, seeds, by_seed)
        _hm_stats(rec, seeds, by_metric["base_acc"], by_metric["novel_acc"])
        _instability(rec, unstable)
        mine = [r for r in rows if r["cell_id"] == cid]
        searched = [r["val_acc"] for r in mine if r["stage"] == "search" and r["val_acc"] is not None]
        rec["search_trials"] = sum(1 for r in mine if r["stage"] == "search")
        rec["search_best_val"] = max(searched) if searched else None
        rec.update({k: _sum(r.get(k) for r in mine) for k in COST_COLUMNS})
        out.append(rec)
    stats = [
        Column(
            f"{m}_{k}",
            pa.list_(pa.float64()) if k == "values" else pa.float64(),
            f"{what} over the cell's finished final runs of: " + metric_column(m).description,
            "%",
        )
        for m in (*CORE_METRICS, *extra)
        for k, what in CELL_STATS
    ]
    return _table([*CELL_HEAD, *stats, *CELL_TAIL], out, meta)


def comparisons_table(cells: list[dict], meta: dict) -> pa.Table:
    """``comparisons.arrow``: every method against its protocol's baseline (the spec's ``report.baseline``) on
    every metric and dataset both have, paired over the seeds both finished (``orchestrator.statistics``); no
    rows without a baseline."""
    from orchestrator.comparisons import comparison_records

    return _table(list(COMPARISON_COLUMNS), comparison_records(cells, report_settings(meta)), meta)


def epochs_table(epochs: Iterable[dict], meta: dict) -> pa.Table:
    """``epochs.arrow``: one row per trial x epoch (``EPOCH_COLUMNS``), ordered by cell, trial, epoch."""
    rows = sorted(
        epochs, key=lambda r: (r["cell_id"], r["stage"] != "search", r["seed"], r["tune_trial_id"], r["epoch"])
    )
    return _table(list(EPOCH_COLUMNS), rows, meta)


def epoch_row(config: dict, result: dict, tune_trial_id: str) -> Optional[dict]:
    """The ``epochs.arrow`` row of one per-epoch report of a trial (None for reports that are not an epoch's)."""
    if result.get("final") or result.get("epoch") is None:
        return None
    return {
        **_trial_identity(config),
        "tune_trial_id": tune_trial_id,
        "epoch": int(result["epoch"]),
        "train_loss": _num(result.get("train_loss")),
        "val_acc": _num(result.get("val_acc")),
        "lr": _num(result.get("lr")),
        "wall_time_s": _num(result.get("time_total_s")),
    }


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


def write_results(
    out_dir: Path,
    rows: Iterable[dict],
    meta: dict,
    cell_order: Optional[list[str]] = None,
    epochs: Optional[Iterable[dict]] = None,
) -> None:
    """trials, cells, comparisons (and, when ``epochs`` is given, epochs) tables with their Parquet twins into
    ``out_dir``."""
    rows = list(rows)
    cells = cells_table(rows, meta, cell_order)
    tables = {
        TRIALS_FILE: trials_table(rows, meta),
        CELLS_FILE: cells,
        COMPARISONS_FILE: comparisons_table(cells.to_pylist(), meta),
    }
    if epochs is not None:
        tables[EPOCHS_FILE] = epochs_table(epochs, meta)
    write_tables(out_dir, tables)


def read_table(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return ipc.open_file(src).read_all()


def read_meta(path: Path) -> dict[str, Any]:
    """The schema metadata of an Arrow results file, each value JSON-decoded (a plain string stays a string)."""
    with pa.memory_map(str(path)) as src:
        raw = ipc.open_file(src).schema.metadata or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k.decode()] = json.loads(v)
        except ValueError:  # ``_metadata`` stores strings as they are
            out[k.decode()] = v.decode()
    return out


def rewrite_summaries(out_dir: Path, report: dict) -> None:
    """Rewrite the tables of ``out_dir`` from its trials.arrow with other ``report`` settings (the spec's
    ``report`` section; the other metadata as cells.arrow has it). epochs.arrow is left as it is."""
    out_dir = Path(out_dir)
    meta = {k: v for k, v in read_meta(out_dir / CELLS_FILE).items() if k not in ("schema_version", "producer")}
    meta["report"] = report
    write_results(out_dir, read_rows(out_dir / TRIALS_FILE), meta, list(meta.get("planned_final_runs") or {}))


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
