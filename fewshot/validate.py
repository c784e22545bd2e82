"""Up-front data checks: is a dataset fit to train on, before any trial (or GPU) is taken?

Owns ``check_labels`` (every label in ``0..C-1``, every class has training images),
``check_sizes`` (no empty train/val/test part a protocol reads, and the image counts of a standard
dataset within ``COUNT_TOLERANCE`` of the published split sizes), ``check_images`` (every listed
image exists and decodes, checked in a thread pool), ``check_files_exist`` (every image of a list
exists as a regular file: a stat, no open, so a FIFO cannot hang it), ``check_fewshot`` (the
images of the K-shot train/val splits a sweep will actually draw) and ``check_sweep_data`` (all of it for a sweep's datasets and targets; used by
``orchestrator.sweep._preflight`` and ``python -m fewshot check``).

Only the few-shot train/val images are decoded — a few per class and seed, so even ImageNet
(1.28M training images) costs seconds: its 16-shot splits for three seeds are < 60k images. The test
lists a sweep evaluates on are checked for existence (ImageNet's 50k in well under a second), so a
missing test image stops the sweep before training rather than a trial after it. The full training
lists are checked structurally (labels, class coverage) without touching the files.
Every problem is a one-line ``DataError`` naming the file (or folder) to fix.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping, Optional

from fewshot.errors import DataError, EmptySplitError
from fewshot.images import MissingImageError, check_image, file_problem
from fewshot.paths import DOCS
from fewshot.registry import CATALOG, COUNT_TOLERANCE, load_dataset
from fewshot.sampling import fewshot_split
from fewshot.types import DatasetSplits, Item

PARTS = ("train", "val", "test")


class SizeMismatchError(DataError):
    """A standard dataset's image counts are further from the published split sizes than the tolerance."""


def _where(ds: DatasetSplits) -> str:
    return f"dataset '{ds.name}'" + (f" (images under {ds.image_root})" if ds.image_root else "")


def check_labels(ds: DatasetSplits) -> None:
    """Every item's label is a class index and, when the dataset has a train split, every class has
    training images (test-only datasets such as ImageNet-A skip the second rule)."""
    n = ds.num_classes
    for part in ("train", "val", "test"):
        for it in getattr(ds, part):
            if isinstance(it.label, bool) or not isinstance(it.label, int) or not 0 <= it.label < n:
                raise DataError(
                    f"{_where(ds)}: {part} image {it.impath} has label {it.label!r}, outside 0..{n - 1} "
                    f"({n} classes): fix the split/list file"
                )
    if ds.train:
        have = {it.label for it in ds.train}
        empty = [lab for lab in range(n) if lab not in have]
        if empty:
            shown = ", ".join(f"{lab} '{ds.classnames[lab]}'" for lab in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise DataError(
                f"{_where(ds)}: {len(empty)} class(es) have no training images ({shown}): "
                "add their images or fix the split/list file"
            )


def check_sizes(ds: DatasetSplits, needs_train: bool = True, tolerance: Optional[float] = COUNT_TOLERANCE) -> None:
    """No empty part that will be read (train/val/test of a source dataset, test of a target) — whatever the
    tolerance — and, for a standard dataset with ``tolerance`` not None, each part's image count within
    ``tolerance`` (relative) of the published size. One DataError naming the dataset, the counts and the fix."""
    got = {p: len(getattr(ds, p)) for p in PARTS}
    wanted = PARTS if needs_train else ("test",)
    empty = [p for p in wanted if got[p] == 0]
    if empty:
        raise EmptySplitError(
            f"{_where(ds)}: the {'/'.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
            f"(train {got['train']}, val {got['val']}, test {got['test']} images): nothing to "
            f"{'train on or ' if 'train' in empty else ''}evaluate; fix the dataset folder or its "
            f"split file (see {DOCS})"
        )
    info = CATALOG.get(ds.name)
    if info is None or tolerance is None:
        return
    off = [
        (p, got[p], want)
        for p, want in zip(PARTS, info.sizes)
        if want and abs(got[p] - want) > tolerance * want and (needs_train or p == "test")
    ]
    if off:
        shown = ", ".join(f"{p} {g} (published: {w})" for p, g, w in off)
        raise SizeMismatchError(
            f"{_where(ds)}: image counts differ from the published split by more than "
            f"{tolerance:.0%}: {shown}; complete the download (see {DOCS}), or, for a deliberate "
            "subset, raise the tolerance (count_tolerance in the spec, --count-tolerance for "
            "python -m fewshot check; null / none skips the comparison)"
        )


def check_files_exist(items: Iterable[Item], what: str, workers: int | None = None) -> int:
    """Every distinct image of ``items`` exists as a regular file (a stat, no open, no decode; in a thread
    pool): the DataError of the first missing one (a FIFO, device or directory in its place, or a NUL byte in
    its path, is named as such) and how many are bad. Returns how many were checked."""
    paths = list(dict.fromkeys(it.impath for it in items))
    if not paths:
        return 0
    with ThreadPoolExecutor(_workers(len(paths), workers)) as pool:
        problems = [e for e in pool.map(file_problem, paths, chunksize=512) if e is not None]
    if problems:
        missing = all(isinstance(e, MissingImageError) for e in problems)
        raise type(problems[0])(
            f"{problems[0]} [{len(problems)} of the {len(paths)} images of {what} are "
            f"{'missing' if missing else 'missing or not image files'}]"
        )
    return len(paths)


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


def check_sweep_data(
    needs: Mapping[str, Iterable[tuple[int, int]]],
    data_root=None,
    targets: Iterable[str] = (),
    workers: int | None = None,
    tolerance: Optional[float] = COUNT_TOLERANCE,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, int]:
    """For each source dataset: read it, check its labels and sizes, the images of its ``(shots, seed)``
    splits (decoded) and its test list (exists); for each target (evaluated on its test split only): read
    it and check its labels, sizes and test list. Returns ``{dataset: few-shot images decoded}``; the first
    problem is a DataError naming the file. ``progress`` gets one line per dataset, with its time."""
    say = progress or (lambda line: None)
    checked: dict[str, int] = {}
    todo = list(needs.items()) + [(t, None) for t in dict.fromkeys(targets) if t not in needs]
    for i, (name, pairs) in enumerate(todo, 1):
        t0 = time.perf_counter()
        ds = load_dataset(name, data_root)
        check_labels(ds)
        check_sizes(ds, needs_train=pairs is not None, tolerance=tolerance)
        checked[name] = check_fewshot(ds, pairs, workers) if pairs is not None else 0
        n_test = check_files_exist(ds.test, f"the test split of '{name}'", workers)
        decoded = f"{checked[name]} few-shot images decode, " if pairs is not None else ""
        say(
            f"  {i}/{len(todo)} {name} ({'source' if pairs is not None else 'target'}): {decoded}{n_test} test images "
            f"present ({time.perf_counter() - t0:.1f} s)"
        )
    return checked
