"""Per-trial overhead: the same N short trials run three ways in one run, as ratios.

The trials: ``--method`` (default CoOp, 1 epoch) on ``digits`` at ``--shots`` 1, seeds 1..N, on the
tiny random-init backbone. The ways:

1. ``process_loop`` — the reference repositories' way: one ``python -m orchestrator.trial`` process
   per trial, in a shell-style loop (imports, weights and data loaded every time; no feature cache,
   as the references recompute every feature);
2. ``tune_default`` — a plain Ray Tune ``Tuner`` over the seeds with default settings (a fresh actor
   per trial, ``reuse_actors=False``), the same trial function, no feature cache;
3. ``promptsweep`` — ``python -m orchestrator.sweep`` on a generated spec: warm workers (one backbone
   load per worker), the frozen-feature cache, the MLflow and Arrow bookkeeping included;
   ``promptsweep_nocache`` is the same with ``feature_cache: false`` (isolates the cache's share).

All ways run ``--concurrency`` trials at a time (default 1, so the comparison is overhead, not
parallelism). The compute floor is the same N trials run back to back inside this process after a
warm-up (backbone already loaded), with and without the feature cache. Per-trial overhead of a way
= (its wall time - the floor with its cache setting) / N; for promptsweep the sweep's fixed start-up
(Ray start, MLflow store creation: time to the first trial start) is reported separately and the
per-trial figure is taken over the span from the first trial's start to the last one's end.
``gap_first_fifth_ms`` / ``gap_last_fifth_ms``: the mean time from one trial's end to the next one's
start (the driver's and Tune's per-trial work) over the first and the last fifth of the trials — how
that work grows with the sweep's size (``--n 300 --method zeroshot --skip ...`` shows it best).
``backbone_loads`` gives how many times each worker process loaded weights (from the trials' own
reports): once per worker for promptsweep, once per trial elsewhere.

Usage: ``python benchmarks/overhead.py [--n 20] [--method coop] [--concurrency 1]``. The last
stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._common import bench_env, run_sweep, trial_finals, write_spec  # noqa: E402


def _request(method: str, shots: int, seed: int, cache: bool, epochs: int) -> dict:
    return {
        "method": method,
        "dataset": "digits",
        "shots": shots,
        "seed": seed,
        "stage": "final",
        "overrides": {"epochs": epochs, "feature_cache": cache},
    }


def floor(args, cache: bool) -> float:
    """The N trials back to back in this process, backbone warm: pure trial compute."""
    from orchestrator.trial import TrialRequest, run_trial

    run_trial(TrialRequest(**_request(args.method, args.shots, 1, cache, args.epochs)))  # warm-up (and cache fill)
    t0 = time.perf_counter()
    for s in range(1, args.n + 1):
        run_trial(TrialRequest(**_request(args.method, args.shots, s, cache, args.epochs)))
    return time.perf_counter() - t0


def process_loop(args, env) -> dict:
    t0 = time.perf_counter()
    for s in range(1, args.n + 1):
        cmd = [
            sys.executable,
            "-m",
            "orchestrator.trial",
            "--method",
            args.method,
            "--dataset",
            "digits",
            "--shots",
            str(args.shots),
            "--seed",
            str(s),
            "--set",
            f"epochs={args.epochs}",
            "--set",
            "feature_cache=false",
            "--json",
        ]
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"process_loop trial {s} failed: {p.stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "backbone_loads_per_trial": 1.0}


_TUNE_DEFAULT = r"""
import json, os, sys, time
import ray
from ray import tune
from orchestrator.trial import TrialRequest, run_trial
from methods import backbone

args = json.loads(sys.argv[1])

def trainable(config):
    final = run_trial(TrialRequest(**config["request"]))
    tune.report(dict(final, backbone_loads=backbone.LOAD_COUNT))

ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=os.cpu_count(), include_dashboard=False,
         logging_level="ERROR", log_to_driver=False, runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}})
reqs = [dict(args["request"], seed=s) for s in range(1, args["n"] + 1)]
t0 = time.perf_counter()
tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                   param_space={"request": tune.grid_search(reqs)},
                   tune_config=tune.TuneConfig(max_concurrent_trials=args["concurrency"]),
                   run_config=tune.RunConfig(storage_path=args["storage"], name="tune_default", verbose=0))
grid = tuner.fit()
wall = time.perf_counter() - t0
loads = [r.metrics.get("backbone_loads") for r in grid]
ray.shutdown()
print(json.dumps({"wall_s": wall, "errors": grid.num_errors, "loads": loads}))
"""


def tune_default(args, env, work: Path) -> dict:
    payload = {
        "n": args.n,
        "concurrency": args.concurrency,
        "storage": str(work / "tune_default"),
        "request": _request(args.method, args.shots, 1, False, args.epochs),
    }
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", _TUNE_DEFAULT, json.dumps(payload)], cwd=REPO, env=env, capture_output=True, text=True
    )
    total = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"tune_default failed: {p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if out["errors"]:
        raise SystemExit(f"tune_default: {out['errors']} trial(s) failed")
    loads = [x for x in out["loads"] if x is not None]
    return {
        "wall_s": total,
        "tuner_fit_s": out["wall_s"],
        "backbone_loads_per_trial": (sum(loads) / len(loads)) if loads else None,
    }


def promptsweep(args, env, work: Path, cache: bool) -> dict:
    name = "overhead_cache" if cache else "overhead_nocache"
    shutil.rmtree(Path(env["PROMPTSWEEP_CACHE"]) / "features", ignore_errors=True)  # the sweep starts cold
    spec = write_spec(
        work / f"{name}.yaml",
        name=name,
        methods=[args.method],
        seeds=list(range(1, args.n + 1)),
        output=work / "sweeps",
        arch="promptsweep-tiny",
        shots=args.shots,
        train={"defaults": {"epochs": args.epochs, "feature_cache": cache}},
    )
    t0 = time.time()
    wall = run_sweep(spec, work, env, args.concurrency)
    finals = trial_finals(work / "sweeps" / name)
    if len(finals) != args.n:
        raise SystemExit(f"promptsweep: expected {args.n} trial results, found {len(finals)}")
    by_pid: dict = {}
    for f in finals:
        if f.get("backbone_loads") is not None:
            by_pid[f["pid"]] = max(by_pid.get(f["pid"], 0), f["backbone_loads"])
    starts, ends = [f["start"] for f in finals], [f["end"] for f in finals]
    order = sorted(finals, key=lambda f: f["start"])
    gaps = [b["start"] - a["end"] for a, b in zip(order, order[1:])]  # one trial's end to the next one's start
    fifth = max(1, len(gaps) // 5)
    return {
        "wall_s": wall,
        "startup_s": min(starts) - t0,
        "trials_span_s": max(ends) - min(starts),
        "gap_first_fifth_ms": 1e3 * sum(gaps[:fifth]) / fifth if gaps else None,
        "gap_last_fifth_ms": 1e3 * sum(gaps[-fifth:]) / fifth if gaps else None,
        "worker_processes": len(by_pid),
        "backbone_loads_per_worker": sorted(by_pid.values()),
        "backbone_loads_per_trial": sum(by_pid.values()) / args.n,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="trials per way")
    ap.add_argument("--method", default="coop")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["process_loop", "tune_default", "promptsweep_nocache"],
        help="leave a way out (repeatable)",
    )
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ps-overhead-"))
    env = bench_env(work)

    figures: dict = {
        "n": args.n,
        "method": args.method,
        "shots": args.shots,
        "epochs": args.epochs,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
    }
    figures["floor_nocache_s"] = floor(args, cache=False)
    figures["floor_cache_s"] = floor(args, cache=True)
    ways = {}
    if "process_loop" not in args.skip:
        ways["process_loop"] = process_loop(args, env)
    if "tune_default" not in args.skip:
        ways["tune_default"] = tune_default(args, env, work)
    ways["promptsweep"] = promptsweep(args, env, work, cache=True)
    if "promptsweep_nocache" not in args.skip:
        ways["promptsweep_nocache"] = promptsweep(args, env, work, cache=False)

    for name, w in ways.items():
        cached = name == "promptsweep"
        base = figures["floor_cache_s"] if cached else figures["floor_nocache_s"]
        span = w.get("trials_span_s", w["wall_s"])
        w["per_trial_s"] = w["wall_s"] / args.n
        w["per_trial_overhead_s"] = (span - base) / args.n
    ref = ways["promptsweep"]["wall_s"]
    figures["ways"] = ways
    figures["speedup_vs"] = {name: w["wall_s"] / ref for name, w in ways.items() if name != "promptsweep"}

    print(
        f"{args.n} trials of {args.method} (digits, {args.shots} shot, {args.epochs} epoch), "
        f"{args.concurrency} at a time, {os.cpu_count()} CPUs"
    )
    print(
        f"compute floor (in-process, warm): {figures['floor_nocache_s']:.1f} s without / "
        f"{figures['floor_cache_s']:.1f} s with the feature cache"
    )
    print(
        f"{'way':<22} {'wall s':>8} {'per trial s':>12} {'overhead/trial s':>17} {'loads/trial':>12} {'promptsweep x':>14}"
    )
    for name, w in ways.items():
        x = ref / ref if name == "promptsweep" else w["wall_s"] / ref
        print(
            f"{name:<22} {w['wall_s']:>8.1f} {w['per_trial_s']:>12.2f} {w['per_trial_overhead_s']:>17.2f} "
            f"{w['backbone_loads_per_trial'] or float('nan'):>12.2f} {x:>14.2f}"
        )
    ps = ways["promptsweep"]
    print(
        f"promptsweep start-up (Ray, MLflow, plan) {ps['startup_s']:.1f} s; {ps['worker_processes']} worker "
        f"process(es) loaded weights {ps['backbone_loads_per_worker']} time(s)"
    )
    if ps["gap_first_fifth_ms"] is not None:
        print(
            f"promptsweep gap between one trial's end and the next one's start (driver + Tune): "
            f"{ps['gap_first_fifth_ms']:.0f} ms in the first fifth of the trials, {ps['gap_last_fifth_ms']:.0f} ms "
            "in the last fifth"
        )
    print(json.dumps(figures, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
