"""The data layer at ImageNet's real size: listing, few-shot splits, ``fewshot check`` and the preflight.

Builds (once; reused when present) a full-size ImageNet tree in the CoOp layout under ``--root``:
``images/train/<wnid>/`` with 1,281,167 files and ``images/val/<wnid>/`` with 50,000, every file a hard
link to its class's small real JPEG (so decoding checks decode something, at no disk cost; one source
per class, as a file system caps the links per file, ext4 at 65,000), plus a
``classnames.txt`` with 1,000 classes. ``--classes`` / ``--per-class`` shrink it (the smoke test).

Then, in this process, it times what a trial and a sweep pay for data:

* ``load_cold``: ``load_dataset("imagenet")`` from disk; ``load_again``: the same call again (a warm
  worker's next trial);
* ``split_first``: ``fewshot_split(ds, 16, 1)`` with an empty split cache (sample + write);
  ``split_cached``: the same split again on the same dataset object (a trial's cached split);
  ``split_cached_new_process``: on a freshly read dataset object (the first trial of a new worker);
* ``check_shots``: ``python -m fewshot check imagenet --shots 1,2,4,8,16`` (seeds 1-3), in process;
* ``preflight``: the sweep's data check for 16 shots x seeds 1-3 (``check_sweep_data``).

Prints one line per figure and, last, one JSON object with every figure in seconds and the ratio
``load_cold / split_cached`` (how much cheaper a cached split is than a listing). Run it on an older
checkout by copying this file into that checkout's ``benchmarks/``: the calls it makes exist there too
(newer keyword arguments are passed only where the installed code takes them).

Usage: ``python benchmarks/imagenet_scale.py [--root /tmp/promptsweep-imagenet] [--classes 1000]
[--per-class 0 (= ImageNet's 1,281,167 in all)] [--val-per-class 50]``.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGENET_TRAIN = 1_281_167


def build_tree(root: Path, classes: int, per_class: int, val_per_class: int) -> tuple[Path, float]:
    """The tree under ``root/imagenet`` (reused when its marker file says it has this shape); its build time."""
    from PIL import Image

    d = root / "imagenet"
    shape = f"{classes} {per_class} {val_per_class}"
    marker = d / ".built"
    if marker.is_file() and marker.read_text() == shape:
        return d, 0.0
    t0 = time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 80, 40)).save(buf, format="JPEG")
    (d / "sources").mkdir(exist_ok=True)
    wnids = [f"n{1440764 + i:08d}" for i in range(classes)]
    (d / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    total = IMAGENET_TRAIN if per_class == 0 else per_class * classes
    base, extra = divmod(total, classes)
    for i, w in enumerate(wnids):
        source = d / "sources" / f"{w}.jpg"
        source.write_bytes(buf.getvalue())
        for part, n in (("train", base + (i < extra)), ("val", val_per_class)):
            folder = d / "images" / part / w
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                target = folder / f"{w}_{j}.JPEG"
                if not target.exists():
                    os.link(source, target)
    marker.write_text(shape)
    return d, time.perf_counter() - t0


def timed(label: str, fn, figures: dict):
    t0 = time.perf_counter()
    out = fn()
    figures[label] = round(time.perf_counter() - t0, 3)
    print(f"{label:<26} {figures[label]:>9.3f} s", flush=True)
    return out


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "promptsweep-imagenet"))
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=0, help="train images per class (0: ImageNet's 1,281,167 in all)")
    ap.add_argument("--val-per-class", type=int, default=50)
    args = ap.parse_args(argv)

    root = Path(args.root)
    _, build_s = build_tree(root, args.classes, args.per_class, args.val_per_class)
    os.environ["PROMPTSWEEP_CACHE"] = tempfile.mkdtemp(prefix="promptsweep-bench-cache-")  # empty split cache

    from fewshot import registry
    from fewshot.cli import check_one
    from fewshot.sampling import fewshot_split
    from fewshot.validate import check_sweep_data

    figures: dict = {"build": round(build_s, 1)}
    ds = timed("load_cold", lambda: registry.load_dataset("imagenet", root), figures)
    timed("load_again", lambda: registry.load_dataset("imagenet", root), figures)
    print(f"  {len(ds.train)} train, {len(ds.test)} test images, {ds.num_classes} classes", flush=True)
    timed("split_first", lambda: fewshot_split(ds, 16, 1), figures)
    timed("split_cached", lambda: fewshot_split(ds, 16, 1), figures)
    if hasattr(registry, "forget_loaded"):
        registry.forget_loaded()
    fresh = registry.load_dataset("imagenet", root)
    timed("split_cached_new_process", lambda: fewshot_split(fresh, 16, 1), figures)
    kw = {"tolerance": None} if _accepts(check_one, "tolerance") else {}  # a reduced tree has other counts
    status = timed("check_shots", lambda: check_one("imagenet", root, (1, 2, 4, 8, 16), (1, 2, 3), **kw), figures)
    print(f"  check: {status[0]}", flush=True)
    kw = {"tolerance": None} if _accepts(check_sweep_data, "tolerance") else {}
    timed("preflight", lambda: check_sweep_data({"imagenet": {(16, s) for s in (1, 2, 3)}}, root, **kw), figures)
    figures["ratio_load_cold_to_split_cached"] = round(figures["load_cold"] / max(figures["split_cached"], 1e-6), 1)
    print(
        json.dumps(
            {
                "benchmark": "imagenet_scale",
                "train_images": len(ds.train),
                "test_images": len(ds.test),
                "classes": ds.num_classes,
                "check_status": status[0],
                **figures,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
