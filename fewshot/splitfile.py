"""The one reader (and writer) of CoOp ``split_zhou_<Name>.json`` files, shared by every JSON-split
dataset (the nine standard ones and the offline ``digits``/``shapes``).

Format: a JSON object with exactly the keys ``train``, ``val``, ``test``; each a list of
``[relative_path, label, classname]`` with 0-based int labels. Paths are joined to ``image_dir``.
Every label ``0..C-1`` has one class name and at least one ``train`` entry. Every path stays inside
``image_dir`` once resolved (no ``..`` out of it, no NUL byte, no symbolic link pointing elsewhere:
``fewshot.paths.first_escape``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fewshot.errors import DataError, MissingDataError
from fewshot.paths import DOCS, first_escape
from fewshot.types import Item

SPLITS = ("train", "val", "test")


def parse_entries(entries, image_dir: str, num_classes: int | None, where: str, part: str) -> list[Item]:
    """Validate ``[relpath, label, classname]`` entries and turn them into Items under ``image_dir``."""
    if not isinstance(entries, list):
        raise DataError(
            f"{where}: '{part}' must be a list of [path, label, classname] entries, got {type(entries).__name__}"
        )
    items = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], int)
            or isinstance(entry[1], bool)
            or not isinstance(entry[2], str)
        ):
            raise DataError(
                f"{where}: '{part}' entry {i} is {_shown(entry)}, expected [path (str), label (int), classname (str)]"
            )
        path, label, classname = entry
        if not path.strip() or os.path.isabs(path):
            raise DataError(
                f"{where}: '{part}' entry {i} has path {json.dumps(path)}, expected a file path relative to {image_dir}"
            )
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise DataError(f"{where}: '{part}' entry {i} has label {label}, outside {bound}")
        items.append(Item(os.path.join(image_dir, path), label, classname))
    check_inside(items, [e[0] for e in entries], image_dir, where, part)
    return items


def check_inside(items: list[Item], listed: list[str], image_dir: str, where: str, part: str) -> None:
    """DataError naming the first entry whose path has a NUL byte or resolves outside ``image_dir``."""
    bad = first_escape(image_dir, [it.impath for it in items])
    if bad is not None:
        i, why = bad
        raise DataError(
            f"{where}: '{part}' entry {i} has path {json.dumps(listed[i])}, which {why}: every image "
            f"must be a file inside {image_dir}; fix the entry (or re-download the split file, see {DOCS})"
        )


def _shown(value) -> str:
    """A value as short JSON for a message (a deeply nested one is not expanded)."""
    try:
        return json.dumps(value)[:120]
    except RecursionError:
        return "a deeply nested value"


def classnames_of(items_lists, num_classes: int | None, where: str) -> list[str]:
    """``classnames[label]`` from the items; DataError on a label with two names or a missing label."""
    names: dict[int, str] = {}
    for items in items_lists:
        for it in items:
            seen = names.setdefault(it.label, it.classname)
            if seen != it.classname:
                raise DataError(f"{where}: label {it.label} is named both '{seen}' and '{it.classname}'")
    n = num_classes if num_classes is not None else (max(names) + 1 if names else 0)
    missing = [lab for lab in range(n) if lab not in names]
    if missing:
        raise DataError(f"{where}: no entry has label(s) {missing[:10]} (expected labels 0..{n - 1})")
    return [names[lab] for lab in range(n)]


def read_split_file(split_file: Path, image_dir: Path, num_classes: int | None = None):
    """Read a split JSON -> ``(train, val, test, classnames)``; DataError naming the file and the problem."""
    split_file = Path(split_file)
    if not split_file.is_file():
        raise MissingDataError(
            f"split file {split_file} is missing: download it (links in {DOCS}) into {split_file.parent}"
        )
    try:
        with open(split_file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"split file {split_file} is not valid JSON ({exc}): re-download it (see {DOCS})") from None
    except RecursionError:  # [[[[...]]]] nested deeper than Python's recursion limit
        raise DataError(
            f"split file {split_file} is not a split file (its JSON is nested too deeply): re-download it (see {DOCS})"
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f"split file {split_file} must hold a JSON object with keys train/val/test, got {type(data).__name__}"
        )
    missing = [k for k in SPLITS if k not in data]
    if missing:
        raise DataError(f"split file {split_file} lacks key(s) {', '.join(missing)} (needs train, val, test)")
    where = f"split file {split_file}"
    parts = [parse_entries(data[k], str(image_dir), num_classes, where, k) for k in SPLITS]
    classnames = classnames_of(parts, num_classes, where)
    check_train_covers_classes(parts[0], classnames, where)
    return parts[0], parts[1], parts[2], classnames


def check_train_covers_classes(train: list[Item], classnames: list[str], where: str) -> None:
    """DataError if some class has no training image (its few-shot split would be empty for every K)."""
    have = {it.label for it in train}
    empty = [lab for lab in range(len(classnames)) if lab not in have]
    if empty:
        shown = ", ".join(f"{lab} '{classnames[lab]}'" for lab in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(
            f"{where}: {len(empty)} class(es) have no 'train' entries ({shown}); every class needs "
            f"training images: re-download the split file (see {DOCS})"
        )


def dump_split(train, val, test, image_dir: str) -> str:
    """Serialise Items to the split-file JSON text (paths relative to ``image_dir``, 4-space indent)."""

    def rows(items):
        return [[os.path.relpath(it.impath, image_dir), it.label, it.classname] for it in items]

    return json.dumps({"train": rows(train), "val": rows(val), "test": rows(test)}, indent=4)
