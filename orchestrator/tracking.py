"""The Tune callback that mirrors a sweep into MLflow: a parent run per sweep, a child run per cell, a run
per trial.

The driver is the only process that writes to the tracking store (so a SQLite store is safe):
``MlflowTracking`` creates the runs (nesting through the ``mlflow.parentRunId`` tag), logs params and
tags for every axis, logs per-epoch metrics with one ``log_batch`` per report, and closes runs
FINISHED or FAILED; at the end each cell run gets its figures (``cell_summary``) and the sweep run its
counts, spec and artifacts. Every write goes through the send queue of ``orchestrator.mlflow_sender``
(outages never reach Tune); what is left at the end goes to the backlog file of
``orchestrator.mlflow_backlog``; URIs and credentials are handled by ``orchestrator.mlflow_uri``.

The callback's state (run ids by key, closed runs, the queue) is kept by ``get_state``/``set_state`` so a
restored sweep reuses its runs; states are merged (a known run id wins over a placeholder, queues are
united in submission order). After a restore a trial that starts without a known run first looks for
one tagged with its ``tune_trial_id`` (the driver may have died after creating it but before Tune saved
this state). ``on_cell_run`` (set by the driver) is told each cell run's id once it exists.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ray.tune import Callback

from fewshot.errors import ConfigError
from orchestrator.mlflow_backlog import BACKLOG_FILE, load_backlog, save_backlog
from orchestrator.mlflow_sender import (
    CreateRun,
    LogArtifact,
    LogBatch,
    LogDict,
    Operation,
    ReopenRun,
    Sender,
    SetTerminated,
    warn,
)
from orchestrator.mlflow_uri import (
    artifact_location,
    driver_http_env,
    error_reason,
    make_client,
    mask_uri,
    split_credentials,
    use_credentials,
)

#: Tune bookkeeping keys that are not worth a metric
_TUNE_KEYS = {
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "pid",
    "time_since_restore",
    "iterations_since_restore",
    "done",
    "trial_failed",
    "final",
    "reported_at",
    "epoch",
    "step",
}  # the step of each point, not series of their own
MLFLOW_MAX_PARAMS = 100  # per log_batch


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def resolved_params(request: dict) -> dict[str, str]:
    """The configuration a trial runs with, as MLflow params: ``train.<field>`` and ``method.<field>`` after
    the defaults (per method, dataset, shots, protocol) and the trial's overrides. Empty when the request
    does not resolve (the trial then fails with the reason, which its run records)."""
    from fewshot.errors import UserError
    from methods.registry import get_method
    from orchestrator.trial import build_configs
    from orchestrator.tune_runner import build_request

    try:
        req = build_request(request)
        train_cfg, method_cfg = build_configs(req, get_method(req.method))
    except (UserError, ValueError):
        return {}
    return {
        **_flat_params(train_cfg.model_dump(mode="json"), "train."),
        **_flat_params(method_cfg.model_dump(mode="json"), "method."),
    }


def _note_tags(notes: Optional[str]) -> dict[str, str]:
    """A trial's ``run_notes`` (JSON) as ``note.<key>`` tags."""
    try:
        return {f"note.{k}": str(v)[:5000] for k, v in json.loads(notes).items()} if notes else {}
    except (ValueError, AttributeError):
        return {}


def _error_tags(error_class: Optional[str], message: Optional[str]) -> dict[str, str]:
    """The tags of a failed trial's run: ``error_class`` (as in trials.arrow) and ``error_message``."""
    return {"error_class": str(error_class or "error"), "error_message": " ".join(str(message or "").split())[:5000]}


def cell_summary(cell_row: dict, planned_final_runs: int) -> dict:
    """What a cell's MLflow run holds at the end, from its ``cells.arrow`` row: n / n_failed and the mean and
    std of every final metric (Base / Novel / HM included) as metrics, the chosen hyperparameters as params
    (``hp.<name>``), and its status: FINISHED when its planned final runs all succeeded, else FAILED."""
    metrics = {
        k: v
        for k, v in cell_row.items()
        if (k.endswith("_mean") or k.endswith("_std") or k in ("n", "n_failed", "search_trials", "search_best_val"))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v == v
        and abs(v) != float("inf")
    }
    params = _flat_params(json.loads(cell_row.get("params_json") or "{}"), "hp.")
    status = "FINISHED" if (cell_row.get("n") or 0) >= planned_final_runs else "FAILED"
    return {"status": status, "metrics": metrics, "params": {k: v[:6000] for k, v in params.items()}}


def _metric_points(values: dict, ts: int, step: int) -> list[list]:
    """``[name, value, ts, step]`` of the finite numbers among ``values`` (bools and Tune's keys left out)."""
    return [
        [k, float(v), ts, step]
        for k, v in values.items()
        if k not in _TUNE_KEYS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v == v
        and abs(v) != float("inf")
    ]


class MlflowTracking(Callback):
    """Driver-side MLflow mirror of the sweep (see module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep_name: str,
        spec_hash: str,
        parent_run_id: Optional[str] = None,
        out_dir: Optional[Path] = None,
        background: bool = False,
    ):
        uri, user, password = split_credentials(tracking_uri)  # nothing kept (pickled, saved) holds a password
        use_credentials(user, password)
        self.tracking_uri = uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.spec_hash = spec_hash
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.commit = git_commit()
        self.state: dict[str, Any] = {
            "parent": parent_run_id,
            "cells": {},
            "trials": {},
            "closed": {},
            "experiment_id": None,
        }
        self._client = None
        self._restored = False  # set by set_state: trial runs are then looked up before they are created
        self._reopened: set[str] = set()  # runs this driver reopened: a restored state's "closed" does not hold them
        #: cells restarted by this driver (``--restart-cells``): their old runs are not reused
        self.restarted_cells: set[str] = set()
        #: called with (cell id, run id) once a cell's run exists (the driver records it in the cell's study)
        self.on_cell_run: Optional[Callable[[str, str], None]] = None
        self._lock = threading.RLock()  # the run ids: hooks (Tune's thread) vs the sender thread
        self.sender = Sender(self, mask_uri(uri), background, listed_in=str(self.backlog_path or BACKLOG_FILE))
        driver_http_env(tracking_uri)
        if self.backlog_path and self.backlog_path.exists():
            state = load_backlog(self.backlog_path, self.tracking_uri)
            if state is None:
                self.out_dir = None  # do not overwrite it
                self.sender.listed_in = BACKLOG_FILE
            else:
                self.set_state(state)

    # --- the runs (the sender's RunTarget) ------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        if not self.state.get("experiment_id"):
            exp = self.client.get_experiment_by_name(self.experiment)
            self.state["experiment_id"] = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    self.experiment, artifact_location=artifact_location(self.tracking_uri)
                )
            )
        return self.state["experiment_id"]

    def run_id(self, key: str) -> Optional[str]:
        """The run id of ``key`` (``sweep``, ``cell:<id>``, ``trial:<id>``); None while its creation waits."""
        kind, _, name = key.partition(":")
        return self.state["parent"] if kind == "sweep" else self.state[f"{kind}s"].get(name)

    def set_run_id(self, key: str, run_id: str) -> None:
        kind, _, name = key.partition(":")
        with self._lock:
            if kind == "sweep":
                self.state["parent"] = run_id
            else:
                self.state[f"{kind}s"][name] = run_id
        if kind == "cell" and self.on_cell_run is not None:
            try:
                self.on_cell_run(name, run_id)
            except Exception as e:  # noqa: BLE001 - a note elsewhere never stops the tracking
                warn(f"warning: recording MLflow run {run_id} for cell {name} failed: {type(e).__name__}: {e}")

    def trial_run_id(self, trial_id: str) -> Optional[str]:
        """The trial's MLflow run id (None while its creation waits for the server)."""
        return self.state["trials"].get(trial_id)

    def _submit(self, op: Operation) -> None:
        self.sender.submit(op)

    def _open(self, key: str) -> bool:
        """Whether the run ``key`` exists or is queued to be created, and is not closed."""
        return bool(self.run_id(key) or self.sender.queued_create(key)) and key not in self.state["closed"]

    def ensure_parent(self) -> str:
        """The sweep's parent run, created now if needed (a ConfigError if the store refuses it)."""
        if not self.state["parent"] and not self.sender.queued_create("sweep"):
            try:
                self._parent_op().send(self)
            except Exception as e:
                raise ConfigError(
                    f"MLflow at {mask_uri(self.tracking_uri)} did not create the sweep's run "
                    f"({error_reason(e)}); check the server, or pass --tracking-uri "
                    "sqlite:///ABS/PATH/mlflow.db"
                ) from None
        elif self.state["parent"]:
            self._reopen("sweep")  # a resumed or grown sweep: an early exit (fail) or its end closed it
        self.sender.flush()  # a backlog loaded from an earlier run goes out now
        return self.state["parent"]

    def _reopen(self, key: str) -> None:
        """Set the ended run ``key`` RUNNING again (a grown sweep adds work to it); it is closed again at the end."""
        self.state["closed"].pop(key, None)
        if key not in self._reopened:
            self._reopened.add(key)
            self._submit(ReopenRun(key=key))

    def _parent_op(self) -> CreateRun:
        tags = {"sweep": self.sweep_name, "level": "sweep", "spec_hash": self.spec_hash, "git_commit": self.commit}
        if self.out_dir is not None:  # where the files are: the spec's `output` param is only its root, as written
            tags["output_dir"] = str(self.out_dir.absolute())
        return CreateRun(key="sweep", name=f"sweep {self.sweep_name}", tags=tags)

    def _cell_key(self, config: dict) -> str:
        cid = config["cell_id"]
        if not self.state["parent"] and not self.sender.queued_create("sweep"):  # hooks before ensure_parent (tests)
            self._submit(self._parent_op())
        if cid not in self.state["cells"]:
            req = config["request"]
            from orchestrator.results import backbone_label

            tags = {
                "sweep": self.sweep_name,
                "cell_id": cid,
                "level": "cell",
                "protocol": req["protocol"],
                "backbone": str(backbone_label(req.get("backbone"))),
                "method": req["method"],
                "dataset": req["dataset"],
                "shots": str(req["shots"]),
                "spec_hash": self.spec_hash,
                "git_commit": self.commit,
            }
            self.state["cells"][cid] = None
            self._submit(CreateRun(key=f"cell:{cid}", name=cid, tags=tags, parent="sweep"))
        elif f"cell:{cid}" in self.state["closed"]:
            self._reopen(f"cell:{cid}")  # a grown cell (more seeds or proposals): its run takes the new trials
        return f"cell:{cid}"

    # --- Tune callback hooks ----------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.state["trials"]:
            return  # a resumed or retried trial keeps its run
        from orchestrator.results import backbone_label, config_hash

        cfg = trial.config
        req = cfg["request"]
        cell = self._cell_key(cfg)
        tags = {
            "sweep": self.sweep_name,
            "level": "trial",
            "backbone": str(backbone_label(req.get("backbone"))),
            "cell_id": cfg["cell_id"],
            "protocol": req["protocol"],
            "method": req["method"],
            "dataset": req["dataset"],
            "shots": str(req["shots"]),
            "seed": str(cfg["seed"]),
            "stage": cfg["stage"],
            "optuna_trial_number": str(cfg.get("optuna_number")),
            "tune_trial_id": trial.trial_id,
            "config_hash": config_hash(req),
            "git_commit": self.commit,
        }
        retry = cfg.get("retry_of") or {}
        if retry.get("mlflow_run_id"):
            tags["retry_of"] = retry["mlflow_run_id"]  # the failed trial's run, which this one runs again
        name = f"{cfg['cell_id']}.{cfg['stage']}.seed{cfg['seed']}"
        if cfg["stage"] == "search":
            name += f".p{cfg.get('optuna_number')}"
        params = _flat_params({k: v for k, v in req.items() if k != "overrides"})
        params.update(_flat_params(req.get("overrides") or {}, "hp."))
        params.update(resolved_params(req))
        key = f"trial:{trial.trial_id}"
        self.state["trials"][trial.trial_id] = None
        # after a restore the driver may have died after creating this run but before Tune saved our state
        lookup = ["tune_trial_id", trial.trial_id] if self._restored else None
        continues = cfg.get("continues") or {}
        if continues.get("tune_trial_id"):
            # the same work, started by an earlier driver in a trial Tune's snapshot did not hold: its run goes on
            # (found by id when the ledger had it, else by the old trial's tag) and is tagged with this trial
            lookup = ["tune_trial_id", continues["tune_trial_id"]]
            if continues.get("mlflow_run_id"):
                self.state["trials"][trial.trial_id] = continues["mlflow_run_id"]
            tags["continues_trial"] = continues["tune_trial_id"]
        if not self.state["trials"][trial.trial_id]:
            self._submit(CreateRun(key=key, name=name, tags=tags, parent=cell, lookup=lookup))
        if continues.get("tune_trial_id"):
            self._submit(
                LogBatch(key=key, tags={"tune_trial_id": trial.trial_id, "continues_trial": continues["tune_trial_id"]})
            )
        self._log_params(key, params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id not in self.state["trials"]:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        metrics = _metric_points(result, int(time.time() * 1000), step)
        if metrics:
            self._submit(LogBatch(key=f"trial:{trial.trial_id}", metrics=metrics))

    def _log_params(self, key: str, params: dict[str, str]) -> None:
        """``params`` on the run ``key``, in batches of MLflow's most per call (values cut to its 6000 characters)."""
        items = sorted((k, v[:6000]) for k, v in params.items())
        for i in range(0, len(items), MLFLOW_MAX_PARAMS):
            self._submit(LogBatch(key=key, params=dict(items[i : i + MLFLOW_MAX_PARAMS])))

    def _end(self, key: str, status: str) -> None:
        if key not in self.state["closed"]:
            self._submit(SetTerminated(key=key, status=status))
            self.state["closed"][key] = True

    def _close(self, trial, status: str, error_tags: Optional[dict[str, str]] = None):
        key = f"trial:{trial.trial_id}"
        if trial.trial_id not in self.state["trials"] or key in self.state["closed"]:
            return
        if error_tags:
            self._submit(LogBatch(key=key, tags=error_tags))
        self._end(key, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        failed = bool(last.get("trial_failed"))
        notes = _note_tags(last.get("run_notes"))
        if notes and trial.trial_id in self.state["trials"]:
            self._submit(LogBatch(key=f"trial:{trial.trial_id}", tags=notes))
        self._close(
            trial,
            "FAILED" if failed else "FINISHED",
            _error_tags(last.get("error_class"), last.get("error_message")) if failed else None,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self._close(
            trial,
            "FAILED",
            _error_tags(
                last.get("error_class") or "TrialError",
                last.get("error_message") or str(getattr(trial, "error_file", "") or ""),
            ),
        )

    def on_step_end(self, iteration, trials, **info):
        if not self.sender.background:
            self.sender.flush()  # catch up while the sweep runs, even between trial events

    # --- the end ------------------------------------------------------------------------------
    def finish(
        self,
        status: str = "FINISHED",
        cells: Optional[dict[str, dict]] = None,
        metrics: Optional[dict[str, float]] = None,
        spec: Optional[dict] = None,
        artifacts: tuple[tuple[Path, Optional[str]], ...] = (),
    ) -> Optional[Path]:
        """Close the cell runs and the parent run, send what is queued, and write what is left (its path).

        ``cells``: ``{cell id: cell_summary(...)}``: each cell run logs its metrics and chosen
        hyperparameters and ends with its own status (the others end with ``status``); ``metrics``, the
        ``spec`` (as ``spec.json`` and as params: ``methods``, ``backbone.arch``, ``train.defaults.epochs``, ...)
        and the ``artifacts`` (``(file, folder in the run or None)``: report, plots, result files) go to the
        sweep's run."""
        self.sender.stop()
        sweep_open = self._open("sweep")
        if sweep_open:
            self._send_sweep_files(artifacts, spec)
            if spec is not None:
                self._log_params("sweep", _flat_params(spec))
        now = int(time.time() * 1000)
        for cid in list(self.state["cells"]):
            summary = (cells or {}).get(cid)
            key = f"cell:{cid}"
            if summary is not None and key not in self.state["closed"]:
                self._submit(
                    LogBatch(
                        key=key,
                        params=summary["params"],
                        metrics=[[k, float(v), now, 0] for k, v in summary["metrics"].items()],
                    )
                )
            self._end(key, summary["status"] if summary is not None else status)
        if metrics and sweep_open:
            self._submit(LogBatch(key="sweep", metrics=[[k, float(v), now, 0] for k, v in metrics.items()]))
        if self.state["parent"] or self.sender.queued_create("sweep"):
            self._end("sweep", status)
        self.sender.flush(force=True)
        return self.write_backlog()

    def refresh_artifacts(
        self, artifacts: tuple[tuple[Path, Optional[str]], ...], spec: Optional[dict] = None
    ) -> Optional[Path]:
        """A finished sweep whose report was rewritten (other ``report`` settings, no trial ran): its run's
        ``spec.json`` and ``artifacts`` are sent again (an upload replaces the file; the run's params, which
        MLflow never changes, stay); what the server did not take goes to the backlog (its path)."""
        self._send_sweep_files(artifacts, spec)
        self.sender.flush(force=True)
        return self.write_backlog()

    def _send_sweep_files(self, artifacts: tuple[tuple[Path, Optional[str]], ...], spec: Optional[dict]) -> None:
        """Queue the sweep run's ``spec.json`` (when ``spec`` is given) and ``artifacts`` (file, folder in the run)."""
        if spec is not None:
            self._submit(LogDict(key="sweep", data=spec, file="spec.json"))
        for path, folder in artifacts:
            self._submit(LogArtifact(key="sweep", path=str(path), dir=folder))

    def fail(self, outcome: tuple[str, str]) -> Optional[Path]:
        """A sweep that stops early: end its run and the open cell runs with ``outcome = (status, reason)``
        (the reason as tag ``failure_reason``), send what is queued within the usual catch-up budget and
        write the rest to the backlog (its path). Not recorded as closed: a resumed sweep reopens its run."""
        status, reason = outcome
        self.sender.stop()
        if self.state["parent"] or self.sender.queued_create("sweep"):
            now = int(time.time() * 1000)
            self._submit(LogBatch(key="sweep", tags={"failure_reason": reason[:5000]}))
            for key in [f"cell:{cid}" for cid in self.state["cells"]] + ["sweep"]:
                if key not in self.state["closed"]:
                    self._submit(SetTerminated(key=key, status=status, end_time=now))
        self.sender.flush()
        return self.write_backlog()

    @property
    def backlog_path(self) -> Optional[Path]:
        return self.out_dir / BACKLOG_FILE if self.out_dir is not None else None

    def write_backlog(self) -> Optional[Path]:
        """``tracking_backlog.json`` when operations are left (``mlflow_backlog.save_backlog``)."""
        return save_backlog(self)

    # --- restore ------------------------------------------------------------------------------
    def get_state(self) -> Optional[dict]:
        with self._lock:
            state = json.loads(json.dumps(self.state))
        state["pending"], state["rejected"] = self.sender.to_dicts()
        return state

    def set_state(self, state: dict) -> None:
        """Merge a saved state: run ids kept (a known id wins over a placeholder), queues united in order."""
        state = json.loads(json.dumps(state))
        with self._lock:
            self._merge_runs(state)
        self.sender.merge(state.get("pending", []), state.get("rejected", []))

    def _merge_runs(self, state: dict) -> None:
        s = self.state
        self._restored = True
        s["parent"] = state.get("parent") or s["parent"]
        s["experiment_id"] = state.get("experiment_id") or s.get("experiment_id")
        for kind in ("cells", "trials"):
            for k, v in (state.get(kind) or {}).items():
                if kind == "cells" and k in self.restarted_cells:
                    continue  # a restarted cell gets a new run
                if v or k not in s[kind]:
                    s[kind][k] = v
        by_run = {v: f"{kind[:-1]}:{k}" for kind in ("cells", "trials") for k, v in s[kind].items() if v}
        by_run[s["parent"]] = "sweep"
        for c in state.get("closed", []):  # older states list closed run ids, newer ones keys
            c = by_run.get(c, c)
            if c not in s["closed"] and c not in self._reopened:
                s["closed"][c] = True

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_client"] = None
        d["on_cell_run"] = None  # set again by the driver that restores it
        d.pop("_lock", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.RLock()
        self.__dict__.setdefault("on_cell_run", None)
        self.__dict__.setdefault("_reopened", set())
        self.__dict__.setdefault("restarted_cells", set())
        if isinstance(self.state.get("closed"), list):  # pickled when closed runs were a list (O(N) lookups)
            self.state["closed"] = dict.fromkeys(self.state["closed"], True)
        if "sender" not in d:  # pickled before the queue had its own object: its operations were in the state
            self.sender = Sender(
                self,
                mask_uri(self.tracking_uri),
                d.get("background", False),
                listed_in=str(self.backlog_path or BACKLOG_FILE),
            )
            self.sender.merge(self.state.pop("pending", []), self.state.pop("rejected", []))
