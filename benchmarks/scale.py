"""How the sweep driver's cost per trial grows with the number of trials: near-zero-compute trials (zero-shot
CLIP on ``digits`` with the feature cache, promptsweep-tiny) through the real sweep command.

For each N in ``--n`` (default 100, 1000) one sweep of N trials runs (one cell, N final seeds, 2 at a time by
default). The driver process is sampled every ``--sample-s`` seconds (``psutil``: CPU time, bytes it wrote —
``/proc/<pid>/io`` ``wchar``, every file write of the driver's threads: results, Tune's experiment snapshots
and their upload, MLflow's SQLite store, logs — and RSS); each trial's end comes from its Tune result
(``reported_at``). For the first and the last tenth of the trials (by end time) it prints:

* ``gap_ms``: mean time from one trial's end to the next one's start (driver + Tune between trials);
* ``cpu_ms_per_trial``: driver CPU time in that window / trials that ended in it;
* ``kb_written_per_trial``: driver bytes written in that window / trials that ended in it;
* ``rss_mb``: the driver's largest RSS in that window;

and ``ratio_last_first`` of each (the target: <= 1.5 at every N, i.e. flat cost per trial). The baseline of
each ratio is the same sweep's first tenth. Also printed: the total wall time over the trials' own compute
(sum of their running times / concurrency), for comparison with Ray's own Tune bookkeeping release test
(10,000 one-second trials on 16 CPUs within 28 % over their floor).

    python benchmarks/scale.py [--n 100,1000] [--concurrency 2] [--sample-s 0.25]
    python benchmarks/scale.py --n 1000 --method coop --shots 16 --epochs 3 --batch-size 2   # ~1 s trials
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, bench_env, cpu_model, emit, trial_finals, write_spec  # noqa: E402


def _sample(proc, samples: list, period: float) -> None:
    import psutil

    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            cpu = p.cpu_times()
            io = p.io_counters()
            samples.append((time.time(), cpu.user + cpu.system, io.write_chars, p.memory_info().rss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
        time.sleep(period)


def _at(samples: list, t: float) -> tuple:
    """The last sample taken at or before ``t`` (the first one before the run)."""
    best = samples[0]
    for s in samples:
        if s[0] > t:
            break
        best = s
    return best


def run_n(
    n: int,
    work: Path,
    env: dict,
    concurrency: int,
    period: float,
    method: str = "zeroshot",
    shots: int = 1,
    train: dict | None = None,
) -> dict:
    import threading

    name = f"scale{n}" if method == "zeroshot" else f"scale{n}-{method}"
    spec = write_spec(
        work / f"{name}.yaml",
        name=name,
        methods=[method],
        seeds=list(range(1, n + 1)),
        output=work / "sweeps",
        arch="promptsweep-tiny",
        shots=shots,
        train=train,
    )
    cmd = [
        sys.executable,
        "-m",
        "orchestrator.sweep",
        str(spec),
        "--tracking-uri",
        f"sqlite:///{work / name}.db",
        "--max-concurrent",
        str(concurrency),
    ]
    samples: list = []
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=_sample, args=(proc, samples, period), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.time() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"sweep {name} failed: {out[-2000:]} {err[-3000:]}")
    finals = sorted(trial_finals(work / "sweeps" / name), key=lambda f: f["end"])
    if len(finals) != n:
        raise SystemExit(f"{name}: expected {n} trial results, found {len(finals)}")
    order = sorted(finals, key=lambda f: f["start"])
    gaps = [max(0.0, b["start"] - a["end"]) for a, b in zip(order, order[1:])]
    tenth = max(1, n // 10)

    def window(lo: int, hi: int) -> dict:
        t_lo = finals[lo - 1]["end"] if lo > 0 else min(f["start"] for f in finals)
        t_hi = finals[hi - 1]["end"]
        a, b = _at(samples, t_lo), _at(samples, t_hi)
        k = hi - lo
        rss = max((s[3] for s in samples if t_lo <= s[0] <= t_hi), default=b[3])
        g = gaps[lo : hi - 1] if hi - 1 > lo else gaps[lo : lo + 1]
        return {
            "gap_ms": 1e3 * sum(g) / max(1, len(g)),
            "cpu_ms_per_trial": 1e3 * (b[1] - a[1]) / k,
            "kb_written_per_trial": (b[2] - a[2]) / 1024 / k,
            "rss_mb": rss / 2**20,
        }

    first, last = window(0, tenth), window(n - tenth, n)
    compute = sum(f["time_total_s"] for f in finals) / concurrency
    ratio = {k: (last[k] / first[k] if first[k] else None) for k in first}
    return {
        "n": n,
        "wall_s": wall,
        "trials_compute_s": compute,
        "over_floor": wall / compute - 1 if compute else None,
        "first_tenth": first,
        "last_tenth": last,
        "ratio_last_first": ratio,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="100,1000")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--sample-s", type=float, default=0.25)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument(
        "--method",
        default="zeroshot",
        help="the trials' method (coop with --epochs: trials that train, report and checkpoint every epoch)",
    )
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args(argv)
    train = {
        "defaults": {
            k: v
            for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("num_workers", 0))
            if v is not None
        }
    }
    work = Path(args.work or tempfile.mkdtemp(prefix="promptsweep-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(work)
    results = []
    for n in [int(x) for x in args.n.split(",") if x]:
        r = run_n(n, work, env, args.concurrency, args.sample_s, args.method, args.shots, train)
        results.append(r)
        f, last, q = r["first_tenth"], r["last_tenth"], r["ratio_last_first"]
        print(
            f"\nN = {n}: wall {r['wall_s']:.0f} s, the trials' own compute {r['trials_compute_s']:.0f} s "
            f"({100 * (r['over_floor'] or 0):.0f} % over it)"
        )
        print("| figure | first tenth | last tenth | last / first |\n|---|---:|---:|---:|")
        for key in ("gap_ms", "cpu_ms_per_trial", "kb_written_per_trial", "rss_mb"):
            print(
                f"| {key} | {f[key]:.1f} | {last[key]:.1f} | {q[key]:.2f} |"
                if q[key] is not None
                else f"| {key} | {f[key]:.1f} | {last[key]:.1f} | - |"
            )
    print(f"\n{cpu_model()}, {args.concurrency} trials at a time, {args.method} on digits {args.shots}-shot")
    emit(
        {
            "benchmark": "scale",
            "concurrency": args.concurrency,
            "device_name": cpu_model(),
            "method": args.method,
            "shots": args.shots,
            "train": train,
            "runs": results,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
