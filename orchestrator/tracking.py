"""MLflow tracking of a sweep from the Tune driver: parent run per sweep, child run per cell, run per trial.

The driver is the only process that writes to the tracking store (so a SQLite store is safe):
``MlflowTracking`` is a Tune ``Callback`` that creates the runs (nesting through the
``mlflow.parentRunId`` tag), logs params and tags for every axis, logs per-epoch metrics with one
``MlflowClient.log_batch`` per report, and closes runs FINISHED or FAILED. Its trial -> run
mapping is kept by ``get_state``/``set_state`` so a restored sweep reuses its runs; after a restore
a trial that starts without a known run first looks for one tagged with its ``tune_trial_id`` (the
driver may have died after creating it but before Tune saved this state).

Outages never reach Tune. Every MLflow write is an operation (create / log / end, JSON) appended
to a FIFO queue in the callback's state and sent at once when the queue is empty — in the sweep
driver (``background=True``) by a sender thread, so Tune's loop (and the trials waiting on it to
take their reports) never waits for the server, up or down; when a call fails
with a connection or server error the queue stays, new operations line up behind it (a trial whose
run could not be created gets a placeholder id ``None``), and it is retried after a growing pause
(2 s .. 30 s) — by the sender thread, or without it at later hook calls (``on_step_end`` too) — and
at ``finish()``; catching up sends a run's queued metrics in batches (inline: at most
``max_flush_s`` per hook call). Replays are
idempotent: metrics keep their original timestamp (MLflow drops exact duplicates), params are
logged once, and each run carries a ``promptsweep_create_id`` tag that a retried create looks up
first, so a create that timed out but reached the server is not made twice. An operation the
server refuses for good (invalid value, missing run) is set aside as "rejected". The queue is part
of ``get_state`` (a restarted driver keeps it; states are merged in submission order). What is
still queued at ``finish()`` is written to ``<out_dir>/tracking_backlog.json`` (one warning line
names it); the next run of the same command loads it (``MlflowTracking(out_dir=...)`` or, for a
finished sweep, ``replay_backlog``) and sends it, and fills ``mlflow_run_id`` in trials.arrow.

With an ``http(s)://`` URI the driver lowers MLflow's HTTP retries (defaults: 7 retries with
backoff, 120 s timeout, i.e. minutes per call against a dead server) to 1 retry, no backoff and a
5 s timeout, unless those ``MLFLOW_HTTP_REQUEST_*`` variables are set already (``DRIVER_HTTP_ENV``;
it also stops the client printing a "View run" URL for every closed run).
``check_tracking_server`` probes the server before a sweep starts: unreachable is a ConfigError.

Tracking URI precedence: ``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > spec ``tracking.uri`` >
``sqlite:///<abs cwd>/mlflow.db``. File stores (``file://``, bare paths) are refused.

Credentials never leave the driver's environment: ``resolve_tracking_uri`` takes the user and password
out of a URI (``http://user:pw@host``, ``split_credentials``), hands them to MLflow through its
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` variables and returns the URI without them,
which is the only one used, stored (sweep.json, the pickled callback, the backlog) and shown; a spec's
``tracking.uri`` with credentials is refused (the spec is stored with the sweep). Every message quotes
URIs through ``mask_uri`` (userinfo and token-like query values as ``***``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ray.tune import Callback

from fewshot.errors import ConfigError

#: Tune bookkeeping keys that are not worth a metric
_TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
              "iterations_since_restore", "done", "trial_failed", "final", "reported_at",
              "epoch", "step"}  # the step of each point, not series of their own

BACKLOG_FILE = "tracking_backlog.json"
#: MLflow client settings for the driver (only set where the variable is not set already)
DRIVER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # no "View run" lines per closed run
#: error codes the server answers for a request that will never succeed (everything else is retried)
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST"}
_CREATE_TAG = "promptsweep_create_id"


#: query parameters whose values are masked in messages
_SECRET_QUERY = re.compile(r"token|secret|password|passwd|pwd|key|auth|signature|credential|sig", re.I)
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def split_credentials(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """``(uri without user:password@, user, password)`` (percent-decoded; None where absent)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) if sep else None


def mask_uri(uri: str) -> str:
    """``uri`` fit for a message: userinfo as ``user:***@`` and token-like query values as ``***``."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if "@" in parts.netloc:  # (urlunsplit only where there is a host: it drops "//" of sqlite:////abs/path)
        userinfo, _, host = parts.netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        uri = urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if sep else f"***@{host}"))
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
        uri = uri.replace(f"?{parts.query}", f"?{query}", 1)
    return uri


def _use_credentials(user: Optional[str], password: Optional[str]) -> None:
    """Hand a URI's credentials to this process's MLflow client (its documented environment variables)."""
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password


def resolve_tracking_uri(flag: Optional[str], spec_uri: Optional[str]) -> str:
    """The sweep's tracking URI (precedence in the module docstring) without credentials; credentials in
    ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` go to MLflow's variables, in a spec's ``tracking.uri``
    they are a ConfigError."""
    if spec_uri and any(split_credentials(spec_uri)[1:]):
        raise ConfigError(f"tracking.uri: '{mask_uri(spec_uri)}' holds credentials, which would be stored with the "
                          "sweep's spec; remove them and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
                          "or pass the URI with --tracking-uri")
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"tracking URI '{mask_uri(uri)}' is a file store, which MLflow 3 refuses; "
                          "use sqlite:///ABS/PATH/mlflow.db or http://host:port")
    uri, user, password = split_credentials(uri)
    _use_credentials(user, password)
    if not flag and os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = uri  # processes started from here (Ray) do not inherit the password in it
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_command(uri: str) -> str:
    if _is_http(uri):
        return f"open {mask_uri(uri)} (the MLflow server already serves these runs)"
    return f"mlflow ui --backend-store-uri {mask_uri(uri)}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
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


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no DB-migration INFO on the progress view
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # no line per retried request
    return MlflowClient(tracking_uri=uri)


def driver_http_env(uri: str) -> None:
    """Short MLflow HTTP retries/timeout for this process (``DRIVER_HTTP_ENV``), for http(s) URIs only."""
    if _is_http(uri):
        for k, v in DRIVER_HTTP_ENV.items():
            os.environ.setdefault(k, v)


def _reason(e: BaseException) -> str:
    """The short cause of an MLflow client error ("[Errno 111] Connection refused", "timed out", ...)."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if m:
        return m.group(0).strip()
    if "timed out" in text or "timeout" in text.lower():
        return "timed out"
    return " ".join(text.split())[:160]


def _metrics_only(op: dict) -> bool:
    return op["op"] == "log" and bool(op.get("metrics")) and not op.get("params") and not op.get("tags")


def _permanent(e: BaseException) -> bool:
    return getattr(e, "error_code", None) in _PERMANENT_CODES or isinstance(e, _Unresolved)


class _Unresolved(Exception):
    """An operation whose run was never created (its create was rejected)."""


def check_tracking_server(uri: str) -> None:
    """ConfigError naming ``uri`` and the fix when an http(s) tracking server does not answer (seconds at most)."""
    if not _is_http(uri):
        return
    driver_http_env(uri)
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as e:
        raise ConfigError(f"the MLflow tracking server {mask_uri(uri)} is not reachable ({_reason(e)}); start the server "
                          "(mlflow server --host HOST --port PORT --backend-store-uri sqlite:///ABS/PATH/mlflow.db) "
                          "or pass --tracking-uri sqlite:///ABS/PATH/mlflow.db to track into a local file") from None


def fill_run_ids(out_dir: Path, trial_runs: dict[str, Optional[str]]) -> int:
    """Fill empty ``mlflow_run_id`` cells of trials.arrow from ``trial_runs``; the number filled."""
    import pyarrow as pa

    from orchestrator.results import TRIALS_FILE, read_table, write_tables

    p = Path(out_dir) / TRIALS_FILE
    if not p.exists():
        return 0
    t = read_table(p)
    old = t.column("mlflow_run_id").to_pylist()
    new = [rid or trial_runs.get(tid) for rid, tid in zip(old, t.column("tune_trial_id").to_pylist())]
    n = sum(1 for a, b in zip(old, new) if a != b)
    if n:
        i = t.schema.get_field_index("mlflow_run_id")
        write_tables(out_dir, {TRIALS_FILE: t.set_column(i, t.schema.field(i), pa.array(new, pa.string()))})
    return n


MLFLOW_MAX_PARAMS = 100


def artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: for a SQLite store, ``mlartifacts/`` beside the database
    file (as ``mlflow server`` does; MLflow's own default is ``./mlruns`` under whatever folder the driver
    runs in); for a server, None (the server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).expanduser().absolute().parent / "mlartifacts").as_uri()


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
    return {**_flat_params(train_cfg.model_dump(mode="json"), "train."),
            **_flat_params(method_cfg.model_dump(mode="json"), "method.")}


def _error_tags(error_class: Optional[str], message: Optional[str]) -> dict[str, str]:
    """The tags of a failed trial's run: ``error_class`` (as in trials.arrow) and ``error_message``."""
    return {"error_class": str(error_class or "error"), "error_message": " ".join(str(message or "").split())[:5000]}


def cell_summary(cell_row: dict, planned_final_runs: int) -> dict:
    """What a cell's MLflow run holds at the end, from its ``cells.arrow`` row: n / n_failed and the mean and
    std of every final metric (Base / Novel / HM included) as metrics, the chosen hyperparameters as params
    (``hp.<name>``), and its status: FINISHED when its planned final runs all succeeded, else FAILED."""
    metrics = {k: v for k, v in cell_row.items() if (k.endswith("_mean") or k.endswith("_std") or
                                                      k in ("n", "n_failed", "search_trials", "search_best_val"))
               and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}
    params = _flat_params(json.loads(cell_row.get("params_json") or "{}"), "hp.")
    status = "FINISHED" if (cell_row.get("n") or 0) >= planned_final_runs else "FAILED"
    return {"status": status, "metrics": metrics, "params": {k: v[:6000] for k, v in params.items()}}


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MlflowTracking(Callback):
    """Driver-side MLflow mirror of the sweep (see module docstring)."""

    retry_interval_s = 2.0  #: first pause after a failed send; doubles up to ``max_retry_interval_s``
    max_retry_interval_s = 30.0
    max_flush_s = 2.0  #: catching up in a hook call stops after this long (finish() sends everything)

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str, spec_hash: str,
                 parent_run_id: Optional[str] = None, out_dir: Optional[Path] = None, background: bool = False):
        uri, user, password = split_credentials(tracking_uri)  # nothing kept (pickled, saved) holds a password
        _use_credentials(user, password)
        self.tracking_uri = uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.spec_hash = spec_hash
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.commit = git_commit()
        self.state: dict[str, Any] = {"parent": parent_run_id, "cells": {}, "trials": {}, "closed": [],
                                      "pending": [], "rejected": [], "experiment_id": None}
        self._client = None
        self._retry_at = 0.0
        self._failures = 0
        self._restored = False  # set by set_state: trial runs are then looked up before they are created
        self.background = background
        self._init_sender()
        driver_http_env(tracking_uri)
        if self.backlog_path and self.backlog_path.exists():
            self._load_backlog()

    # --- client / runs ------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        if not self.state.get("experiment_id"):
            exp = self.client.get_experiment_by_name(self.experiment)
            self.state["experiment_id"] = exp.experiment_id if exp else self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.tracking_uri))
        return self.state["experiment_id"]

    def _get(self, key: str) -> Optional[str]:
        kind, _, name = key.partition(":")
        return self.state["parent"] if kind == "sweep" else self.state[f"{kind}s"].get(name)

    def _set(self, key: str, run_id: str) -> None:
        kind, _, name = key.partition(":")
        with self._lock:
            if kind == "sweep":
                self.state["parent"] = run_id
            else:
                self.state[f"{kind}s"][name] = run_id

    def _create_op(self, key: str, name: str, tags: dict, parent: Optional[str]) -> dict:
        return {"op": "create", "key": key, "name": name, "tags": tags, "parent": parent,
                "start_time": int(time.time() * 1000), "tried": False}

    def ensure_parent(self) -> str:
        """The sweep's parent run, created now if needed (a ConfigError if the store refuses it)."""
        if not self.state["parent"] and not self._queued("sweep"):
            try:
                self._run(self._op(self._parent_op()))
            except Exception as e:
                raise ConfigError(f"MLflow at {mask_uri(self.tracking_uri)} did not create the sweep's run ({_reason(e)}); "
                                  "check the server, or pass --tracking-uri sqlite:///ABS/PATH/mlflow.db") from None
        elif self.state["parent"] and "sweep" not in self.state["closed"]:
            self._submit({"op": "reopen", "key": "sweep"})  # a resumed sweep: an early exit (fail) may have ended it
        self.flush()  # a backlog loaded from an earlier run goes out now
        return self.state["parent"]

    def _parent_op(self) -> dict:
        return self._create_op("sweep", f"sweep {self.sweep_name}", {"sweep": self.sweep_name, "level": "sweep",
                               "spec_hash": self.spec_hash, "git_commit": self.commit}, None)

    def _queued(self, key: str) -> bool:
        return any(op["key"] == key and op["op"] == "create" for op in self.state["pending"])

    def _cell_key(self, config: dict) -> str:
        cid = config["cell_id"]
        if not self.state["parent"] and not self._queued("sweep"):  # hooks before ensure_parent (tests)
            self._submit(self._parent_op())
        if cid not in self.state["cells"]:
            req = config["request"]
            tags = {"sweep": self.sweep_name, "cell_id": cid, "level": "cell", "protocol": req["protocol"],
                    "method": req["method"], "dataset": req["dataset"], "shots": str(req["shots"]),
                    "spec_hash": self.spec_hash, "git_commit": self.commit}
            self.state["cells"][cid] = None
            self._submit(self._create_op(f"cell:{cid}", cid, tags, "sweep"))
        return f"cell:{cid}"

    def trial_run_id(self, trial_id: str) -> Optional[str]:
        """The trial's MLflow run id (None while its creation waits for the server)."""
        return self.state["trials"].get(trial_id)

    # --- the operation queue ------------------------------------------------------------------
    @staticmethod
    def _op(op: dict) -> dict:
        op["id"] = uuid.uuid4().hex
        op["t"] = time.time_ns()
        return op

    def _submit(self, op: dict) -> None:
        with self._lock:
            self.state["pending"].append(self._op(op))
        if self.background and not self._stopping:
            self._start_sender()
            self._wake.set()
        else:
            self.flush()

    # --- the background sender (the sweep driver's: Tune's loop never waits for the server) ------------
    def _init_sender(self) -> None:
        self._lock = threading.RLock()  # the queue and the run ids: hooks (Tune's thread) vs the sender
        self._flushing = threading.Lock()  # one flush at a time
        self._wake = threading.Event()
        self._sender: Optional[threading.Thread] = None
        self._stopping = False

    def _start_sender(self) -> None:
        if self._sender is None and not self._stopping:
            self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        """Send what is queued as soon as it is queued; after a failure, again when the pause is over."""
        while not self._stopping:
            pause = self._retry_at - time.monotonic() if self.state["pending"] else None
            self._wake.wait(timeout=None if pause is None else max(pause, 0.05))
            self._wake.clear()  # before flushing: an operation queued from now on wakes the loop again
            if not self._stopping:
                self.flush(budget_s=float("inf"))

    def stop_sender(self) -> None:
        """Stop the background sender (after the operation it is sending); what is queued stays queued."""
        self._stopping = True
        self._wake.set()
        if self._sender is not None:
            self._sender.join()
            self._sender = None

    def _run(self, op: dict) -> None:
        """Send one operation (raises what the client raises; _Unresolved when its run does not exist)."""
        from mlflow.entities import Metric, Param, RunTag

        key = op["key"]
        if op["op"] == "create":
            if self._get(key):
                return
            exp_id = self.experiment_id()
            if op["tried"]:  # an earlier attempt may have reached the server: look for its run first
                found = self.client.search_runs([exp_id], f"tags.{_CREATE_TAG} = '{op['id']}'", max_results=1)
                if found:
                    self._set(key, found[0].info.run_id)
                    return
            if op.get("lookup"):  # a restored sweep: the run may exist from before the last saved state
                tag, value = op["lookup"]
                found = self.client.search_runs([exp_id], f"tags.{tag} = '{value}' and tags.sweep = "
                                                f"'{self.sweep_name}'", max_results=1)
                if found:
                    self._set(key, found[0].info.run_id)
                    return
            tags = dict(op["tags"], **{_CREATE_TAG: op["id"]})
            if op["parent"]:
                parent = self._get(op["parent"])
                if not parent:
                    raise _Unresolved(f"its parent run {op['parent']} was never created")
                tags["mlflow.parentRunId"] = parent
            op["tried"] = True
            run = self.client.create_run(exp_id, start_time=op["start_time"], run_name=op["name"], tags=tags)
            self._set(key, run.info.run_id)
            return
        run_id = self._get(key)
        if not run_id:
            raise _Unresolved(f"run {key} was never created")
        if op["op"] == "log":
            self.client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])],
                                  params=[Param(k, v) for k, v in op.get("params", {}).items()],
                                  tags=[RunTag(k, v) for k, v in op.get("tags", {}).items()])
        elif op["op"] == "end":
            self.client.set_terminated(run_id, op["status"], end_time=op["end_time"])
        elif op["op"] == "artifact":  # re-sending overwrites the same artifact path: idempotent
            if Path(op["path"]).is_file():
                self.client.log_artifact(run_id, op["path"], artifact_path=op.get("dir"))
        elif op["op"] == "dict":
            self.client.log_dict(run_id, op["data"], op["file"])
        elif op["op"] == "reopen":
            self.client.update_run(run_id, status="RUNNING")

    def _next(self) -> list[int]:
        """Queue positions sent together: the head, plus, when it only logs metrics, the later metric-only
        operations of the same run up to MLflow's 1000 per batch (never past another operation of that run)."""
        pending = self.state["pending"]
        head = pending[0]
        if not _metrics_only(head):
            return [0]
        take, n = [0], len(head["metrics"])
        for j in range(1, min(len(pending), 5000)):
            op = pending[j]
            if op["key"] != head["key"]:
                continue
            if not _metrics_only(op) or n + len(op["metrics"]) > 1000:
                break
            take.append(j)
            n += len(op["metrics"])
        return take

    def flush(self, force: bool = False, budget_s: Optional[float] = None) -> bool:
        """Send the queued operations in order; stop at the first one the server does not take. True when empty.

        Never raises. Without ``force`` nothing is tried until the pause after the last failure is over, and a
        call spends at most ``budget_s`` (default ``max_flush_s``) catching up (the rest goes at the next hook)."""
        with self._flushing:
            return self._flush(force, self.max_flush_s if budget_s is None else budget_s)

    def _flush(self, force: bool, budget_s: float) -> bool:
        pending = self.state["pending"]
        if not pending:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        deadline = float("inf") if force else time.monotonic() + budget_s
        while pending:
            if time.monotonic() > deadline:
                return False
            take = self._next()
            op = pending[0] if len(take) == 1 else dict(pending[0], metrics=[m for j in take for m in pending[j]["metrics"]])
            try:
                self._run(op)
            except Exception as e:
                if _permanent(e):
                    if all(r["key"] != op["key"] for r in self.state["rejected"]):
                        _warn(f"warning: MLflow refused {op['op']} for {op['key']} ({_reason(e)}); "
                              f"it is listed in {self.backlog_path or BACKLOG_FILE} at the end")
                    error = " ".join(str(e).split())[:500]
                    with self._lock:
                        self.state["rejected"] += [dict(pending[j], error=error) for j in take]
                        for j in reversed(take):
                            pending.pop(j)
                    continue
                self._failures += 1
                pause = min(self.retry_interval_s * 2 ** (self._failures - 1), self.max_retry_interval_s)
                self._retry_at = time.monotonic() + pause
                if self._failures == 1:
                    _warn(f"warning: MLflow tracking server {mask_uri(self.tracking_uri)} is not answering ({_reason(e)}); "
                          f"trials go on, tracking is queued ({len(pending)} operation(s)) and retried")
                return False
            if self._failures:
                _warn(f"MLflow tracking server {mask_uri(self.tracking_uri)} is back: sending {len(pending)} queued operation(s)")
                self._failures, self._retry_at = 0, 0.0
            with self._lock:
                for j in reversed(take):
                    pending.pop(j)
        return True

    # --- Tune callback hooks ----------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.state["trials"]:
            return  # a resumed or retried trial keeps its run
        from orchestrator.results import config_hash

        cfg = trial.config
        req = cfg["request"]
        cell = self._cell_key(cfg)
        tags = {"sweep": self.sweep_name, "level": "trial",
                "cell_id": cfg["cell_id"], "protocol": req["protocol"], "method": req["method"],
                "dataset": req["dataset"], "shots": str(req["shots"]), "seed": str(cfg["seed"]),
                "stage": cfg["stage"], "optuna_trial_number": str(cfg.get("optuna_number")),
                "tune_trial_id": trial.trial_id, "config_hash": config_hash(req), "git_commit": self.commit}
        name = f"{cfg['cell_id']}.{cfg['stage']}.seed{cfg['seed']}"
        if cfg["stage"] == "search":
            name += f".p{cfg.get('optuna_number')}"
        params = _flat_params({k: v for k, v in req.items() if k != "overrides"})
        params.update(_flat_params(req.get("overrides") or {}, "hp."))
        params.update(resolved_params(req))
        key = f"trial:{trial.trial_id}"
        self.state["trials"][trial.trial_id] = None
        op = self._create_op(key, name, tags, cell)
        if self._restored:  # the driver may have died after creating this run but before Tune saved our state
            op["lookup"] = ["tune_trial_id", trial.trial_id]
        self._submit(op)
        items = sorted((k, v[:6000]) for k, v in params.items())
        for i in range(0, len(items), MLFLOW_MAX_PARAMS):  # MLflow takes at most 100 params per batch
            self._submit({"op": "log", "key": key, "params": dict(items[i:i + MLFLOW_MAX_PARAMS])})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id not in self.state["trials"]:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        ts = int(time.time() * 1000)
        metrics = [[k, float(v), ts, step] for k, v in result.items()
                   if k not in _TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v == v and abs(v) != float("inf")]
        if metrics:
            self._submit({"op": "log", "key": f"trial:{trial.trial_id}", "metrics": metrics})

    def _end(self, key: str, status: str) -> None:
        if key not in self.state["closed"]:
            self._submit({"op": "end", "key": key, "status": status, "end_time": int(time.time() * 1000)})
            self.state["closed"].append(key)

    def _close(self, trial, status: str, error_tags: Optional[dict[str, str]] = None):
        key = f"trial:{trial.trial_id}"
        if trial.trial_id not in self.state["trials"] or key in self.state["closed"]:
            return
        if error_tags:
            self._submit({"op": "log", "key": key, "tags": error_tags})
        self._end(key, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        failed = bool(last.get("trial_failed"))
        self._close(trial, "FAILED" if failed else "FINISHED",
                    _error_tags(last.get("error_class"), last.get("error_message")) if failed else None)

    def on_trial_error(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self._close(trial, "FAILED", _error_tags(last.get("error_class") or "TrialError",
                                                 last.get("error_message") or str(getattr(trial, "error_file", "") or "")))

    def on_step_end(self, iteration, trials, **info):
        if not self.background:
            self.flush()  # catch up while the sweep runs, even between trial events

    def finish(self, status: str = "FINISHED", cells: Optional[dict[str, dict]] = None,
               metrics: Optional[dict[str, float]] = None, spec: Optional[dict] = None,
               artifacts: tuple[tuple[Path, Optional[str]], ...] = ()) -> Optional[Path]:
        """Close the cell runs and the parent run, send what is queued, and write what is left (its path).

        ``cells``: ``{cell id: cell_summary(...)}``: each cell run logs its metrics and chosen
        hyperparameters and ends with its own status (the others end with ``status``); ``metrics``, the
        ``spec`` (as ``spec.json``) and the ``artifacts`` (``(file, folder in the run or None)``: report,
        plots, result files) go to the sweep's run."""
        self.stop_sender()
        if (self.state["parent"] or self._queued("sweep")) and "sweep" not in self.state["closed"]:
            if spec is not None:
                self._submit({"op": "dict", "key": "sweep", "data": spec, "file": "spec.json"})
            for path, folder in artifacts:
                self._submit({"op": "artifact", "key": "sweep", "path": str(path), "dir": folder})
        now = int(time.time() * 1000)
        for cid in list(self.state["cells"]):
            summary = (cells or {}).get(cid)
            key = f"cell:{cid}"
            if summary is not None and key not in self.state["closed"]:
                self._submit({"op": "log", "key": key, "params": summary["params"],
                              "metrics": [[k, float(v), now, 0] for k, v in summary["metrics"].items()]})
            self._end(key, summary["status"] if summary is not None else status)
        if metrics and (self.state["parent"] or self._queued("sweep")) and "sweep" not in self.state["closed"]:
            self._submit({"op": "log", "key": "sweep", "metrics": [[k, float(v), now, 0] for k, v in metrics.items()]})
        if self.state["parent"] or self._queued("sweep"):
            self._end("sweep", status)
        self.flush(force=True)
        return self.write_backlog()

    def fail(self, outcome: tuple[str, str]) -> Optional[Path]:
        """A sweep that stops early: end its run and the open cell runs with ``outcome = (status, reason)``
        (the reason as tag ``failure_reason``), send what is queued within the usual catch-up budget and
        write the rest to the backlog (its path). Not recorded as closed: a resumed sweep reopens its run."""
        status, reason = outcome
        self.stop_sender()
        if self.state["parent"] or self._queued("sweep"):
            now = int(time.time() * 1000)
            self._submit({"op": "log", "key": "sweep", "tags": {"failure_reason": reason[:5000]}})
            for key in [f"cell:{cid}" for cid in self.state["cells"]] + ["sweep"]:
                if key not in self.state["closed"]:
                    self._submit({"op": "end", "key": key, "status": status, "end_time": now})
        self.flush()
        return self.write_backlog()

    # --- what could not be logged -------------------------------------------------------------
    @property
    def backlog_path(self) -> Optional[Path]:
        return self.out_dir / BACKLOG_FILE if self.out_dir is not None else None

    def missing(self) -> list[dict]:
        """Per run with queued operations: its key, run id (None if never created) and operations, in order."""
        out: dict[str, dict] = {}
        for op in self.state["pending"]:
            rec = out.setdefault(op["key"], {"run": op["key"], "run_id": self._get(op["key"]), "ops": []})
            if op["op"] == "log":
                what = [f"{len(op[f])} {f}" for f in ("params", "metrics", "tags") if op.get(f)]
                rec["ops"].append("log " + ", ".join(what))
            elif op["op"] == "end":
                rec["ops"].append(f"end {op['status']}")
            elif op["op"] in ("artifact", "dict"):
                rec["ops"].append(f"artifact {Path(op.get('path') or op.get('file')).name}")
            else:
                rec["ops"].append(op["op"])
        return list(out.values())

    def write_backlog(self) -> Optional[Path]:
        """Write ``tracking_backlog.json`` when operations are left (else remove an old one); fill run ids."""
        if self.out_dir is None:
            if self.state["pending"]:
                _warn(f"warning: {len(self.state['pending'])} MLflow operation(s) not logged to {mask_uri(self.tracking_uri)}")
            return None
        fill_run_ids(self.out_dir, self.state["trials"])
        p = self.backlog_path
        if not self.state["pending"] and not self.state["rejected"]:
            if p.exists():
                p.unlink()
            return None
        missing = self.missing()
        data = {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "sweep": self.sweep_name,
                "spec_hash": self.spec_hash, "written": datetime.now(timezone.utc).isoformat(),
                "trials": sorted(m["run"].partition(":")[2] for m in missing if m["run"].startswith("trial:")),
                "missing": missing, "rejected": self.state["rejected"], "state": self.get_state()}
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, p)
        if self.state["pending"]:
            _warn(f"warning: MLflow tracking server {mask_uri(self.tracking_uri)} did not take {len(self.state['pending'])} "
                  f"operation(s) for {len(missing)} run(s), listed in {p}; rerun the same command when it is back "
                  "to log them")
        else:
            _warn(f"warning: MLflow refused {len(self.state['rejected'])} operation(s), listed in {p}")
        return p

    def _load_backlog(self) -> None:
        try:
            data = json.loads(self.backlog_path.read_text())
            if split_credentials(str(data.get("tracking_uri")))[0] == self.tracking_uri:
                return self.set_state(data["state"])
            why = f"holds operations for {mask_uri(str(data.get('tracking_uri')))}, not {mask_uri(self.tracking_uri)}"
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"cannot be read ({e})"
        _warn(f"warning: {self.backlog_path} {why}; left as it is")
        self.out_dir = None  # do not overwrite it

    # --- restore ------------------------------------------------------------------------------
    def get_state(self) -> Optional[dict]:
        with self._lock:
            return json.loads(json.dumps(self.state))

    def set_state(self, state: dict) -> None:
        """Merge a saved state: run ids kept (a known id wins over a placeholder), queues united in order."""
        with self._lock:
            self._merge_state(state)

    def _merge_state(self, state: dict) -> None:
        s = self.state
        self._restored = True
        state = json.loads(json.dumps(state))
        s["parent"] = state.get("parent") or s["parent"]
        s["experiment_id"] = state.get("experiment_id") or s.get("experiment_id")
        for kind in ("cells", "trials"):
            for k, v in (state.get(kind) or {}).items():
                if v or k not in s[kind]:
                    s[kind][k] = v
        by_run = {v: f"{kind[:-1]}:{k}" for kind in ("cells", "trials") for k, v in s[kind].items() if v}
        by_run[s["parent"]] = "sweep"
        for c in state.get("closed", []):  # older states list closed run ids, newer ones keys
            c = by_run.get(c, c)
            if c not in s["closed"]:
                s["closed"].append(c)
        for name in ("pending", "rejected"):
            ops = {op["id"]: op for op in s.get(name, [])}
            for op in state.get(name, []):
                if name == "pending" and op["op"] == "create":
                    op["tried"] = True  # it may have reached the server after this state was saved
                ops.setdefault(op["id"], op)
            s[name][:] = sorted(ops.values(), key=lambda op: op["t"])  # in place: a running flush holds this list

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_client"] = None
        for k in ("_lock", "_flushing", "_wake", "_sender", "_stopping"):
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._init_sender()


def replay_backlog(out_dir: Path) -> Optional[int]:
    """Send ``<out_dir>/tracking_backlog.json`` (a finished sweep rerun); the operations left, None if no file."""
    p = Path(out_dir) / BACKLOG_FILE
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
        args = [data[k] for k in ("tracking_uri", "experiment", "sweep", "spec_hash")]
        parent = data["state"].get("parent")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        _warn(f"warning: {p} cannot be read ({e}); left as it is")
        return None
    tracker = MlflowTracking(*args, parent_run_id=parent, out_dir=out_dir)
    n = len(tracker.state["pending"])
    tracker.flush(force=True)
    tracker.write_backlog()
    left = len(tracker.state["pending"])
    if n and not left:
        print(f"tracking: logged the {n} queued MLflow operation(s) from {p.name} to {mask_uri(tracker.tracking_uri)}")
    return left
