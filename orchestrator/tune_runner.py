"""Ray Tune wiring of a sweep: Ray start/connect, the trial trainable, the results ledger, the pruning
scheduler, and building or restoring the one ``Tuner`` that runs every trial.

* ``trial_trainable(config)`` runs ``orchestrator.trial.run_trial`` in a Tune worker, forwards every
  epoch's metrics (and checkpoint) with ``ray.tune.report`` and resumes from ``tune.get_checkpoint()``.
  Workers are warm (``reuse_actors``): the process keeps its backbone across trials, and each trial
  releases its own memory when it ends; a fractional-GPU trial caps its process's CUDA allocator at
  its share.
  A user-caused failure (``UserError``, e.g. a NaN loss) is reported with ``trial_failed`` and
  not retried; any other exception is reported and re-raised so Tune retries from the checkpoint.
* ``ResultsCallback`` (driver) keeps the ledger (``orchestrator.ledger``): a journal entry when a trial
  starts, its ``trials.arrow`` row when it finishes — on disk at once, the result files rewritten
  geometrically (bytes written per trial do not grow with the sweep). The ledger, not Tune's snapshot, is
  what a restarted driver continues from.
* ``CellPruningScheduler`` asks the searcher whether the trial's own cell study prunes it.
* ``build_tuner`` builds the Tuner, or restores it (``resume_unfinished``; failed trials are not resumed by
  Tune), with this driver's fresh searcher (``orchestrator.searcher``: rebuilt from the plan, the ledger
  and the Optuna journal, never from Tune's saved copy) and a ``LedgerScheduler`` (the cell pruner plus the
  ledger): a restored trial Tune lists as unfinished but whose row is in the ledger (it finished after
  Tune's last snapshot) is not run again — it is marked finished; any other restored trial runs again from
  the newest checkpoint on storage that loads (whatever its snapshot names), adopted by the searcher so its
  work is not emitted twice. The same path continues a sweep whose spec grew or whose failed trials are
  retried: the fresh searcher emits whatever planned work has no row. Tune's experiment snapshot holds every
  trial (O(N) bytes), so it is saved (and Tune's trial logs synced to storage) when the trials added,
  started or checkpointed since the last one reach 1/``SNAPSHOT_FRACTION`` of them (every one while a sweep
  is small), and Tune's own timer is off; a trial's older checkpoints are deleted by the driver
  (``ResultsCallback.on_checkpoint``) rather than by Tune's ``num_to_keep``, which would force a snapshot
  per checkpoint. Work an older snapshot misses is emitted again by the searcher (from the ledger), and a
  trial that takes up work an earlier driver had started continues that trial's MLflow run (``continues``
  in its config). Resume events print one ``resume:`` line each. Private Ray names are used through
  ``orchestrator.ray_internals`` only.
  Tune writes its state files in place, so a write cut short (a full disk) leaves one unreadable, and
  Tune, failing to restore, would quietly start a one-trial run: ``set_aside_damaged_state`` finds such
  a file first, renames the state files of that save ``*.damaged``, and the sweep continues from the
  ledger on a fresh Tuner in the same folder.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrator import ray_internals
from orchestrator.results import ERROR_STATUS, OK_STATUS, PRUNED_STATUS, epoch_row, trial_row, upgrade_row

EXPERIMENT_NAME = "tune"


# --- Ray -----------------------------------------------------------------------------------------


def ensure_ray(
    address: Optional[str] = None,
    dashboard: Optional[tuple[str, int]] = None,
    job_metadata: Optional[dict[str, str]] = None,
) -> bool:
    """Connect to ``address`` / $RAY_ADDRESS, else start a local Ray whose every listener binds loopback
    (``LOCAL_NODE_IP``), with its dashboard on ``dashboard`` = (host, port) when given (its URL printed).
    ``job_metadata`` is the Ray job's metadata (the dashboard's Jobs table, ``ray list jobs --detail``; a job
    from ``ray job submit`` shows its submission's metadata there instead). True when we started it."""
    import logging

    import ray
    from ray.job_config import JobConfig

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    job_config = JobConfig(metadata=dict(job_metadata or {}))
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        leave_job_working_dir()
        ray.init(
            address=addr,
            runtime_env=runtime_env,
            job_config=job_config,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        return False
    board = {"dashboard_host": dashboard[0], "dashboard_port": dashboard[1]} if dashboard else {}
    with ray_internals.cluster_mode_off():
        ctx = ray.init(
            address="local",
            _node_ip_address=LOCAL_NODE_IP,
            num_cpus=os.cpu_count(),
            include_dashboard=dashboard is not None,
            **board,
            runtime_env=runtime_env,
            job_config=job_config,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    if dashboard:
        print(f"ray dashboard: http://{ctx.dashboard_url or '%s:%d' % dashboard}", flush=True)
    return True


#: the local Ray's node address. Ray binds every listener of a node (GCS, raylet, workers, driver, agents,
#: metrics) to loopback only when the node address is exactly 127.0.0.1 (``is_localhost``); for any other
#: address, 127.0.0.2 included, they bind all interfaces
LOCAL_NODE_IP = "127.0.0.1"


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


def local_node_resources() -> dict:
    """What the local Ray that ``ensure_ray`` starts will offer: every CPU core, every visible CUDA GPU
    (``CUDA_VISIBLE_DEVICES`` honoured, as Ray does). Read without starting Ray, so a spec that cannot
    run here is refused before the data preflight and before Ray starts."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_trial_fits(cpu: float, gpu: float, nodes: list[dict], where: str) -> list[dict]:
    """The nodes (Ray resource dicts) that can run one trial; ConfigError when none can."""
    from fewshot.errors import ConfigError

    fits = [nd for nd in nodes if nd.get("CPU", 0) >= cpu and nd.get("GPU", 0) >= gpu]
    if not fits:
        have = ", ".join(f"cpu={nd.get('CPU', 0):g} gpu={nd.get('GPU', 0):g}" for nd in nodes) or "no nodes"
        raise ConfigError(
            f"resources: {where} can run a trial asking cpu={cpu:g} gpu={gpu:g} ({have}); "
            "lower resources.cpu/gpu in the spec or connect to a cluster with --address"
        )
    return fits


def max_concurrent_trials(cpu: float, gpu: float, override: Optional[int] = None) -> int:
    """How many trials the cluster fits at once (so trials do not start one at a time)."""
    import ray

    check_trial_fits(cpu, gpu, [n["Resources"] for n in ray.nodes() if n.get("Alive")], "no Ray node")
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
            m["reported_at"] = time.time()  # Tune's own `timestamp` is whole seconds
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
        report(
            {
                "trial_failed": 1,
                "error_class": getattr(e, "error_class", type(e).__name__),
                "error_message": str(e)[:2000],
            }
        )
    except Exception as e:  # not the user's: reported, then Tune retries the trial from its checkpoint
        from orchestrator.trial import is_oom

        report(
            {"trial_failed": 1, "error_class": "oom" if is_oom(e) else type(e).__name__, "error_message": str(e)[:2000]}
        )
        raise
    finally:
        release_trial_memory()


# --- driver-side results ledger ---------------------------------------------------------------------


class ResultsCallback(Callback):
    """The driver's side of the ledger (``orchestrator.ledger``): a journal entry when a trial starts, a row
    when it finishes (appended at once; the result files rewritten when the ledger says so, and by ``flush``).

    Starts from the ledger of the output directory (``trials.arrow`` and the journal, keyed by Tune trial
    id): the rows a resumed sweep continues from (``ledger``, what ``build_tuner`` hands the scheduler and the
    searcher) and the starts of trials that never finished (``open_starts``). A trial that retries a failed
    one (its config names it in ``retry_of``) replaces the failed row. The rows of ``drop_cells``
    (``--restart-cells``) are left out from the start, also when Tune's saved state has them, and the files
    are rewritten without them at once. The MLflow callback comes earlier in the callback list, so a starting
    trial's run id is known (or being created) when its start is journaled."""

    def __init__(
        self, out_dir: Path, meta: dict, cell_order: list[str], tracker=None, drop_cells: Optional[set] = None
    ):
        from orchestrator.ledger import Ledger
        from orchestrator.results import remove_stale_temps

        self.out_dir = Path(out_dir)
        self.tracker = tracker
        remove_stale_temps(self.out_dir)  # left by a driver killed mid-write
        self.book = Ledger(self.out_dir, meta, cell_order, drop_cells)
        self.rows = self.book.rows  # Tune trial id -> row (live: the progress view and the driver read it)
        self.ledger: dict[str, dict] = dict(self.rows)  # rows finished before this driver started
        self.open_starts = dict(self.book.starts)  # trials started before this driver that never finished
        self.drop_cells = self.book.drop_cells
        self.scheduler = None
        if self.book.dropped:
            self.flush()

    def _record(self, trial, status: str) -> None:
        last = dict(trial.last_result or {})
        if last.get("trial_failed"):
            status = ERROR_STATUS
        elif status == OK_STATUS and not last.get("final"):
            status = PRUNED_STATUS  # stopped by the cell's pruner before its final metrics
        err_cls = err_msg = None
        if status == ERROR_STATUS and not last.get("error_class"):
            err_cls, err_msg = (
                "TrialError",
                (str(trial.error_file) if getattr(trial, "error_file", None) else "unknown error"),
            )
        run_id = self.tracker.trial_run_id(trial.trial_id) if self.tracker else None
        pgf = getattr(trial, "placement_group_factory", None)  # what Ray reserved: the trial's cost
        self.book.finished(
            trial_row(
                trial.config,
                last,
                status=status,
                tune_trial_id=trial.trial_id,
                error_class=err_cls,
                error_message=err_msg,
                mlflow_run_id=run_id,
                resources=pgf.required_resources if pgf is not None else None,
            )
        )

    def flush(self) -> None:
        """Rewrite every result file now (the end of a driver)."""
        self.book.write()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = epoch_row(trial.config, result, trial.trial_id)
        if row is not None:  # appended with the next row (a trial's end): a retried epoch replaces its earlier row
            self.book.epoch(row)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, OK_STATUS)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, ERROR_STATUS)

    def on_trial_start(self, iteration, trials, trial, **info):
        from orchestrator.ledger import work_key

        c = trial.config
        run_id = self.tracker.trial_run_id(trial.trial_id) if self.tracker else None
        self.book.started(trial.trial_id, work_key(c["cell_id"], c["stage"], c["seed"], c.get("optuna_number")), run_id)
        if self.scheduler is not None:
            self.scheduler.trial_event()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """Delete the trial's older checkpoints once a newer one is registered (Tune keeps them all: with
        ``num_to_keep`` it would save its O(N) snapshot at every trial checkpoint)."""
        folder, newest = _split_checkpoint_path(checkpoint.path)
        if newest is None:
            return
        if self.scheduler is not None:
            self.scheduler.trial_event()  # Tune's snapshot, and the sync of its trial logs to storage
        for idx, path in _checkpoints_on_storage(checkpoint.filesystem, folder):
            if idx < newest:
                try:
                    checkpoint.filesystem.delete_dir(path)
                except OSError:  # gone already (Tune's own num_to_keep in a sweep started before)
                    pass

    def get_state(self) -> Optional[dict]:
        return None  # the ledger is on disk; Tune's snapshot need not carry every row (O(N) per snapshot)

    def set_state(self, state: dict) -> None:
        # a snapshot of an older driver may carry rows: they only fill in rows the ledger lacks
        retried = {r.get("retry_of_trial") for r in self.rows.values()}
        for tid, row in (state or {}).get("rows", {}).items():
            if row.get("cell_id") not in self.drop_cells and tid not in retried and tid not in self.rows:
                self.rows[tid] = upgrade_row(row)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["scheduler"] = None
        return d


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


#: Tune's experiment snapshot holds every trial it knows (O(N) bytes): the scheduler has it saved when the trials
#: added, started or checkpointed since the last one reach 1/SNAPSHOT_FRACTION of them, and Tune's own timer is off
#: (``TUNE_GLOBAL_CHECKPOINT_S``), so bytes written per trial stay flat as a sweep grows. What a snapshot
#: misses the ledger has: rows and starts (``orchestrator.ledger``), the searcher's work, the MLflow runs.
SNAPSHOT_FRACTION = 8
SNAPSHOT_TIMER_S = "86400"


def _snapshot_soon(tune_controller) -> None:
    """Have Tune save its experiment snapshot at the end of this step (as it does after every trial checkpoint
    with ``num_to_keep=1``), so a trial is on record before it starts: a driver killed later restores it
    (from its checkpoint) instead of the searcher emitting its work again under a new trial id."""
    ray_internals.snapshot_at_step_end(tune_controller)


#: the state files Tune saves together (``<stem>-<timestamp>.<ext>``), and ``tuner.pkl``
_STATE_STEMS = ("experiment_state", "search_gen_state", "searcher-state", "callback-states")
DAMAGED_SUFFIX = ".damaged"


def _unreadable(path: Path) -> Optional[str]:
    """Why Tune could not load ``path`` (a truncated or garbled write), or None: JSON for the experiment
    state, pickle for the rest (read only, never unpickled into objects: the load is done with a pickle
    disassembly that stops at the first bad opcode)."""
    import json
    import pickletools

    try:
        data = path.read_bytes()
        if path.suffix == ".json" and path.name.startswith("experiment_state"):
            json.loads(data)
        else:
            for _ in pickletools.genops(data):
                pass
            if not data.rstrip().endswith(b"."):  # every complete pickle ends with STOP
                return "it ends before the pickle's end"
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def set_aside_damaged_state(path: Path) -> Optional[str]:
    """If the newest save of Tune's state in the experiment folder ``path`` (or ``tuner.pkl``) cannot be read,
    rename that save's files (and ``tuner.pkl``) with ``DAMAGED_SUFFIX`` and return one line saying so;
    None when everything reads. Tune names each driver's files by its start time, so the newest is the
    lexically largest ``experiment_state-*.json``."""
    states = sorted(path.glob("experiment_state-*.json"))
    stamp = states[-1].name[len("experiment_state-") : -len(".json")] if states else None
    files = [
        p
        for p in (path / "tuner.pkl", *(q for stem in _STATE_STEMS for q in path.glob(f"{stem}-{stamp}.*")))
        if stamp is not None or p.name == "tuner.pkl"
    ]
    bad = next(((p, why) for p in files if p.is_file() and (why := _unreadable(p))), None)
    if bad is None:
        return None
    for p in files:
        if p.is_file():
            p.rename(p.with_name(p.name + DAMAGED_SUFFIX))
    return (
        f"resume: Tune's saved state {bad[0].name} cannot be read ({bad[1]}), as after a write cut short by a "
        f"full disk; its files are kept as *{DAMAGED_SUFFIX} and the sweep continues from trials.arrow"
    )


_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")


def _checkpoint_index(name: str) -> Optional[int]:
    """The index of a ``checkpoint_<index>`` folder name (None for any other name)."""
    m = _CHECKPOINT_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def _split_checkpoint_path(path: str) -> tuple[str, Optional[int]]:
    """``(trial folder, checkpoint index)`` of a checkpoint's path."""
    folder, _, name = path.rstrip("/").rpartition("/")
    return folder, _checkpoint_index(name)


def _checkpoints_on_storage(fs, folder: str) -> list[tuple[int, str]]:
    """``(index, path)`` of the ``checkpoint_<index>`` folders in a trial's directory."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    return [
        (idx, info.path)
        for info in infos
        if info.type == pafs.FileType.Directory and (idx := _checkpoint_index(info.base_name)) is not None
    ]


def _restorable_checkpoint(trial) -> Optional[str]:
    """Point a restored trial whose checkpoint is gone (or that names none) at the next one on storage that
    loads; returns its path.

    The driver deletes a trial's older checkpoints as a newer one arrives (``ResultsCallback.on_checkpoint``;
    Tune itself did so with ``num_to_keep=1`` in sweeps started before), while the experiment snapshot that
    names the newer one is saved at the end of Tune's step, or later in a large sweep (``SNAPSHOT_FRACTION``):
    a driver killed in between leaves a snapshot naming a deleted checkpoint, or none when the trial
    checkpointed only after it, and Tune's restore of that trial would fail every retry ("does not exist on
    storage anymore") or start it from scratch. The trial directory still holds the checkpoints written
    since; the oldest of them that loads (a newer one may be half copied; the oldest is the one closest to
    the trial's log, which is synced with the snapshot) becomes the trial's latest, so the trial resumes
    there. A named checkpoint that exists is kept: the snapshot's log and checkpoint agree."""
    import pyarrow.fs as pafs
    from ray.tune import Checkpoint

    from orchestrator import checkpoint as trial_checkpoint

    cur = trial.checkpoint
    gone = -1
    if cur is not None:
        if cur.filesystem.get_file_info(cur.path).type != pafs.FileType.NotFound:
            return None
        fs = cur.filesystem
        folder, gone = _split_checkpoint_path(cur.path)
        if gone is None:
            return None
    else:
        where = ray_internals.trial_storage(trial)
        if where is None:
            return None  # a new trial
        fs, folder = where
    for idx, path in sorted(_checkpoints_on_storage(fs, folder)):
        if idx <= gone:
            continue
        candidate = Checkpoint(path=path, filesystem=fs)
        try:
            with candidate.as_directory() as d:
                trial_checkpoint.load(Path(d))
        except Exception:  # noqa: BLE001 - half written: try the next one
            continue
        latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
        metrics = dict(latest.metrics or {}) if latest is not None else {}
        if isinstance(metrics.get("training_iteration"), int):
            metrics["training_iteration"] += idx - gone
        if cur is not None:
            fs.create_dir(cur.path)  # stand-in: registering may delete the old one (raises if it is gone)
        ray_internals.register_checkpoint(trial, candidate, metrics, idx)
        return path
    return None


class LedgerScheduler(CellPruningScheduler):
    """The sweep's scheduler: the cell pruner (when ``prune``) and the restore-time check against the ledger.

    Tune re-queues every trial its last experiment snapshot lists as unfinished; one that finished
    after that snapshot has a row in ``ledger`` (the ``trials.arrow`` rows when this driver started)
    and must not run again. ``on_trial_add`` — which Tune calls for each restored trial before it
    files the trial under its status — marks such a trial finished (the searcher counts its work from
    the row; a failed one runs again only under ``--retry-failed``, as a new trial). A restored trial
    without a row runs again from a checkpoint that exists (``_restorable_checkpoint``), and the searcher
    adopts it so its work is not emitted twice. Added, started and checkpointed trials also make Tune save its
    snapshot at the end of the step, geometrically (``SNAPSHOT_FRACTION``)."""

    def __init__(self, searcher, prune: bool = True, ledger: Optional[dict] = None):
        super().__init__(searcher)
        self.prune = prune
        self.ledger = dict(ledger or {})
        self._controller = None
        self._known = 0  # trials Tune holds (each one's state is in every snapshot)
        self._events = 0  # trials added or started since the last snapshot this scheduler asked for
        self._unfinished: dict[str, object] = {}  # trial id -> trial, in the order Tune added them

    def choose_trial_to_run(self, tune_controller):
        """FIFO's choice (the first PENDING trial in the order added, else the first PAUSED) over the trials not
        finished yet, instead of scanning every trial Tune holds at each step (O(N) per step)."""
        from ray.tune.experiment import Trial

        for tid in [t for t, trial in self._unfinished.items() if trial.status in (Trial.TERMINATED, Trial.ERROR)]:
            del self._unfinished[tid]  # final: a trial Tune retries goes from RUNNING back to PENDING
        for wanted in (Trial.PENDING, Trial.PAUSED):
            for trial in self._unfinished.values():
                if trial.status == wanted:
                    return trial
        return None

    def trial_event(self) -> None:
        """A trial was added, started or checkpointed: Tune saves its snapshot (and syncs its trial logs to
        storage) at the end of the step once such events reach 1/SNAPSHOT_FRACTION of the trials it holds —
        at every event while a sweep is small, as Tune itself does after each checkpoint with ``num_to_keep``."""
        self._events += 1
        if self._controller is not None and self._events * SNAPSHOT_FRACTION >= self._known:
            self._events = 0
            _snapshot_soon(self._controller)

    def on_trial_add(self, tune_controller, trial) -> None:
        import sys

        from ray.tune.experiment import Trial

        super().on_trial_add(tune_controller, trial)
        self._controller = tune_controller
        self._known += 1
        self.trial_event()
        if trial.status not in (Trial.TERMINATED, Trial.ERROR):
            self._unfinished[trial.trial_id] = trial
        if trial.status != Trial.PENDING:
            return
        row = self.ledger.get(trial.trial_id)
        try:  # never raise here: Tune would drop the whole restored state and start the experiment over
            if row is None:
                self.searcher.adopt(trial.trial_id, trial.config)  # first: its work must never be emitted twice
                old = trial.checkpoint
                new = _restorable_checkpoint(trial)
                if new:
                    named = (
                        f"named {Path(old.path).name}, which it had already replaced"
                        if old is not None
                        else "named none: the trial checkpointed after it"
                    )
                    print(
                        f"resume: trial {trial.trial_id} continues from {Path(new).name} (Tune's snapshot {named})",
                        flush=True,
                    )
                return
            trial.set_status(Trial.TERMINATED)
            ray_internals.drop_live_trial(tune_controller, trial)
            print(
                f"resume: trial {trial.trial_id} finished after Tune's last snapshot; its row stands, it does "
                "not run again",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            print(f"warning: resuming trial {trial.trial_id}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not self.prune:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["ledger"] = {}  # tuner.pkl holds the scheduler: the ledger is re-read from trials.arrow on restore
        d["_controller"] = None
        d["_unfinished"] = {}
        return d


def ray_label(sweep_name: str) -> str:
    """How Ray shows a sweep's trial actors (class and repr in ``ray list actors``, the dashboard's Actors tab)."""
    return f"promptsweep[{sweep_name}]"


def sweep_trainable(sweep_name: str, cpu: float, gpu: float) -> type:
    """``trial_trainable`` as the Tune trainable class whose actors Ray lists under ``ray_label(sweep_name)``:
    that is their ``class_name`` (Ray takes the class's qualified name) and their ``repr_name`` (and so the
    name of their tasks, ``<label>.train``). Tune keeps a worker across trials (``reuse_actors``), of any cell,
    and Ray fixes an actor's names when it starts, so they name the sweep, not a cell; trials.arrow's ``node``
    and the MLflow trial runs say where each trial ran. The name Tune registers and restores by stays
    ``trial_trainable`` (an experiment saved before keeps restoring)."""
    from ray.tune.trainable import wrap_function

    label = ray_label(sweep_name)
    named = type(label, (wrap_function(trial_trainable),), {"__repr__": lambda self: label, "__module__": __name__})
    trainable = tune.with_resources(named, {"cpu": cpu, "gpu": gpu})
    trainable.__qualname__ = label  # with_resources' subclass: the class Tune starts actors of
    return trainable


def build_tuner(
    out_dir: Path,
    searcher,
    callbacks: list,
    cpu: float,
    gpu: float,
    max_retries: int,
    use_pruning: bool,
    sweep_name: str = "sweep",
    retry_failed: bool = False,
    max_concurrent: int = 1,
):
    """A fresh Tuner, or the restored one when the experiment exists (callbacks, scheduler and searcher
    replaced by this driver's).

    Either way the searcher is this driver's fresh one (``orchestrator.searcher``: rebuilt from the plan,
    the ledger and the Optuna journal; Tune's saved copy is never loaded, see ``SweepSearch``), holding the
    ledger — the rows of the ``ResultsCallback`` among ``callbacks`` (trials.arrow as this driver found it;
    with ``retry_failed`` its failed rows run again) — and a ``LedgerScheduler``; trial actors are named
    after ``sweep_name`` (``sweep_trainable``). Restored trials that failed in Tune are not resumed by Tune
    (``resume_errored=False``): their work runs again only under ``retry_failed``, as new trials."""
    from orchestrator.searcher import SweepSearch

    ray_internals.check()
    # Tune lets a custom searcher have one trial pending (waiting for resources) at a time unless told otherwise
    # (it reads a ConcurrencyLimiter's limit, which the searcher does not need: it limits itself), so trials would
    # start one by one; the documented variable says how many may wait at once
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(1, int(max_concurrent))))
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_TIMER_S)  # snapshots come from the scheduler
    trainable = sweep_trainable(sweep_name, cpu, gpu)
    path = experiment_path(out_dir)
    results_cb = next((cb for cb in callbacks if isinstance(cb, ResultsCallback)), None)
    ledger = dict(results_cb.ledger) if results_cb is not None else {}
    searcher.set_ledger(
        ledger.values(), retry_failed=retry_failed, starts=results_cb.open_starts if results_cb is not None else None
    )
    scheduler = LedgerScheduler(searcher, use_pruning, ledger)
    if results_cb is not None:
        results_cb.scheduler = scheduler
    damaged = set_aside_damaged_state(path) if path.is_dir() else None
    if damaged:
        print(damaged, flush=True)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False)
        run_config, tune_config = ray_internals.restored_configs(tuner)
        # the restored configs carry pickled copies of our callbacks and searcher; use the live ones (callbacks in
        # the same order, so Tune applies the saved callback states to them)
        run_config.callbacks = callbacks
        tune_config.search_alg = SweepSearch(searcher)
        tune_config.scheduler = scheduler
        tune_config.max_concurrent_trials = None  # the searcher limits its trials itself
        from ray.tune import CheckpointConfig

        run_config.checkpoint_config = CheckpointConfig()  # no snapshot forced per checkpoint (on_checkpoint prunes)
        return tuner
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    tune_config = TuneConfig(
        search_alg=SweepSearch(searcher),
        scheduler=scheduler,
        num_samples=-1,
        reuse_actors=True,
        trial_dirname_creator=trial_dirname,
    )
    run_config = RunConfig(
        name=EXPERIMENT_NAME,
        storage_path=str(Path(out_dir).resolve()),
        verbose=0,
        callbacks=callbacks,
        failure_config=FailureConfig(max_failures=max_retries),
        checkpoint_config=CheckpointConfig(),
        log_to_file=True,
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
