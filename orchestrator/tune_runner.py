"""Ray Tune wiring of a sweep: Ray start/connect, the trial trainable, the results ledger, the pruning
scheduler, and building or restoring the one ``Tuner`` that runs every trial.

* ``trial_trainable(config)`` runs ``orchestrator.trial.run_trial`` in a Tune worker, forwards every
  epoch's metrics (and checkpoint) with ``ray.tune.report`` and resumes from ``tune.get_checkpoint()``.
  Workers are warm (``reuse_actors``): the process keeps its backbone across trials, and each trial
  releases its own memory when it ends; a fractional-GPU trial caps its process's CUDA allocator at
  its share.
  A user-caused failure (``UserError``, e.g. a NaN loss) is reported with ``trial_failed`` and
  not retried; any other exception is reported and re-raised so Tune retries from the checkpoint.
* ``ResultsCallback`` (driver) turns finished trials into ``trials.arrow`` rows and rewrites both
  Arrow files atomically after each one; its rows survive ``Tuner.restore`` via get/set_state.
* ``CellPruningScheduler`` asks the searcher whether the trial's own cell study prunes it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrator.results import trial_row, write_results

EXPERIMENT_NAME = "tune"


# --- Ray -----------------------------------------------------------------------------------------

def ensure_ray(address: Optional[str] = None) -> bool:
    """Connect to ``address`` / $RAY_ADDRESS, else start a local loopback Ray. True when we started it."""
    import logging

    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        leave_job_working_dir()
        ray.init(address=addr, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
        return False
    ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
    return True


def leave_job_working_dir() -> None:
    """Under ``ray job submit --working-dir``, step out of the job's working-dir copy for good.

    Ray 2.60 re-extracts that copy (delete + unzip, ``overwrite=True``) on a node whenever it sets up
    a worker of the job there — including the head this driver runs on, at a moment of its choosing —
    which deletes the directory under the driver's cwd; the next ``os.getcwd()`` (MLflow's SQLite
    store calls it) then fails. Every path the sweep uses is absolute by now, and the modules come
    from the same path once re-extracted, so the driver continues from the temp directory.
    """
    import tempfile

    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        os.chdir(tempfile.gettempdir())


def max_concurrent_trials(cpu: float, gpu: float, override: Optional[int] = None) -> int:
    """How many trials the cluster fits at once (so trials do not start one at a time)."""
    import ray

    from fewshot.errors import ConfigError

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [nd for nd in nodes if nd.get("CPU", 0) >= cpu and nd.get("GPU", 0) >= gpu]
    if not fits:
        have = ", ".join(f"cpu={nd.get('CPU', 0):g} gpu={nd.get('GPU', 0):g}" for nd in nodes) or "no nodes"
        raise ConfigError(f"resources: no Ray node can run a trial asking cpu={cpu:g} gpu={gpu:g} ({have}); "
                          "lower resources.cpu/gpu in the spec or connect to a cluster with --address")
    if override:
        return override
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // cpu)
    if gpu > 0:
        n = min(n, int(res.get("GPU", 0) // gpu))
    return max(1, n)


# --- the trainable --------------------------------------------------------------------------------

def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


def build_request(request: dict):
    """A ``TrialRequest`` from the searcher's request dict (backbone as nested or flat fields)."""
    from orchestrator.trial import TrialRequest

    req = dict(request)
    fields = TrialRequest.model_fields
    bb = req.pop("backbone", None) or {}
    if "backbone" in fields:
        req["backbone"] = bb
    else:
        for k, v in bb.items():
            if k in fields:
                req[k] = v
            elif f"backbone_{k}" in fields:
                req[f"backbone_{k}"] = v
    return TrialRequest(**{k: v for k, v in req.items() if v is not None or k in fields})


def _gpu_share() -> float:
    """The GPU fraction Ray assigned to this trial (0 without a GPU)."""
    import ray

    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return 0.0


def cap_gpu_memory(share: float) -> None:
    """Fractional GPU trials share one device: cap this process's allocator at its share (Ray does not)."""
    import torch

    if 0 < share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(share, torch.cuda.current_device())


def release_trial_memory() -> None:
    """Between trials of a warm worker on a GPU: collect the finished trial's tensors still held in
    reference cycles and return the allocator's cached blocks to the device, so the next trial (or
    a packed neighbour) starts with the memory free. The backbone, tokenizer and text-feature caches
    stay loaded. On CPU, reference counting frees the trial and Python's own collector does the rest
    (a full ``gc.collect`` there cost ~0.3 s per trial, half of a short trial's overhead)."""
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def trial_trainable(config: dict) -> None:
    from fewshot.errors import UserError
    from methods import backbone
    from orchestrator.trial import run_trial

    saw_final = {"v": False}
    cap_gpu_memory(_gpu_share())

    def report(metrics: dict, checkpoint_dir=None) -> None:
        m = _numeric(metrics)
        m.setdefault("val_acc", None)  # Tune refuses results without the searcher's metric key (e.g. a failure)
        if "epochs_run" in metrics:
            m["final"] = 1
            m["backbone_loads"] = backbone.LOAD_COUNT  # weights loaded by this worker process so far
            saw_final["v"] = True
        if checkpoint_dir is not None:
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
        else:
            tune.report(m)

    trial_dir = Path(tune.get_context().get_trial_dir()).resolve()
    try:
        req = build_request(config["request"])
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                final = run_trial(req, output_dir=trial_dir / "work", report=report, resume_from=Path(d))
        else:
            final = run_trial(req, output_dir=trial_dir / "work", report=report, resume_from=None)
        if not saw_final["v"]:
            report(final)
    except UserError as e:
        report({"trial_failed": 1, "error_class": getattr(e, "error_class", type(e).__name__),
                "error_message": str(e)[:2000]})
    except Exception as e:  # not the user's: reported, then Tune retries the trial from its checkpoint
        from orchestrator.trial import is_oom

        report({"trial_failed": 1, "error_class": "oom" if is_oom(e) else type(e).__name__,
                "error_message": str(e)[:2000]})
        raise
    finally:
        release_trial_memory()


# --- driver-side results ledger ---------------------------------------------------------------------

class ResultsCallback(Callback):
    """One row per finished trial; rewrites trials.arrow / cells.arrow after each (atomic)."""

    def __init__(self, out_dir: Path, meta: dict, cell_order: list[str], tracker=None):
        self.out_dir = Path(out_dir)
        self.meta = dict(meta)
        self.cell_order = list(cell_order)
        self.tracker = tracker
        self.rows: dict[str, dict] = {}

    def _record(self, trial, status: str) -> None:
        last = dict(trial.last_result or {})
        if last.get("trial_failed"):
            status = "ERROR"
        elif status == "TERMINATED" and not last.get("final"):
            status = "PRUNED"  # stopped by the cell's pruner before its final metrics
        err_cls = err_msg = None
        if status == "ERROR" and not last.get("error_class"):
            err_cls, err_msg = "TrialError", (str(trial.error_file) if getattr(trial, "error_file", None) else "unknown error")
        run_id = self.tracker.trial_run_id(trial.trial_id) if self.tracker else None
        self.rows[trial.trial_id] = trial_row(trial.config, last, status=status, tune_trial_id=trial.trial_id,
                                              error_class=err_cls, error_message=err_msg, mlflow_run_id=run_id)
        self.flush()

    def flush(self) -> None:
        write_results(self.out_dir, self.rows.values(), self.meta, self.cell_order)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "ERROR")

    def get_state(self) -> Optional[dict]:
        return {"rows": self.rows}

    def set_state(self, state: dict) -> None:
        self.rows.update(state.get("rows", {}))


# --- pruning --------------------------------------------------------------------------------------

class CellPruningScheduler(FIFOScheduler):
    """Stops a search trial when its own cell's Optuna pruner says so (never compares across cells)."""

    def __init__(self, searcher):
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.searcher.should_prune(trial.trial_id, result):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


# --- the Tuner ------------------------------------------------------------------------------------

def experiment_path(out_dir: Path) -> Path:
    return Path(out_dir) / EXPERIMENT_NAME


def trial_dirname(trial) -> str:
    """Short trial directory names (Tune's default embeds the whole config)."""
    return trial.trial_id


def quiet_tune_logs() -> None:
    """Failed trials are recorded in trials.arrow / MLflow; keep Tune's tracebacks off the progress view."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new console output prints every trial error
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def build_tuner(out_dir: Path, searcher, callbacks: list, cpu: float, gpu: float, max_concurrent: int,
                max_retries: int, use_pruning: bool):
    """A fresh Tuner, or the restored one when the experiment exists (callbacks replaced by ours)."""
    trainable = tune.with_resources(trial_trainable, {"cpu": cpu, "gpu": gpu})
    path = experiment_path(out_dir)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        # the restored run config carries pickled copies of our callbacks; use the live ones
        # (same order, so Tune applies the saved callback states to them)
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    tune_config = TuneConfig(search_alg=searcher, scheduler=CellPruningScheduler(searcher) if use_pruning else None,
                             num_samples=-1, max_concurrent_trials=max_concurrent, reuse_actors=True,
                             trial_dirname_creator=trial_dirname)
    run_config = RunConfig(name=EXPERIMENT_NAME, storage_path=str(Path(out_dir).resolve()), verbose=0,
                           callbacks=callbacks, failure_config=FailureConfig(max_failures=max_retries),
                           checkpoint_config=CheckpointConfig(num_to_keep=1), log_to_file=True)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)

