"""CPU-scale accuracy benchmark: every method on the project-pretrained ``promptsweep-mini``.

Runs ``orchestrator.trial.run_trial`` in this process (the same trial a sweep runs, without Ray) for
every registered method on an offline dataset:

* **few-shot**: all classes, ``--shots`` (default 1/2/4/8/16), test accuracy;
* **base-to-novel** on ``--b2n-dataset`` (``shapes-64``): train on the base half of its classes at
  ``--b2n-shots``, test on base and on novel (classes no prompt trained on; on ``shapes-64`` the base
  half holds the 16 colour × shape pairs the pretraining corpus never showed together, ``fewshot.corpus``;
  on ``shapes-32`` the novel half does), HM = 2BN/(B+N);

each over ``--seeds`` (mean shown), with a shortened schedule (``--epochs``, TGP-T ``--tgpt-iters``;
CoCoOp: batch 4, a fifth of the epochs) so the whole table takes minutes on a 2-core CPU. Prints the
paper-style tables with each method's wall time and, as the last stdout line, one JSON object; its
ratios are against zero-shot CLIP measured in the same run (``gain_vs_zeroshot``: accuracy points
above zero-shot). Linear probe and TGP-T have no base-to-novel row (their classifiers are tied to
the training classes).

    python benchmarks/mini_benchmark.py [--dataset shapes-32] [--shots 1,2,4,8,16] [--seeds 1]
        [--methods zeroshot,coop,...] [--epochs 10] [--b2n-dataset shapes-64] [--b2n-shots 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import cpu_model, emit  # noqa: E402
from methods.registry import get_method, method_names  # noqa: E402
from orchestrator.trial import TrialRequest, run_trial  # noqa: E402

BACKBONE = {"arch": "promptsweep-mini", "pretrained": "promptsweep"}


def overrides(method: str, args) -> dict:
    """The shortened schedule: ``--epochs`` for epoch-based methods, ``--tgpt-iters`` for TGP-T."""
    cls = get_method(method)
    if not cls.trains_by_gradient:
        return {}
    if method == "tgpt":  # TGP-T's 32 category + 64 content tokens do not fit promptsweep-mini's 32-token text tower
        return {
            "max_iters": args.tgpt_iters,
            "eval_every_iters": max(1, args.tgpt_iters // 4),
            "n_cat": 16,
            "n_con": 24,
        }
    over = {"epochs": args.epochs}
    if (
        method == "cocoop"
    ):  # CoCoOp encodes B x C prompts per step (its reference batch is 1): small batches, 1/5 the epochs
        over.update(batch_size=4, epochs=max(1, args.epochs // 5))
    return over


def run(method: str, dataset: str, shots: int, seed: int, protocol: str, args) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = run_trial(
        TrialRequest(
            method=method,
            dataset=dataset,
            shots=shots,
            seed=seed,
            protocol=protocol,
            device=args.device,
            backbone=BACKBONE,
            overrides=overrides(method, args),
        )
    )
    return out, time.perf_counter() - t0


def mean(xs):
    return sum(xs) / len(xs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="shapes-32")
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--b2n-shots", type=int, default=16)
    ap.add_argument(
        "--b2n-dataset",
        default="shapes-64",
        help="base-to-novel dataset (shapes-64: base = shapes-32's 32 classes, where prompts have room above zero-shot)",
    )
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--methods", default=",".join(method_names()))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--tgpt-iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-b2n", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shots = [int(s) for s in args.shots.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]

    from methods.backbone import load_backbone

    t_load = time.perf_counter()
    load_backbone(BACKBONE["arch"], BACKBONE["pretrained"])  # pretrains on first use (cached)
    load_s = time.perf_counter() - t_load

    fewshot: dict[str, dict[int, float]] = {}
    b2n: dict[str, dict[str, float]] = {}
    wall: dict[str, float] = {}
    t_all = time.perf_counter()
    for m in methods:
        wall[m] = 0.0
        fewshot[m] = {}
        for k in shots:
            accs = []
            for seed in seeds:
                out, s = run(m, args.dataset, k, seed, "fewshot", args)
                accs.append(out["test_acc"])
                wall[m] += s
            fewshot[m][k] = mean(accs)
        if not args.skip_b2n and "base2novel" in get_method(m).protocols:
            rows = []
            for seed in seeds:
                out, s = run(m, args.b2n_dataset, args.b2n_shots, seed, "base2novel", args)
                rows.append(out)
                wall[m] += s
            b, n = mean([r["base_acc"] for r in rows]), mean([r["novel_acc"] for r in rows])
            b2n[m] = {"base": b, "novel": n, "hm": 2 * b * n / (b + n) if b + n else 0.0}
        print(f"[mini_benchmark] {m}: {wall[m]:.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all

    print(
        f"\nFew-shot on {args.dataset} (test accuracy %, mean over seeds {seeds}; promptsweep-mini; "
        f"{args.epochs} epochs, TGP-T {args.tgpt_iters} iterations)\n"
    )
    print("| method | " + " | ".join(f"{k} shot" for k in shots) + " | wall s |")
    print("|---|" + "---:|" * (len(shots) + 1))
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{fewshot[m][k]:.1f}" for k in shots) + f" | {wall[m]:.0f} |")
    if b2n:
        print(f"\nBase-to-novel on {args.b2n_dataset} ({args.b2n_shots} shots on the base half)\n")
        print("| method | Base | Novel | HM |")
        print("|---|---:|---:|---:|")
        for m, r in b2n.items():
            print(f"| {m} | {r['base']:.1f} | {r['novel']:.1f} | {r['hm']:.1f} |")
    print(
        f"\nwall time {total:.0f} s for {len(methods)} methods (+ {load_s:.0f} s backbone load/pretraining); "
        f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}\n"
    )

    zs = fewshot.get("zeroshot")
    gain = {m: {k: round(fewshot[m][k] - zs[k], 2) for k in shots} for m in methods} if zs else {}
    emit(
        {
            "benchmark": "mini_benchmark",
            "dataset": args.dataset,
            "b2n_dataset": args.b2n_dataset,
            "shots": shots,
            "seeds": seeds,
            "epochs": args.epochs,
            "fewshot": {m: {str(k): round(v, 2) for k, v in r.items()} for m, r in fewshot.items()},
            "base2novel": {m: {k: round(v, 2) for k, v in r.items()} for m, r in b2n.items()},
            "gain_vs_zeroshot": gain,
            "wall_s": {m: round(v, 1) for m, v in wall.items()},
            "total_s": round(total, 1),
            "backbone_load_s": round(load_s, 1),
            "device": args.device,
            "device_name": cpu_model(),
            "threads": args.threads,
            "torch": torch.__version__,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
