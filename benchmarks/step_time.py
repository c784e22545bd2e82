"""Training step time of every gradient-trained method, as a ratio to a floor measured in the same run.

The floor: one forward and backward through the frozen image tower (``methods.towers.encode_image``,
the path every method uses) with one learnable tensor on the input side — an additive image
perturbation [3, H, W], initialised to zero — so that backward runs through the whole image tower;
loss = mean of the squared image features; nothing else is learned and the text tower is not used;
the step includes ``zero_grad``, backward and an SGD step, like every method's. It is the least any
method that prompts the image tower (VPT, MaPLe, SEP, SPT) can cost per step; methods that do not
backpropagate through the image tower (CoOp, KgCoOp, TGP-T: image features under ``no_grad``) may
come out below 1, and methods that encode C class prompts per step grow with ``--classes``.

Every method registered in ``methods.registry`` with ``trains_by_gradient`` is built with its project
defaults (``benchmarks/_common.py``: ImageNet 16-shot fewshot cell, ``--batch-size`` for all,
``--classes`` synthetic class names, ``prepare`` on synthetic images, its own optimizer) and
stepped on one synthetic batch exactly as ``orchestrator.trial`` steps it (bf16 autocast on CUDA,
fp32 on CPU). After ``--warmup`` steps each, ``--steps`` rounds time one step of every method and
of the floor in turn (interleaved, so machine load drifts hit all alike; ``torch.cuda.synchronize``
around each step on GPU). Reported: the median step time per method and its ratio to the floor's.

    python benchmarks/step_time.py                                    # tiny backbone, CPU
    python benchmarks/step_time.py --arch ViT-B-16 --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import build, build_floor, emit, environment, setup, synthetic_batch, timed_step, train_step  # noqa: E402
from methods.backbone import TINY_ARCH  # noqa: E402
from methods.registry import get_method, method_names  # noqa: E402


def main(argv=None) -> int:
    gradient = [m for m in method_names() if get_method(m).trains_by_gradient]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=TINY_ARCH, help="open_clip arch, random init (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--methods", default=",".join(gradient), help="comma-separated registry names (default: all gradient-trained)"
    )
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(",") if m]

    bb = setup(args.arch, args.device)
    images, labels = synthetic_batch(bb, args.batch_size, args.classes)
    runs = [build_floor(bb, args.batch_size)] + [build(m, bb, args.classes, args.batch_size) for m in names]
    for b in runs:
        for _ in range(args.warmup):
            train_step(b, images, labels)
    times: dict[str, list[float]] = {b.name: [] for b in runs}
    for _ in range(args.steps):
        for b in runs:
            times[b.name].append(timed_step(b, images, labels))

    median_ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    floor = median_ms["floor"]
    ratios = {m: median_ms[m] / floor for m in names}
    print(
        f"median training step time, {bb.arch} on {args.device}, batch {args.batch_size}, C={args.classes}, "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{'method':<14}{'ms':>10}{'x floor':>10}")
    print(f"{'floor':<14}{floor:>10.2f}{1.0:>10.2f}")
    for m in names:
        print(f"{m:<14}{median_ms[m]:>10.2f}{ratios[m]:>10.2f}")
    emit(
        {
            "benchmark": "step_time",
            **environment(bb),
            "batch_size": args.batch_size,
            "classes": args.classes,
            "warmup": args.warmup,
            "steps": args.steps,
            "floor": "frozen image tower forward+backward to a learnable input perturbation, SGD step",
            "floor_ms": floor,
            "median_ms": {m: median_ms[m] for m in names},
            "ratio_to_floor": ratios,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
