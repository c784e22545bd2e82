"""Peak memory of ONE training step versus the number of classes C, for CoOp, SEP and TGP-T.

Claim checked (issue 7): TGP-T encodes 2 text sequences per image whatever C, so its step memory
is flat in C; CoOp and SEP encode C class prompts per step, so theirs grows linearly with C.

Each (method, C) is built on the backbone ``--arch`` (random init) with synthetic class names
"class 0".."class C-1", the project defaults of the method (``methods.defaults``, ImageNet 16-shot
fewshot cell, batch size ``--batch-size``), ``prepare`` run on synthetic images and the method's own
optimizer (``orchestrator.training.build_optimizer``). One warm-up step runs first (lazy zero-shot
heads / template features and the optimizer state are created there, not in the measured step),
then the gradients are dropped and ONE step (forward, backward, optimizer step, as
``orchestrator.trial`` runs it) is measured on a synthetic batch of the backbone's image size:

* CPU: the allocator's own counter. ``torch.profiler.profile(profile_memory=True)`` makes c10's CPU
  allocator report every allocation and free with its running total of allocated bytes
  (``ProfiledCPUMemoryReporter``); the figure is the highest running total during the step minus
  the total just before the step's first allocation, i.e. the peak bytes allocated by the step
  above the pre-step baseline. Memory held outside c10's allocator (oneDNN scratch space, Python
  objects) is not counted.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the step; bf16 autocast as the trial uses on CUDA.

Output: a table (method x C -> peak MiB, ratio to the method's peak at the smallest C) and, as the
last stdout line, one JSON object with the peaks and ``ratio_largest_to_smallest_c`` per method.

    python benchmarks/memory.py                                  # tiny backbone, CPU
    python benchmarks/memory.py --arch ViT-B-16 --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import build, emit, environment, setup, synthetic_batch, train_step  # noqa: E402
from methods.backbone import TINY_ARCH  # noqa: E402

MiB = 2**20


def _cpu_allocations(prof) -> list[tuple[int, int, int]]:
    """(time ns, bytes allocated (+) or freed (-), allocator running total) of every CPU allocation event."""
    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        f = ev.extra_fields
        if type(f).__name__ == "_ExtraFields_Allocation" and f.device.type == "cpu":
            out.append((ev.start_time_ns, f.alloc_size, f.total_allocated))
    return sorted(out)


def peak_step_bytes(b, images, labels) -> int:
    """Peak bytes allocated during one training step above the pre-step baseline."""
    b.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if images.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(b, images, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(b, images, labels)
    events = _cpu_allocations(prof)
    if not events:
        return 0
    _, first_size, first_total = events[0]
    base = first_total - first_size
    return max(total for _, _, total in events) - base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=TINY_ARCH, help="open_clip arch, random init (default: %(default)s)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--methods", default="coop,sep,tgpt", help="comma-separated registry names")
    ap.add_argument("--classes", default="10,100,1000", help="comma-separated class counts")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    classes = sorted(int(c) for c in args.classes.split(","))

    bb = setup(args.arch, args.device)
    peaks: dict[str, dict[str, float]] = {}
    for name in methods:
        peaks[name] = {}
        for c in classes:
            b = build(name, bb, c, args.batch_size)
            images, labels = synthetic_batch(bb, args.batch_size, c)
            train_step(b, images, labels)  # warm-up: lazy heads, optimizer state
            peaks[name][str(c)] = peak_step_bytes(b, images, labels) / MiB
            del b
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            print(f"[memory] {name} C={c}: {peaks[name][str(c)]:.2f} MiB", file=sys.stderr, flush=True)

    lo = str(classes[0])
    ratios = {m: {c: v / p[lo] for c, v in p.items()} for m, p in peaks.items()}
    print(
        f"peak memory of one training step (MiB; x = ratio to C={lo}), {bb.arch} on {args.device}, batch {args.batch_size}"
    )
    print(f"{'method':<8}" + "".join(f"{'C=' + str(c):>22}" for c in classes))
    for m in methods:
        print(f"{m:<8}" + "".join(f"{peaks[m][str(c)]:>12.2f} ({ratios[m][str(c)]:>6.2f}x)" for c in classes))
    emit(
        {
            "benchmark": "memory",
            **environment(bb),
            "batch_size": args.batch_size,
            "classes": classes,
            "measure": (
                "torch.cuda.max_memory_allocated above the pre-step allocation"
                if args.device == "cuda"
                else "torch.profiler profile_memory: c10 CPU allocator running total, peak above the pre-step total"
            ),
            "peak_mib": peaks,
            "ratio_to_smallest_c": ratios,
            "ratio_largest_to_smallest_c": {m: ratios[m][str(classes[-1])] for m in methods},
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
