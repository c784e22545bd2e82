"""Trial time with and without the frozen-feature cache, and whether the accuracies agree.

For each method whose image tower is untouched (default: zeroshot, linear_probe, coop, kgcoop,
cocoop, tgpt — TGP-T caches its pooled feature and token map, and trains ``--max-iters`` iterations,
its schedule being iteration-based), the same trials (``--dataset``, ``--shots``, seeds 1..``--seeds``) run in this process on a
warm backbone three ways: ``off`` (``feature_cache: false``, images through the tower every time),
``cold`` (cache on, empty cache: the first trial computes and stores the eval features) and ``warm``
(cache on, features already on disk: every trial memory-maps them). Evaluation through the cache is
exact, so val/test accuracies must agree between ``off`` and ``warm``; the script checks it and
prints ``agree``. ``--train-views k`` adds a ``views`` way: training on k cached augmented views
(an approximation, so its accuracies are reported, not compared).

Figures: seconds per trial for each way and the ratio off / warm. The last stdout line is one JSON
object. Usage: ``python benchmarks/feature_cache.py [--arch promptsweep-tiny] [--dataset digits]
[--shots 4] [--seeds 3] [--epochs 2] [--max-iters 4] [--train-views 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_way(args, method: str, overrides: dict) -> tuple[float, list[dict]]:
    from orchestrator.trial import BackboneRef, TrialRequest, run_trial

    outs, t0 = [], time.perf_counter()
    for seed in range(1, args.seeds + 1):
        req = TrialRequest(
            method=method,
            dataset=args.dataset,
            shots=args.shots,
            seed=seed,
            backbone=BackboneRef(arch=args.arch, pretrained=None),
            device=args.device,
            overrides={**({} if "max_iters" in overrides else {"epochs": args.epochs}), **overrides},
        )
        outs.append(run_trial(req))
    return (time.perf_counter() - t0) / args.seeds, outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="zeroshot,linear_probe,coop,kgcoop,cocoop,tgpt")
    ap.add_argument("--arch", default="promptsweep-tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-iters", type=int, default=4, help="TGP-T's schedule (iterations, not epochs)")
    ap.add_argument("--train-views", type=int, default=0)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ps-featcache-"))
    os.environ.setdefault("PROMPTSWEEP_CACHE", str(work / "cache"))
    from fewshot.paths import cache_root
    from methods.backbone import load_backbone
    from orchestrator.feature_cache import cache_dir

    load_backbone(args.arch, None, "cuda" if args.device == "cuda" else "cpu")  # warm: weights not timed
    per_method = {}
    for method in args.methods.split(","):
        extra = {"cocoop": {"batch_size": 4}, "tgpt": {"max_iters": args.max_iters}}.get(method, {})
        run_way(args, method, {"feature_cache": False, **extra})  # warm-up (data, text features)
        off_s, off = run_way(args, method, {"feature_cache": False, **extra})
        shutil.rmtree(cache_dir(), ignore_errors=True)
        cold_s, _ = run_way(args, method, {"feature_cache": True, **extra})
        warm_s, warm = run_way(args, method, {"feature_cache": True, **extra})
        keys = ("val_acc", "test_acc")
        agree = all(a[k] == b[k] for a, b in zip(off, warm) for k in keys)
        rec = {
            "off_s": off_s,
            "cold_s": cold_s,
            "warm_s": warm_s,
            "speedup_warm": off_s / warm_s,
            "speedup_cold": off_s / cold_s,
            "agree": agree,
            "test_acc_off": [o["test_acc"] for o in off],
            "test_acc_warm": [o["test_acc"] for o in warm],
        }
        if args.train_views:
            views_s, views = run_way(
                args, method, {"feature_cache": True, "train_feature_views": args.train_views, **extra}
            )
            rec.update(views_s=views_s, speedup_views=off_s / views_s, test_acc_views=[o["test_acc"] for o in views])
        per_method[method] = rec

    print(
        f"{args.arch}, {args.dataset} {args.shots}-shot, {args.epochs} epoch(s), {args.seeds} seeds per way; "
        f"seconds per trial (cache under {cache_root()})"
    )
    print(f"{'method':<14} {'off':>8} {'cold':>8} {'warm':>8} {'off/warm':>9} {'accuracies agree':>17}")
    for m, r in per_method.items():
        print(
            f"{m:<14} {r['off_s']:>8.3f} {r['cold_s']:>8.3f} {r['warm_s']:>8.3f} {r['speedup_warm']:>9.2f} "
            f"{str(r['agree']):>17}"
        )
    print(
        json.dumps(
            {
                "arch": args.arch,
                "dataset": args.dataset,
                "shots": args.shots,
                "epochs": args.epochs,
                "seeds": args.seeds,
                "methods": per_method,
            }
        )
    )
    return 0 if all(r["agree"] for r in per_method.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
