"""``python -m orchestrator.sweep SPEC.yaml``: the product's main command (plan, run, resume, report).

Flow: load + validate the spec -> plan cells (a cell that cannot be evaluated is refused) ->
(``--dry-run``: print the plan, stop) -> check the output directory (a finished sweep re-prints its
results; a changed spec is refused unless ``--fresh``) -> resources (the local machine, or the cluster
at ``--address``, must fit a trial; a cluster's output must be shared storage) -> the data preflight
(printed dataset by dataset, with its time) -> start the local Ray -> one Tuner with the per-cell
searcher, MLflow tracking, Arrow results and the progress line -> report. Running the same command
again resumes the sweep from ``<output>/<name>/``.

Every user error prints one line ``error: <message>`` on stderr and exits 2, leaving no output
directory behind; once the sweep's MLflow run exists, an early exit ends it FAILED with the reason.
One sweep runs per output directory at a time (a ``flock``). A full disk or an output folder that turns
unwritable mid-sweep is such an error too (rerun to resume). SIGTERM stops the sweep as Ctrl-C does
(Tune saves its state, the MLflow run ends KILLED, Ray is stopped) and the command exits 143 (Ctrl-C: 130).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from fewshot.errors import ConfigError, UserError, error_line
from orchestrator.mlflow_uri import check_tracking_server, check_uri_scheme, mask_uri, resolve_tracking_uri, ui_command

STATE_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
OPTUNA_FILE = "optuna.journal"
RAY_STOP_GRACE_S = 10.0  # how long the driver waits for the Ray processes it started to exit before SIGKILL
SIGTERM_EXIT = 128 + signal.SIGTERM  # the exit code of a sweep stopped by SIGTERM, as a shell reports a killed one
SIGINT_EXIT = 128 + signal.SIGINT  # ... and by Ctrl-C (130)
#: errors writing the output directory the user fixes (full disk or quota, read-only mount, permissions, a size
#: limit): the sweep stops with one line and resumes when rerun
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


DEFAULT_DASHBOARD = "127.0.0.1:8265"


def _dashboard_address(value: str) -> tuple[str, int]:
    """``--dashboard``'s ``[HOST:]PORT`` as (host, port); the host defaults to loopback."""
    host, _, port = value.strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            f"--dashboard: '{value}' is not [HOST:]PORT with a port in 1..65535 (e.g. {DEFAULT_DASHBOARD})"
        )
    return host, int(port)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line user error instead of usage + exit 2 from argparse
        raise ConfigError(f"{message} (see python -m orchestrator.sweep --help)")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = _Parser(prog="python -m orchestrator.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="sweep spec YAML, e.g. search_spaces/demo.yaml")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="discard an earlier run of this sweep and start over (its files, and its MLflow runs: moved to MLflow's deleted runs)",
    )
    ap.add_argument(
        "--retry-failed",
        action="store_true",
        help="run the trials whose status is ERROR again (each "
        "new attempt replaces its failed row); everything else is kept",
    )
    ap.add_argument(
        "--restart-cells",
        metavar="CELLS",
        help="comma-separated cell ids or shell patterns "
        "(fewshot.coop.*) whose finished trials and Optuna study are discarded and run again",
    )
    ap.add_argument("--output", help="results root (default: the spec's output); results go to <output>/<name>/")
    ap.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    ap.add_argument(
        "--data-root",
        help="folder holding the CoOp-layout datasets (default: the spec's data_root, else $PROMPTSWEEP_DATA)",
    )
    ap.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, spec, sqlite:///<cwd>/mlflow.db)"
    )
    ap.add_argument("--max-concurrent", type=int, help="trials running at once (default: what the cluster fits)")
    ap.add_argument(
        "--dashboard",
        nargs="?",
        const=DEFAULT_DASHBOARD,
        metavar="[HOST:]PORT",
        help=f"start the local Ray's dashboard (bare flag: {DEFAULT_DASHBOARD}, this machine only; "
        "0.0.0.0:PORT opens it to the network); a cluster has its own",
    )
    args = ap.parse_args(argv)
    args.dashboard = None if args.dashboard is None else _dashboard_address(args.dashboard)
    if args.dashboard is not None and (args.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError(
            "--dashboard: only for the local Ray; a cluster's dashboard is started with the cluster "
            "(ray start --head --dashboard-host ...)"
        )
    if args.fresh and (args.retry_failed or args.restart_cells):
        raise ConfigError("--fresh starts the whole sweep over: leave out --retry-failed / --restart-cells")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: must be >= 1 (got {args.max_concurrent})")
    for flag in ("output", "address", "tracking_uri", "data_root"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise ConfigError(f"--{flag.replace('_', '-')}: must not be empty (leave the flag out for the default)")
    if args.tracking_uri is not None:
        check_uri_scheme(args.tracking_uri, "--tracking-uri")
    if args.output is not None:
        check_output_root(Path(args.output), "--output")
    if args.data_root is not None and not Path(args.data_root).expanduser().is_dir():
        raise ConfigError(
            f"--data-root: '{args.data_root}' is not a directory (it should hold the datasets' folders, "
            "see docs/data.md)"
        )
    return args


def check_output_root(root: Path, flag: str) -> None:
    """``root`` (``--output`` or the spec's ``output``) must be, or be creatable as, a folder this process can
    write: the nearest existing folder on its path is probed with a temporary file (read-only mounts, /proc,
    a path under a file such as /dev/null). ConfigError naming ``flag`` otherwise; nothing is left behind."""
    import tempfile

    shown = str(root)
    root = root.expanduser().absolute()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == root else f"is under {existing}, which is not a directory"
        raise ConfigError(f"{flag}: '{shown}' {what} (results go to <output>/<name>/): choose a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".promptsweep-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{flag}: '{shown}' cannot be written ({exc.strerror or exc} in {existing}): choose a writable folder"
        ) from None


def _lock_output(out_dir: Path):
    """One sweep per output directory at a time: an exclusive ``flock`` on ``<out_dir>/.sweep.lock``, held until
    the sweep returns (the kernel drops it when a killed driver dies, so a stale file never blocks). The file
    names the holder (pid, host); a second command on the same directory exits with it."""
    import fcntl
    import socket

    fh = open(out_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = " ".join(fh.read().split())[:200] or "another process"
        fh.close()
        raise ConfigError(
            f"sweep output {out_dir} is in use by a running sweep ({holder}): wait for it to end or "
            "stop it, then rerun to resume"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    fh.flush()
    return fh


def _read_state(out_dir: Path) -> Optional[dict]:
    p = out_dir / STATE_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise ConfigError(f"{p} is corrupt; rerun with --fresh to start the sweep over") from None


def _discarded_state(out_dir: Path) -> Optional[dict]:
    """The state of the run ``--fresh`` discards, or None where it has none (or it is unreadable)."""
    try:
        return _read_state(out_dir)
    except ConfigError:
        return None


def _write_state(out_dir: Path, state: dict) -> None:
    from fewshot.paths import write_text_atomic

    write_text_atomic(out_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))


def _preflight(spec, plan, data_root: Optional[str]) -> None:
    """Fail before any trial starts: every dataset must be readable with sound labels, no empty split and
    image counts as published (within ``spec.count_tolerance``); every image of the few-shot train/val
    splits the plan draws (dataset x shots x seed) must exist and decode, and every test image exist; a
    method tied to its training classes must find each target's class names among the source's."""
    from fewshot.paths import check_cache_writable
    from fewshot.registry import load_dataset
    from fewshot.validate import check_sweep_data
    from methods.pretrain import PROJECT_TAG, checkpoint_path, model_dir

    t0 = time.perf_counter()
    # the caches every trial writes (splits, features; the model cache when the project backbone is still to
    # be built: one already there is only read, so a read-only model cache is fine then)
    builds = any(b.pretrained == PROJECT_TAG and not checkpoint_path(b.arch).is_file() for b in spec.all_backbones())
    check_cache_writable([(model_dir(), "PROMPTSWEEP_MODEL_CACHE")] if builds else [])
    needs: dict[str, set] = {}
    for c in plan.cells:
        needs.setdefault(c.dataset, set()).update((c.shots, s) for s in (*c.search_seeds, *c.final_seeds))
    targets = [t for t in spec.all_targets() if t not in needs]
    print(f"checking data: {len(needs)} dataset(s)" + (f" and {len(targets)} target(s)" if targets else ""), flush=True)
    check_sweep_data(
        needs,
        data_root,
        targets=spec.all_targets(),
        tolerance=spec.count_tolerance,
        progress=lambda line: print(line, flush=True),
    )  # DataError naming the bad file
    for c in plan.cells:
        if c.targets and c.tied_to_training_classes():
            source = set(load_dataset(c.dataset, data_root).classnames)  # read above: kept by this process
            for t in c.targets:
                unseen = [n for n in load_dataset(t, data_root).classnames if n not in source]
                if unseen:
                    raise ConfigError(
                        f"cell {c.cell_id}: target {t} has {len(unseen)} class name(s) that are not "
                        f"{c.dataset} class names (e.g. '{unseen[0]}'), so method {c.method}'s head "
                        f"cannot score them: use the classnames.txt of {c.dataset} for {t} (see "
                        "docs/data.md)"
                    )
    print(f"data ok ({time.perf_counter() - t0:.1f} s)", flush=True)


def _check_resources(spec, args, out_dir: Path) -> None:
    """Before the data preflight: the machine (local Ray, not started yet) or the cluster at ``--address`` /
    $RAY_ADDRESS (connected now; ``_run_sweep`` keeps the connection) must fit one trial, and a multi-node
    cluster's output must be shared storage."""
    from orchestrator.cluster_checks import check_cluster_storage
    from orchestrator.tune_runner import check_trial_fits, ensure_ray, local_node_resources, max_concurrent_trials

    r = spec.resources
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        from orchestrator.cluster_checks import check_ray_address

        check_ray_address(address, "--address" if args.address else "$RAY_ADDRESS")
    if not address:
        _check_local_cuda(spec)
        check_trial_fits(r.cpu, r.gpu, [local_node_resources()], "nothing on this machine (the local Ray)")
        return
    with _sigterm_held():
        ensure_ray(args.address, job_metadata=ray_job_metadata(spec.name, out_dir))
    max_concurrent_trials(r.cpu, r.gpu, args.max_concurrent)
    check_cluster_storage(out_dir)


def ray_job_metadata(sweep_name: str, out_dir: Path) -> dict[str, str]:
    """The Ray job's metadata: which sweep the driver runs and where it writes."""
    return {"promptsweep.sweep": sweep_name, "promptsweep.output": str(out_dir)}


def _check_local_cuda(spec) -> None:
    """``device: cuda`` on a local run needs CUDA here (the spec already asks each trial for a GPU)."""
    import torch

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: cuda, but CUDA is not available on this machine (the local Ray): use device: "
            "auto or cpu (and resources.gpu: 0), or connect to a cluster with GPUs with --address"
        )


def results_table(out_dir: Path) -> str:
    from orchestrator.results import CELLS_FILE, read_table

    p = out_dir / CELLS_FILE
    if not p.exists():
        return "(no finished trials yet)"
    cells = read_table(p).to_pylist()
    lines = [f"{'cell':<44} {'n':>2}  {'metric':<10} {'mean ± std':>16}  {'best search val':>15}"]
    for c in cells:
        metric = next((m for m in ("hm", "target_avg", "test_acc") if c.get(f"{m}_mean") is not None), "test_acc")
        mean, std = c.get(f"{metric}_mean"), c.get(f"{metric}_std")
        val = "—" if mean is None else f"{mean:.2f} ± {std or 0:.2f}"
        best = c.get("search_best_val")
        lines.append(
            f"{c['cell_id']:<44} {c['n']:>2}  {metric:<10} {val:>16}  {'—' if best is None else f'{best:.2f}':>15}"
        )
    return "\n".join(lines)


def _print_outputs(out_dir: Path, tracking_uri: str) -> None:
    print(results_table(out_dir))
    print(
        f"\nresults:  {out_dir / 'trials.arrow'}\n          {out_dir / 'cells.arrow'}  (and .parquet twins)"
        f"\n          {out_dir / 'report.md'}"
    )
    if (out_dir / OPTUNA_FILE).exists():
        print(f"optuna:   optuna-dashboard {out_dir / OPTUNA_FILE}")
    print(f"mlflow:   {ui_command(tracking_uri)}")


def run(args: argparse.Namespace) -> int:
    from orchestrator.planner import plan as make_plan
    from orchestrator.spec import load_spec

    spec = load_spec(args.spec)
    if args.output is None:
        check_output_root(Path(spec.output), "output")
    out_root = Path(args.output or spec.output).expanduser().resolve()
    out_dir = out_root / spec.name
    tracking_uri = resolve_tracking_uri(args.tracking_uri, spec.tracking.uri)
    plan = make_plan(spec)
    data_root = args.data_root or spec.data_root
    data_root = str(Path(data_root).expanduser().resolve()) if data_root else None  # before Ray moves cwd

    from orchestrator.space_check import check_plan

    checked = check_plan(plan)  # every proposal a search space can make, through its method (ConfigError)
    if args.dry_run:
        print(plan.describe())
        if checked:
            print(f"search:   {checked} proposals (every choice combination and range end) accepted by their methods")
        print(f"output:   {out_dir}\nmlflow:   {mask_uri(tracking_uri)} (experiment '{spec.tracking.experiment}')")
        return 0

    if args.fresh and out_dir.exists() and not (out_dir / STATE_FILE).is_file():
        raise ConfigError(
            f"--fresh: {out_dir} was not made by a sweep (it has no {STATE_FILE}), so it is not deleted; "
            "move it, or choose another --output or spec name"
        )
    # a sweep's folder is locked before its state is read: a second command neither reads a state the running
    # sweep is writing nor ends that sweep's MLflow run when one of its own checks fails (any other folder is
    # locked once every check has passed, so that a refused command leaves no lock file in it)
    lock = _lock_output(out_dir) if (out_dir / STATE_FILE).is_file() else None
    try:
        return _checked_run(spec, plan, args, out_dir, tracking_uri, data_root, lock)
    finally:
        if lock is not None:
            lock.close()  # releases the flock


def _checked_run(spec, plan, args, out_dir: Path, tracking_uri: str, data_root: Optional[str], lock) -> int:
    """``run`` once a sweep's ``out_dir`` is locked (``lock``; None where it has no state yet): the resume and
    spec-change checks, resources, data, tracking server; then the folder is made (and locked), ``--fresh``
    clears the earlier run, and the sweep runs."""
    from orchestrator.mlflow_backlog import replay_backlog
    from orchestrator.spec import PRESENTATION_KEYS

    state = None if args.fresh else _read_state(out_dir)
    discarded = _discarded_state(out_dir) if args.fresh else None
    continuation = {"restart": [], "retry": 0}
    if state is None and (args.retry_failed or args.restart_cells):
        raise ConfigError(
            f"--retry-failed / --restart-cells: sweep '{spec.name}' has not run in {out_dir} yet "
            "(run it without the flag first)"
        )
    if state is not None:
        new = spec.normalized()
        continuation = _continuation(spec, plan, args, out_dir, state)
        read_before = {k: state.get("spec", {}).get(k) for k in PRESENTATION_KEYS}
        state.setdefault("spec", {}).update({k: new[k] for k in PRESENTATION_KEYS})  # a resumed sweep reads by the new
        if state.get("status") == "finished" and not continuation["work"]:
            print(f"sweep '{spec.name}' already finished: {out_dir}")
            if read_before != {k: new[k] for k in PRESENTATION_KEYS} and _reread_results(out_dir, spec, state):
                _refresh_recorded_artifacts(state, tracking_uri, spec, out_dir)
            replay_backlog(out_dir)  # MLflow operations a server outage left behind, if any
            _print_outputs(out_dir, state.get("tracking_uri", tracking_uri))
            return 0
        tracking_uri = state.get("tracking_uri", tracking_uri) if not args.tracking_uri else tracking_uri

    try:
        _check_resources(spec, args, out_dir)
        _preflight(spec, plan, data_root)
    except UserError as e:
        _end_recorded_parent(state, tracking_uri, spec, out_dir, e)
        raise
    check_tracking_server(tracking_uri)  # an unreachable MLflow server fails here, before Ray starts
    try:  # fail here, not in every worker, if the trial module is broken
        import orchestrator.trial  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"orchestrator.trial cannot be imported ({e}); reinstall the project (make setup)") from None

    created = out_dir  # the outermost directory this run creates (removed again on a user error)
    while not created.parent.exists():
        created = created.parent
    created = None if out_dir.exists() else created
    out_dir.mkdir(parents=True, exist_ok=True)
    if lock is None:  # when refused, the folder is the holder's (a sweep started at the same moment): left to it
        lock = _lock_output(out_dir)
    if args.fresh:  # every check has passed: now the earlier run's files go (the held lock file stays)
        for p in out_dir.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if discarded:  # its MLflow runs go too (soft-deleted: restorable)
            from orchestrator.mlflow_fresh import retire_runs

            retire_runs(discarded.get("tracking_uri") or tracking_uri, discarded.get("parent_run_id"))
    try:
        return _run_sweep(spec, plan, out_dir, tracking_uri, state, args, data_root, continuation)
    except (UserError, KeyboardInterrupt):  # stopped before Tune wrote anything: the folder goes again
        if created is not None and not (out_dir / "tune").exists():
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        lock.close()  # releases the flock (closing it twice is harmless)


@contextmanager
def _driver_gc():
    """While Tune runs: the driver keeps every trial's objects alive for the whole sweep (Tune's trials,
    results, our ledger), so Python's cyclic collector rescans a growing heap ever more often (on a
    300-trial sweep of short trials ~25% of the driver's time by the end). Start-up objects are frozen
    out of collection and collections run less often; the previous settings come back afterwards."""
    import gc

    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _adopt_orphans() -> None:
    """Make this driver the Linux "child subreaper" of what it starts: a Ray process whose parent exits first
    (a worker the raylet started, once the raylet is gone) is then re-parented to the driver, not to PID 1,
    so ``_shutdown_ray`` still finds it among the driver's descendants. No-op where prctl is unavailable."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap_adopted(me, own: set[int]) -> None:
    """Collect the exit status of adopted orphans that have exited (they become our zombies); the driver's
    own children (``own``: their ``Popen`` objects wait for them) are left to their owners."""
    import psutil

    for p in _descendants(me):
        try:
            if p.pid not in own and p.ppid() == me.pid and p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def _shutdown_ray(started: bool) -> None:
    """Stop the local Ray this driver started and wait until its processes are gone, so that when the
    sweep command returns nothing of it still runs (a next sweep finds no half-dead raylet, a test or a
    job scheduler sees no stray processes). ``ray.shutdown()`` alone only signals them: the GCS and raylet
    can take seconds to exit on a loaded machine, and worker processes exit when they notice their
    raylet is gone. The driver is their subreaper (``_adopt_orphans``), so its descendants are looked up
    again while it waits (a worker started during the shutdown, or orphaned by it, is among them); those
    still there after ``RAY_STOP_GRACE_S`` are SIGKILLed."""
    if not started:
        return
    import psutil
    import ray

    me = psutil.Process()
    ours = me.children(recursive=True)  # Ray's processes and their workers
    own = {p.pid for p in me.children()}
    ray.shutdown(wait_for_processes=True)
    deadline = time.monotonic() + RAY_STOP_GRACE_S
    while True:
        _reap_adopted(me, own)
        ours = _wait_exited(list({p.pid: p for p in [*ours, *_descendants(me)]}.values()), 0.2)
        if not ours or time.monotonic() > deadline:
            break
    for p in ours:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_exited(ours, RAY_STOP_GRACE_S)
    _reap_adopted(me, own)


def _descendants(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _wait_exited(procs: list, timeout: float) -> list:
    """Wait until none of ``procs`` (psutil.Process) runs; a zombie counts as exited (where the container's
    PID 1 reaps nothing, a reparented worker stays one). Returns those still running at ``timeout``."""
    import psutil

    def running(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if running(p)]
    return alive


def _keep_tracking(tracker, error: BaseException) -> None:
    """A sweep that fails: its MLflow run is ended (FAILED, or KILLED on Ctrl-C) with the reason; what MLflow
    has not taken yet is sent if the server takes it within the usual catch-up budget, the rest is written to
    the backlog that the next run of the command sends."""
    try:
        tracker.fail(_failure_reason(error))
    except Exception as e:  # noqa: BLE001 - never hide the error that ends the sweep
        print(f"warning: keeping the MLflow queue failed: {type(e).__name__}: {e}", file=sys.stderr)


def _continuation(spec, plan, args, out_dir: Path, state: dict) -> dict:
    """How a rerun continues the sweep recorded in ``state``: refused (a ``ConfigError`` naming each cell and key)
    when the spec changes what a finished trial means (``orchestrator.growth``); otherwise what it adds —
    ``{"restart": cells to run anew, "retry": failed rows to run again, "work": whether anything is left}``."""
    from orchestrator import growth
    from orchestrator.ledger import read_ledger_rows
    from orchestrator.results import ERROR_STATUS

    rows = read_ledger_rows(out_dir)
    restart = growth.matching_cells(args.restart_cells, [c.cell_id for c in plan.cells]) if args.restart_cells else []
    kept = [r for r in rows if r["cell_id"] not in restart]
    changes = growth.compare(state.get("spec", {}), spec, kept)
    if changes.refused:
        raise growth.refusal(changes, spec.name, out_dir)
    retry = sum(1 for r in kept if r["status"] == ERROR_STATUS) if args.retry_failed else 0
    if args.retry_failed and not retry:
        print(f"--retry-failed: sweep '{spec.name}' has no failed trial", flush=True)
    if changes.grows:
        print(
            f"growing sweep '{spec.name}': {len(changes.new_cells)} new cell(s), {len(changes.grown_cells)} cell(s) "
            "with more seeds or proposals; finished trials are kept",
            flush=True,
        )
    if restart:
        print(
            f"restarting {len(restart)} cell(s): {', '.join(restart)} ({len(rows) - len(kept)} finished trial(s) "
            "discarded)",
            flush=True,
        )
    if retry:
        print(f"retrying {retry} failed trial(s)", flush=True)
    return {"restart": restart, "retry": retry, "work": bool(changes.grows or restart or retry)}


def _reread_results(out_dir: Path, spec, state: dict) -> bool:
    """A finished sweep rerun with other ``report`` settings: its statistics tables and report are rewritten
    from trials.arrow (no trial runs); False where there was nothing to reread."""
    from orchestrator.report import write_report
    from orchestrator.results import CELLS_FILE, TRIALS_FILE, rewrite_summaries

    if not ((out_dir / TRIALS_FILE).is_file() and (out_dir / CELLS_FILE).is_file()):
        print(
            f"warning: report settings changed, but {out_dir} has no {TRIALS_FILE} / {CELLS_FILE} to reread",
            file=sys.stderr,
        )
        return False
    rewrite_summaries(out_dir, spec.normalized()["report"])
    write_report(out_dir)
    _write_state(out_dir, state)
    print(f"report settings changed: comparisons and {out_dir / 'report.md'} rewritten")
    return True


def _recorded_tracker(state: Optional[dict], tracking_uri: str, spec, out_dir: Path):
    """The MLflow tracker of an earlier driver's sweep run (recorded in ``state``), or None where it has none."""
    if not state or not state.get("parent_run_id"):
        return None
    from orchestrator.tracking import MlflowTracking

    return MlflowTracking(
        state.get("tracking_uri", tracking_uri),
        spec.tracking.experiment,
        spec.name,
        state.get("spec_hash", ""),
        parent_run_id=state["parent_run_id"],
        out_dir=out_dir,
    )


def _refresh_recorded_artifacts(state: dict, tracking_uri: str, spec, out_dir: Path) -> None:
    """The reread sweep's MLflow run gets the rewritten report, plots and tables (``MlflowTracking.refresh_artifacts``)."""
    tracker = _recorded_tracker(state, tracking_uri, spec, out_dir)
    if tracker is not None:
        tracker.refresh_artifacts(_sweep_artifacts(out_dir), spec.normalized())


def _end_recorded_parent(state: Optional[dict], tracking_uri: str, spec, out_dir: Path, error: BaseException) -> None:
    """A resumed sweep that stops before its Tuner runs: its recorded MLflow run is ended FAILED with the reason."""
    tracker = _recorded_tracker(state, tracking_uri, spec, out_dir)
    if tracker is not None:
        tracker.fail(_failure_reason(error))


def _failure_reason(error: BaseException) -> tuple[str, str]:
    """(MLflow status, one-line reason) for an exception that ends a sweep early."""
    if isinstance(error, KeyboardInterrupt):
        return "KILLED", "interrupted: rerun the same command to resume"
    return "FAILED", " ".join(f"{type(error).__name__}: {error}".split())[:2000]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a preemption, ``kill``) outside Tune's run: it unwinds the sweep as Ctrl-C does (MLflow run
    KILLED, Ray stopped); the command then exits ``SIGTERM_EXIT``."""


_sigterm_seen = threading.Event()  # set by ``_on_sigterm``; ``main`` clears it


def _on_sigterm(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does: the first one, while Tune runs, is passed to Tune's SIGINT handler (Tune
    saves its state and ``fit`` returns); elsewhere, or a second time, ``Terminated`` is raised."""
    first = not _sigterm_seen.is_set()
    _sigterm_seen.set()
    on_sigint = signal.getsignal(signal.SIGINT)
    if first and callable(on_sigint) and on_sigint is not signal.default_int_handler:
        on_sigint(signal.SIGINT, frame)
        return
    raise Terminated()


@contextmanager
def _sigterm_held():
    """Around ``ray.init``: it replaces the SIGTERM handler with its own (``sys.exit``) and with Ray's native
    failure handler, which prints a native stack dump and aborts the process (exit -6). SIGTERM is blocked in
    this thread (and the threads it starts) meanwhile, the handler from before is put back, and a SIGTERM that
    came in between is then delivered to it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _sweep_artifacts(out_dir: Path) -> tuple[tuple[Path, Optional[str]], ...]:
    """What the sweep's MLflow run keeps: the report, its plots (PNG, PDF) and LaTeX tables, and the result
    tables (Parquet)."""
    from orchestrator.results import PARQUET_SUFFIX, RESULT_FILES

    files = [
        (out_dir / "report.md", None),
        *((p, "plots") for p in sorted([*out_dir.glob("*.png"), *out_dir.glob("*.pdf")])),
    ]
    files += [(p, "tables") for p in sorted((out_dir / "tables").glob("*.tex"))]
    files += [((out_dir / f).with_suffix(PARQUET_SUFFIX), "results") for f in RESULT_FILES]
    return tuple((p, d) for p, d in files if p.is_file())


def _cell_summaries(out_dir: Path, plan) -> dict[str, dict]:
    """Each cell's figures for its MLflow run, from the cells.arrow just written (``tracking.cell_summary``)."""
    from orchestrator.results import CELLS_FILE, read_table
    from orchestrator.tracking import cell_summary

    planned = {c.cell_id: c.n_final_runs for c in plan.cells}
    return {
        r["cell_id"]: cell_summary(r, planned.get(r["cell_id"], 0))
        for r in read_table(out_dir / CELLS_FILE).to_pylist()
    }


def _tune_was_interrupted(before) -> bool:
    """Whether Tune's run just returned because of a SIGINT (Ctrl-C, or the SIGTERM ``_on_sigterm`` passed on).
    ``tune.run`` installs its own SIGINT handler in the main thread and puts ``before`` back only when that
    signal arrives, so after ``fit``: ``before`` back means interrupted; Tune's handler still there means not
    (and it is replaced by ``before`` here, so that a Ctrl-C during the final writes is not swallowed)."""
    now = signal.getsignal(signal.SIGINT)
    if now is not before:
        signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)
        return False
    tune_catches = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0").strip() in ("", "0")
    return tune_catches and threading.current_thread() is threading.main_thread()


def _disk_error(error: BaseException, out_dir: Path) -> Optional[UserError]:
    """The user error for an OSError writing the sweep's files that the user fixes (``DISK_ERRNOS``: a full
    disk, a read-only or unwritable output folder), found in ``error`` or its causes (Tune wraps a
    callback's error); None for any other error."""
    seen: set[int] = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            where = e.filename if e.filename else f"the sweep output {out_dir}"
            return UserError(
                f"cannot write {where}: {e.strerror or e}; free space / fix permissions and rerun the "
                "same command to resume"
            )
        e = e.__cause__ or e.__context__
    return None


def _run_sweep(
    spec,
    plan,
    out_dir: Path,
    tracking_uri: str,
    state: Optional[dict],
    args,
    data_root: Optional[str],
    continuation: Optional[dict] = None,
) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.progress import ProgressPrinter
    from orchestrator.report import write_report
    from orchestrator.results import ERROR_STATUS, package_versions
    from orchestrator.searcher import CellSearcher, record_mlflow_runs
    from orchestrator.tracking import MlflowTracking
    from orchestrator.tune_runner import (
        ResultsCallback,
        build_tuner,
        ensure_ray,
        max_concurrent_trials,
        quiet_tune_logs,
    )

    t_driver = time.monotonic()
    r = spec.resources
    spec_hash = spec.spec_hash()
    with _sigterm_held():  # from before the threads that ray.init may outlive are started
        tracker = MlflowTracking(
            tracking_uri,
            spec.tracking.experiment,
            spec.name,
            spec_hash,
            background=True,
            parent_run_id=(state or {}).get("parent_run_id"),
            out_dir=out_dir,
        )
        journal = str(out_dir / OPTUNA_FILE)
        tracker.on_cell_run = lambda cell_id, run_id: record_mlflow_runs(journal, {cell_id: run_id})
        restart = list((continuation or {}).get("restart") or [])
        tracker.restarted_cells = set(restart)
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            _adopt_orphans()  # before the local Ray starts: its processes stay the driver's descendants
        with ThreadPoolExecutor(1) as pool:  # the tracking store's start-up (SQLite migrations: seconds) overlaps Ray's
            parent_future = pool.submit(tracker.ensure_parent)
            started_ray = ensure_ray(
                args.address,
                dashboard=getattr(args, "dashboard", None),
                job_metadata=ray_job_metadata(spec.name, out_dir),
            )
    progress = None
    try:
        parent = parent_future.result()
        n = max_concurrent_trials(r.cpu, r.gpu, args.max_concurrent)  # ConfigError if no node fits a trial
        quiet_tune_logs()
        state = state or {"created": datetime.now(timezone.utc).isoformat()}
        state.update(
            spec=spec.normalized(),
            spec_hash=spec_hash,
            status="running",
            tracking_uri=tracking_uri,
            parent_run_id=parent,
            n_trials=plan.n_trials,
        )
        _write_state(out_dir, state)

        meta = {
            "spec_hash": spec_hash,
            "sweep": spec.name,
            "git_commit": tracker.commit,
            "targets": spec.all_targets(),
            "package_versions": package_versions(),
            "report": spec.normalized()["report"],
            "planned_final_runs": {c.cell_id: c.n_final_runs for c in plan.cells},
        }
        if restart:
            from orchestrator.growth import delete_studies

            delete_studies(journal, restart)
        results_cb = ResultsCallback(out_dir, meta, [c.cell_id for c in plan.cells], tracker, drop_cells=set(restart))
        progress = ProgressPrinter(plan, results_cb, already=len(results_cb.rows))
        if results_cb.rows:
            print(f"resuming: {len(results_cb.rows)} of {plan.n_trials} trials already recorded", flush=True)
        request_base = {
            "backbone": {"arch": spec.backbone.arch, "pretrained": spec.backbone.pretrained},
            "data_root": data_root,
            "device": spec.device,
        }
        searcher = CellSearcher(plan.cells, request_base, journal, max_concurrent=n)
        use_pruning = any(c.search.pruner.name != "none" and c.n_trials for c in plan.cells)

        print(plan.describe().splitlines()[0] + f"; {n} at a time", flush=True)
        tuner = build_tuner(
            out_dir,
            searcher,
            [tracker, results_cb, progress],
            r.cpu,
            r.gpu,
            spec.max_retries,
            use_pruning,
            sweep_name=spec.name,
            retry_failed=args.retry_failed,
            max_concurrent=n,
        )
        sigint_before = signal.getsignal(signal.SIGINT)
        with _driver_gc():
            tuner.fit()
        interrupted = _tune_was_interrupted(sigint_before)
        progress.close()
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # from here a SIGTERM only marks the sweep stopped
            signal.signal(signal.SIGTERM, lambda signum, frame: _sigterm_seen.set())
    except BaseException as e:
        if progress is not None:
            progress.close()
        error = _disk_error(e, out_dir) or e
        _keep_tracking(tracker, error)
        _shutdown_ray(started_ray)
        if error is e:
            raise
        raise error from None
    # Ray's shutdown (stopping its processes: ~1.4 s) overlaps the final writes, which need no Ray
    stopping = threading.Thread(target=_shutdown_ray, args=(started_ray,), name="ray-shutdown")
    stopping.start()
    try:
        results_cb.flush()
        failed = sum(1 for row in results_cb.rows.values() if row["status"] == ERROR_STATUS)
        lost_targets = sum(1 for row in results_cb.rows.values() if row.get("error_class") == "target_failed")
        complete = len(results_cb.rows) >= plan.n_trials
        terminated = _sigterm_seen.is_set() and not complete
        interrupted = interrupted and not terminated and not complete
        write_report(out_dir)
        if terminated or interrupted:  # Tune stopped on SIGTERM / Ctrl-C: the run is KILLED, reopened by the rerun
            tracker.fail(_failure_reason(Terminated() if terminated else KeyboardInterrupt()))
        else:
            tracker.finish(
                "FINISHED" if complete and not failed else "FAILED",
                cells=_cell_summaries(out_dir, plan),
                metrics={
                    "trials_planned": plan.n_trials,
                    "trials_finished": len(results_cb.rows),
                    "trials_failed": failed,
                    "driver_wall_time_s": time.monotonic() - t_driver,
                },
                spec=spec.normalized(),
                artifacts=_sweep_artifacts(out_dir),
            )
        state.update(status="finished" if complete else "incomplete", finished=datetime.now(timezone.utc).isoformat())
        _write_state(out_dir, state)
    except OSError as e:
        error = _disk_error(e, out_dir)
        if error is None:
            raise
        _keep_tracking(tracker, error)
        raise error from None
    finally:
        stopping.join()
    print()
    _print_outputs(out_dir, tracking_uri)
    if terminated:
        print(
            f"\nsweep stopped by SIGTERM ({len(results_cb.rows)}/{plan.n_trials} trials finished); rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return SIGTERM_EXIT
    if interrupted:
        print(
            f"\nsweep interrupted ({len(results_cb.rows)}/{plan.n_trials} trials finished); rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return SIGINT_EXIT
    if failed:
        print(
            f"\n{failed} trial(s) failed: see the status/error_class/error_message columns of trials.arrow",
            file=sys.stderr,
        )
    if lost_targets:
        print(
            f"\n{lost_targets} trial(s) could not score every target (error class target_failed; their other "
            "targets are kept): see error_message in trials.arrow and the end of report.md",
            file=sys.stderr,
        )
    if not complete:
        print(
            f"\nsweep incomplete ({len(results_cb.rows)}/{plan.n_trials} trials); rerun the same command to resume",
            file=sys.stderr,
        )
    return 1 if failed or lost_targets or not complete else 0


def main(argv: Optional[list[str]] = None) -> int:
    # MLflow 3's client sends usage telemetry to the internet and, where none is reachable (clusters,
    # this CI), spends ~2.6 s retrying at exit; a sweep driver does not, unless the user says so
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _sigterm_seen.clear()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except Terminated:
        print("sweep stopped by SIGTERM; rerun the same command to resume", file=sys.stderr)
        return SIGTERM_EXIT
    except KeyboardInterrupt:  # Ctrl-C outside Tune's run (the checks, Ray's start): nothing half-done is kept
        print("\nsweep interrupted; rerun the same command to resume", file=sys.stderr)
        return SIGINT_EXIT
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def exit_without_teardown(code: int) -> None:
    """End the process once everything is written: join the threads, run the ``atexit`` handlers
    (Ray's, MLflow's, logging's), flush, then ``os._exit``. It skips only the interpreter's module
    teardown, which takes ~3 s with torch, Ray, MLflow and matplotlib loaded (as mypy's CLI does)."""
    import atexit

    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
