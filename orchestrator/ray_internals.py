"""Every use of a private Ray / Ray Tune name in the project, in one place, checked once at start-up.

Ray's public API does not cover four things the sweep needs:

* starting a single-node Ray whose every listener binds loopback (``ray._private.ray_constants``);
* finding the GCS of a cluster ``ray start`` runs on this machine, for ``--address auto``
  (``ray._private.services``);
* on ``Tuner.restore``, replacing the restored run's callbacks, scheduler and search algorithm with the live
  ones of this driver (``Tuner._local_tuner``);
* having Tune save its experiment snapshot at the end of the current step (the experiment-state manager's
  force flag, which Tune itself sets after ``num_to_keep`` checkpoints), and registering an existing
  checkpoint as a restored trial's latest (``ray.train._internal.session._TrainingResult``, the trial's
  storage index and directory, ``ray.train._internal.storage.StorageContext``).

``check()`` verifies, once per driver, that each name exists and has the shape used here; when one does not,
the sweep stops with one line naming the installed Ray and ``TESTED_RAY`` (the version CI runs, and the range
``pyproject.toml`` declares) — it never degrades silently. Nothing else in the project imports a private Ray
name: ``tests/test_ray_internals.py`` greps the tree for it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

from fewshot.errors import ConfigError

#: the Ray release these internals were read in and CI runs (pyproject.toml: ray>=2.60,<2.61)
TESTED_RAY = "2.60"

_checked = False


def _problems() -> list[str]:
    """What is missing from the installed Ray (empty when everything used here is there)."""
    import inspect

    out: list[str] = []
    try:
        from ray._private import ray_constants, services

        if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
            out.append("ray._private.ray_constants.ENABLE_RAY_CLUSTER")
        for name in ("find_bootstrap_address", "find_gcs_addresses"):
            if not callable(getattr(services, name, None)):
                out.append(f"ray._private.services.{name}")
    except ImportError as exc:
        out.append(f"ray._private ({exc})")
    try:
        from ray.train._internal.session import _TrainingResult

        params = inspect.signature(_TrainingResult).parameters
        if not {"checkpoint", "metrics"} <= set(params):
            out.append("_TrainingResult(checkpoint=, metrics=)")
    except (ImportError, TypeError, ValueError) as exc:
        out.append(f"ray.train._internal.session._TrainingResult ({exc})")
    try:
        from ray.train._internal.storage import StorageContext

        src = inspect.getsource(StorageContext)
        for name in ("storage_filesystem", "trial_fs_path", "trial_dir_name", "current_checkpoint_index"):
            if name not in src:
                out.append(f"StorageContext.{name}")
    except (ImportError, OSError, TypeError) as exc:
        out.append(f"ray.train._internal.storage.StorageContext ({exc})")
    try:
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
        from ray.tune.execution.tune_controller import TuneController
        from ray.tune.impl.tuner_internal import TunerInternal

        if "_should_force_sync_up" not in inspect.getsource(_ExperimentCheckpointManager.__init__):
            out.append("_ExperimentCheckpointManager._should_force_sync_up")
        if "_checkpoint_manager" not in inspect.getsource(TuneController.__init__):
            out.append("TuneController._checkpoint_manager")
        if not callable(getattr(TuneController, "get_live_trials", None)):
            out.append("TuneController.get_live_trials")
        for name in ("get_run_config",):
            if not callable(getattr(TunerInternal, name, None)):
                out.append(f"TunerInternal.{name}")
        if "_tune_config" not in inspect.getsource(TunerInternal.__init__):
            out.append("TunerInternal._tune_config")
    except (ImportError, OSError, TypeError) as exc:
        out.append(f"ray.tune internals ({exc})")
    return out


def check() -> None:
    """One ``ConfigError`` line when the installed Ray lacks what this module uses (checked once per process)."""
    global _checked
    if _checked:
        return
    import ray

    missing = _problems()
    if missing:
        raise ConfigError(
            f"ray {ray.__version__} is installed, but promptsweep was tested with ray {TESTED_RAY} and "
            f"uses internals this one lacks ({', '.join(missing)}); install ray {TESTED_RAY}.x "
            "(pip install -e . picks it)"
        )
    _checked = True


# --- local Ray on loopback ------------------------------------------------------------------------


@contextlib.contextmanager
def cluster_mode_off():
    """While starting the local Ray, keep its node on 127.0.0.1: ``ray.init`` rewrites 127.0.0.1 to this
    machine's outside address unless cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; a worker
    node's ``ray start`` refuses it, so it is for single-node Ray only). Ray reads the variable when it is
    imported, so the constant it was read into is set too; both are restored afterwards (a later connection
    to a cluster from this process resolves its address as usual)."""
    from ray._private import ray_constants

    old_env, old_const = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old_env


def local_cluster_address() -> Optional[str]:
    """The GCS address of the cluster ``ray start`` last started on this machine, else of any GCS running here."""
    from ray._private import services

    return services.find_bootstrap_address(None) or next(iter(services.find_gcs_addresses()), None)


# --- Tune -----------------------------------------------------------------------------------------


def restored_configs(tuner) -> tuple[Any, Any]:
    """``(run_config, tune_config)`` of a ``Tuner.restore``-d tuner, to put this driver's live objects in."""
    internal = tuner._local_tuner
    return internal.get_run_config(), internal._tune_config


def snapshot_at_step_end(tune_controller) -> None:
    """Have Tune save its experiment snapshot at the end of this step (as it does itself after ``num_to_keep``
    checkpoints of a trial)."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller._checkpoint_manager._should_force_sync_up = True


def drop_live_trial(tune_controller, trial) -> None:
    """Remove a restored trial that this driver marks finished from Tune's set of live trials."""
    tune_controller.get_live_trials().discard(trial)


def register_checkpoint(trial, checkpoint, metrics: dict, index: int) -> None:
    """Make ``checkpoint`` (index ``index`` on storage) the restored ``trial``'s latest."""
    from ray.train._internal.session import _TrainingResult

    trial.on_checkpoint(_TrainingResult(checkpoint=checkpoint, metrics=metrics))
    trial.storage.current_checkpoint_index = index  # the index of its latest checkpoint (the next is index + 1)


def trial_storage(trial) -> Optional[tuple[Any, str]]:
    """``(pyarrow filesystem, path)`` of a trial's directory on the experiment's storage (None for a trial that
    has no directory yet: a new one)."""
    if getattr(trial.storage, "trial_dir_name", None) is None:
        return None
    return trial.storage.storage_filesystem, trial.storage.trial_fs_path
