"""GPU packing: the same trials with k = 1, 2, 4 trials per GPU — utilization, images/s, trials/hour.

For each k in ``--per-gpu`` one sweep (``python -m orchestrator.sweep`` on a generated spec) runs the
same trials: ``--methods`` x seeds 1..``--seeds`` on ``--dataset`` ``--shots``-shot, final stage only,
on ``--arch`` with random init (timing does not need weights), ``resources: {cpu: --cpu,
trials_per_gpu: k}`` (each trial's CUDA allocator capped at 1/k of the GPU). Gradient methods train
``--epochs`` epochs (TGP-T, whose schedule counts iterations, ``--max-iters``). Measured per sweep:

* ``span_s``: first trial start to last trial end (Tune's ``result.json``), ``trials_per_hour`` =
  trials / span x 3600, and ``wall_s`` of the whole command;
* ``gpu_util_mean`` / ``gpu_mem_max_mib``: ``nvidia-smi`` sampled every ``--sample-s`` during the span
  (mean over samples and GPUs; None where there is no ``nvidia-smi``);
* ``train_images_per_s``: all trials' training images (the trial's ``train_images``) / span — the
  sweep's aggregate training throughput — and per method the mean of its trials' own
  ``train_images_per_s`` (what one trial gets while it shares the GPU).

Baseline, measured in this process on the same device first: the bare backbone's forward + backward
throughput, images/s of ``benchmarks/_common.build_floor`` (frozen image tower forward and backward to
a learnable input perturbation, bf16 autocast on CUDA) at ``--batch-size``. Ratios: each method's
per-trial images/s (k = 1) / the bare backbone's; aggregate images/s and trials/hour at k / at k = 1.

On a machine without a GPU (``--device cpu``) there is nothing to pack: k is then the number of
trials at once, each with ``--cpu`` CPUs and no GPU (a smoke run of the script, not a packing figure).

    python benchmarks/packing.py --arch ViT-B-16 --device cuda --cpu 2           # the GPU figures
    python benchmarks/packing.py --per-gpu 1,2 --methods coop --seeds 2 --device cpu   # smoke run

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import (  # noqa: E402
    bench_env,
    build_floor,
    emit,
    environment,
    run_sweep,
    setup,
    synthetic_batch,
    timed_step,
    trial_finals,
    write_spec,
)
from methods.backbone import TINY_ARCH  # noqa: E402


class GpuSampler:
    """``nvidia-smi`` utilization / memory of every GPU every ``interval`` s, stamped with ``time.time()``."""

    QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, interval: float):
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, memory MiB), one per GPU and sample
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10).stdout
                now = time.time()
                for line in out.strip().splitlines():
                    util, mem = (float(x) for x in line.split(","))
                    self.samples.append((now, util, mem))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def during(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        inside = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not inside:
            return None, None
        return statistics.fmean(u for u, _ in inside), max(m for _, m in inside)


def bare_throughput(args) -> dict:
    """Images/s of the frozen backbone's forward + backward (the floor) at ``--batch-size``, median of steps."""
    bb = setup(args.arch, args.device)
    images, labels = synthetic_batch(bb, args.batch_size, 10)
    floor = build_floor(bb, args.batch_size)
    for _ in range(3):
        timed_step(floor, images, labels)
    median = statistics.median(timed_step(floor, images, labels) for _ in range(10))
    out = {"step_ms": median * 1e3, "images_per_s": args.batch_size / median, **environment(bb)}
    del floor, bb
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def packed_sweep(args, k: int, work: Path, env: dict) -> dict:
    name = f"packing_{k}"
    seeds = list(range(1, args.seeds + 1))
    gpu = args.device != "cpu"
    resources = {"cpu": args.cpu, "trials_per_gpu": k} if gpu else {"cpu": args.cpu, "gpu": 0}
    train = {"defaults": {"epochs": args.epochs}}
    if "tgpt" in args.methods.split(","):
        train["methods"] = {"tgpt": {"max_iters": args.max_iters}}
    spec = write_spec(
        work / f"{name}.yaml",
        name=name,
        methods=args.methods.split(","),
        seeds=seeds,
        output=work / "sweeps",
        arch=args.arch,
        dataset=args.dataset,
        shots=args.shots,
        train=train,
        resources=resources,
        device=args.device,
    )
    with GpuSampler(args.sample_s) as sampler:
        wall = run_sweep(spec, work, env, max_concurrent=None if gpu else k)
    finals = trial_finals(work / "sweeps" / name)
    t0, t1 = min(f["start"] for f in finals), max(f["end"] for f in finals)
    span = t1 - t0
    util, mem = sampler.during(t0, t1)
    per_method: dict[str, list[float]] = {}
    for f in finals:
        if f.get("train_images_per_s"):
            per_method.setdefault(f["config"]["request"]["method"], []).append(f["train_images_per_s"])
    return {
        "trials": len(finals),
        "wall_s": wall,
        "span_s": span,
        "trials_per_hour": len(finals) / span * 3600,
        "gpu_util_mean": util,
        "gpu_mem_max_mib": mem,
        "train_images_per_s": sum(f.get("train_images") or 0 for f in finals) / span,
        "per_method_train_images_per_s": {m: statistics.fmean(v) for m, v in per_method.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=TINY_ARCH)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--per-gpu", default="1,2,4", help="trials per GPU to compare (comma-separated)")
    ap.add_argument("--methods", default="coop,vpt,maple,sep,tgpt")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-iters", type=int, default=20, help="TGP-T's schedule (iterations, not epochs)")
    ap.add_argument("--cpu", type=float, default=1.0, help="CPUs per trial")
    ap.add_argument("--batch-size", type=int, default=32, help="batch of the bare-backbone throughput")
    ap.add_argument("--sample-s", type=float, default=0.5, help="nvidia-smi sampling interval")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ps-packing-"))
    env = bench_env(work)
    figures: dict = {
        "benchmark": "packing",
        "arch": args.arch,
        "device": args.device,
        "dataset": args.dataset,
        "shots": args.shots,
        "seeds": args.seeds,
        "methods": args.methods.split(","),
        "epochs": args.epochs,
        "cpu_per_trial": args.cpu,
    }
    figures["bare"] = bare_throughput(args)
    runs = {int(k): packed_sweep(args, int(k), work, env) for k in args.per_gpu.split(",")}
    base = runs[min(runs)]
    bare = figures["bare"]["images_per_s"]
    for r in runs.values():
        r["trials_per_hour_vs_fewest"] = r["trials_per_hour"] / base["trials_per_hour"]
        r["train_images_per_s_vs_fewest"] = r["train_images_per_s"] / base["train_images_per_s"]
    figures["per_gpu"] = runs
    figures["method_vs_bare"] = {m: v / bare for m, v in base["per_method_train_images_per_s"].items()}

    unit = "per GPU" if args.device != "cpu" else "at once (CPU: no packing, smoke run)"
    print(
        f"{args.arch} on {figures['bare']['device_name']}: bare backbone forward+backward "
        f"{bare:.1f} images/s (batch {args.batch_size})"
    )
    print(
        f"{'trials ' + unit:<44} {'span s':>8} {'trials/h':>9} {'x':>6} {'img/s':>8} {'GPU util %':>11} {'GPU MiB':>8}"
    )
    for k, r in runs.items():
        util = "—" if r["gpu_util_mean"] is None else f"{r['gpu_util_mean']:.0f}"
        mem = "—" if r["gpu_mem_max_mib"] is None else f"{r['gpu_mem_max_mib']:.0f}"
        print(
            f"{k:<44} {r['span_s']:>8.1f} {r['trials_per_hour']:>9.0f} {r['trials_per_hour_vs_fewest']:>6.2f} "
            f"{r['train_images_per_s']:>8.1f} {util:>11} {mem:>8}"
        )
    print(
        "per-trial training images/s at the fewest per GPU, / bare backbone: "
        + ", ".join(f"{m} {x:.2f}" for m, x in figures["method_vs_bare"].items())
    )
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
