"""Up-front data checks: is a dataset fit to train on, before any trial (or GPU) is taken?

Owns ``check_labels`` (every label in ``0..C-1``, every class has training images),
``check_images`` (every listed image exists and decodes, checked in a thread pool),
``check_fewshot`` (the images of the K-shot train/val splits a sweep will actually draw) and
``check_sweep_data`` (all of it for a sweep's datasets and targets; used by
``orchestrator.sweep._preflight`` and ``python -m fewshot check --shots``).

Only the few-shot train/val images are decoded — a few per class and seed, so even ImageNet
(1.28M training images) costs seconds: its 16-shot splits for three seeds are < 60k images. The
full lists are checked structurally (labels, class coverage) without touching the files.
Every problem is a one-line ``DataError`` naming the file (or folder) to fix.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping

from fewshot.errors import DataError
from fewshot.images import check_image
from fewshot.registry import load_dataset
from fewshot.sampling import fewshot_split
from fewshot.types import DatasetSplits, Item


def _where(ds: DatasetSplits) -> str:
    return f"dataset '{ds.name}'" + (f" (images under {ds.image_root})" if ds.image_root else "")


def check_labels(ds: DatasetSplits) -> None:
    """Every item's label is a class index and, when the dataset has a train split, every class has
    training images (test-only datasets such as ImageNet-A skip the second rule)."""
    n = ds.num_classes
    for part in ("train", "val", "test"):
        for i, it in enumerate(getattr(ds, part)):
            if isinstance(it.label, bool) or not isinstance(it.label, int) or not 0 <= it.label < n:
                raise DataError(f"{_where(ds)}: {part} image {it.impath} has label {it.label!r}, outside 0..{n - 1} "
                                f"({n} classes): fix the split/list file")
    if ds.train:
        have = {it.label for it in ds.train}
        empty = [lab for lab in range(n) if lab not in have]
        if empty:
            shown = ", ".join(f"{lab} '{ds.classnames[lab]}'" for lab in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise DataError(f"{_where(ds)}: {len(empty)} class(es) have no training images ({shown}): "
                            "add their images or fix the split/list file")


def _workers(n_files: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    return max(1, min(8, os.cpu_count() or 1, n_files))


def check_images(items: Iterable[Item], what: str, workers: int | None = None) -> int:
    """Decode every distinct image of ``items`` (``fewshot.images.check_image``); returns how many were
    checked. DataError naming the first bad file in list order, with how many are bad in all."""
    paths = list(dict.fromkeys(it.impath for it in items))
    if not paths:
        return 0

    def one(path: str):
        try:
            check_image(path)
        except DataError as exc:
            return exc
        return None

    with ThreadPoolExecutor(_workers(len(paths), workers)) as pool:
        errors = [e for e in pool.map(one, paths) if e is not None]
    if errors:
        first = errors[0]
        raise type(first)(f"{first} [{len(errors)} of the {len(paths)} images of {what} are bad]")
    return len(paths)


def check_fewshot(ds: DatasetSplits, pairs: Iterable[tuple[int, int]], workers: int | None = None) -> int:
    """Check the images of the K-shot train + val splits of ``ds`` for each ``(shots, seed)``; returns
    the number of distinct images checked. The splits are the trial's own (same rule, same cache)."""
    pairs = sorted(set(pairs))
    items: list[Item] = []
    for shots, seed in pairs:
        split = fewshot_split(ds, shots, seed)
        items += split.train + split.val
    shots = sorted({k for k, _ in pairs})
    seeds = sorted({s for _, s in pairs})
    what = f"the {'/'.join(map(str, shots))}-shot splits of '{ds.name}' (seeds {', '.join(map(str, seeds))})"
    return check_images(items, what, workers)


def check_sweep_data(needs: Mapping[str, Iterable[tuple[int, int]]], data_root=None,
                     targets: Iterable[str] = (), workers: int | None = None) -> dict[str, int]:
    """For each source dataset: read it, check its labels and the images of its ``(shots, seed)``
    splits; for each target (evaluated on its test split only): read it and check its labels.
    Returns ``{dataset: images checked}``; the first problem is a DataError naming the file."""
    checked: dict[str, int] = {}
    for name, pairs in needs.items():
        ds = load_dataset(name, data_root)
        check_labels(ds)
        checked[name] = check_fewshot(ds, pairs, workers)
    for name in dict.fromkeys(targets):
        if name not in checked:
            check_labels(load_dataset(name, data_root))
            checked[name] = 0
    return checked
