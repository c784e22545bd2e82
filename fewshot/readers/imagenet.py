"""Readers for ImageNet and its four test-only variants (folder layouts + ``classnames.txt``).

``classnames.txt``: one line per class, ``<wnid> <name with spaces>``. ImageNet labels are the index
of the wnid in the sorted ``images/train`` folder list; train = ``images/train``, test =
``images/val`` (re-foldered by wnid) and val = test, as in CoOp. File names inside a class folder
are SORTED here; CoOp used ``os.listdir`` order, so its ImageNet few-shot subsets depend on the
filesystem and cannot be reproduced bit for bit.

ImageNetV2: folders ``0..999`` (label = folder number, classname = that line of classnames.txt).
Sketch / A / R: their own sorted wnid folders, labels 0..N-1 (A and R: 200 classes); loose
files such as ``README.txt`` are ignored.

The two ways an ImageNet download is commonly left half-prepared are named with their fix: an
``images/train`` that still holds the 1,000 per-class ``.tar`` archives (ILSVRC2012_img_train.tar
extracted one level only), and an ``images/val`` left flat (the validation archive extracts to
50,000 loose files; CoOp needs one folder per wnid).

Every class folder and image must resolve (symbolic links included) inside the real path of the folder
it is listed from (``images/train`` etc.; that folder itself may be a link): a link pointing elsewhere
is refused, as for the split files (``fewshot.paths.first_escape``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fewshot.errors import DataError, MissingDataError
from fewshot.paths import DOCS, first_escape
from fewshot.types import DatasetSplits, Item


def _entries(path: Path, want_dirs: bool) -> list[str]:
    """Sorted non-hidden names of sub-folders (or files) of ``path``; uses scandir's d_type (no stat per file)."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and (e.is_dir() if want_dirs else e.is_file()))


def _subdirs(path: Path, what: str) -> list[str]:
    if not path.is_dir():
        raise MissingDataError(f"{what} folder {path} is missing (see {DOCS})")
    return _entries(path, want_dirs=True)


_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _check_train_extracted(train: Path, wnids: list[str]) -> None:
    """DataError when ``images/train`` still holds per-class ``.tar`` archives (not extracted)."""
    tars = [f for f in _files(train) if f.endswith(".tar")]
    if tars:
        raise DataError(
            f"ImageNet {train} holds {len(tars)} unextracted class archive(s) (e.g. {tars[0]}) next to "
            f"{len(wnids)} class folder(s): extract each into its own folder, e.g. in {train}: "
            "for f in *.tar; do d=${f%.tar}; mkdir -p $d && tar -xf $f -C $d && rm $f; done (see " + DOCS + ")"
        )


def _check_val_foldered(val: Path, val_wnids: list[str]) -> None:
    """DataError when ``images/val`` holds loose images instead of (only) one folder per wnid."""
    loose = [f for f in _files(val) if f.lower().endswith(_IMAGE_SUFFIXES)]
    if loose:
        state = (
            "is flat" if not val_wnids else f"has {len(loose)} loose image(s) beside its {len(val_wnids)} class folders"
        )
        raise DataError(
            f"ImageNet {val} {state} ({len(loose)} images such as {loose[0]}, no folder per class): re-folder it by "
            "wnid, one folder per class as in images/train (e.g. with the ILSVRC2012 devkit's validation labels or "
            f"LOC_val_solution.csv: mkdir <wnid> and move each image into its class's folder; see {DOCS})"
        )


def _files(path: Path) -> list[str]:
    return _entries(path, want_dirs=False)


def read_classnames_txt(path: Path) -> dict[str, str]:
    """``{wnid: name}`` from a CoOp ``classnames.txt`` (insertion order = file order)."""
    if not path.is_file():
        raise MissingDataError(
            f"{path} is missing: copy classnames.txt from the CoOp repo / imagenet folder there (see {DOCS})"
        )
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.strip().split(" ")
            if not parts or not parts[0]:
                continue
            if len(parts) < 2:
                raise DataError(f"{path} line {lineno}: expected '<wnid> <class name>', got '{line.strip()}'")
            names[parts[0]] = " ".join(parts[1:])
    return names


def _folder_items(root: Path, folders: list[str], label_of: dict[str, int], names: list[str]) -> list[Item]:
    items = []
    base = str(root)
    _check_inside(root, [f"{base}{os.sep}{folder}" for folder in folders], "class folder")
    for folder in folders:
        label, name = label_of[folder], names[label_of[folder]]
        prefix = f"{base}{os.sep}{folder}{os.sep}"  # string joins: Path objects cost seconds over 1.28M files
        files = [prefix + fname for fname in _files(root / folder)]
        _check_inside(root, files, "image")
        items.extend(Item(path, label, name) for path in files)
    return items


def _check_inside(root: Path, paths: list[str], what: str) -> None:
    bad = first_escape(root, paths)
    if bad is not None:
        raise DataError(
            f"{what} {paths[bad[0]]} {bad[1]}: every class folder and image must be inside {root}; "
            f"replace the link by the real folder/file, or link {root} itself (see {DOCS})"
        )


def _names_for(wnids: list[str], mapping: dict[str, str], source: Path) -> list[str]:
    unknown = [w for w in wnids if w not in mapping]
    if unknown:
        raise DataError(f"class folder(s) {unknown[:5]} have no line in {source}")
    return [mapping[w] for w in wnids]


def read_imagenet(name: str, dataset_dir: Path, num_classes: int | None = None) -> DatasetSplits:
    mapping = read_classnames_txt(dataset_dir / "classnames.txt")
    images = dataset_dir / "images"
    wnids = _subdirs(images / "train", "ImageNet train")
    _check_train_extracted(images / "train", wnids)
    classnames = _names_for(wnids, mapping, dataset_dir / "classnames.txt")
    label_of = {w: i for i, w in enumerate(wnids)}
    train = _folder_items(images / "train", wnids, label_of, classnames)
    val_wnids = _subdirs(images / "val", "ImageNet val (re-foldered by wnid)")
    _check_val_foldered(images / "val", val_wnids)
    stray = [w for w in val_wnids if w not in label_of]
    if stray:
        raise DataError(f"ImageNet val folder(s) {stray[:5]} under {images / 'val'} are not classes of images/train")
    test = _folder_items(images / "val", val_wnids, label_of, classnames)
    return DatasetSplits(name, train, list(test), test, classnames, image_root=str(images))


def read_imagenet_v2(name: str, dataset_dir: Path, num_classes: int | None = None) -> DatasetSplits:
    names = list(read_classnames_txt(dataset_dir / "classnames.txt").values())
    root = dataset_dir / "imagenetv2-matched-frequency-format-val"
    folders = _subdirs(root, "ImageNetV2")
    bad = [f for f in folders if not f.isdigit() or int(f) >= len(names)]
    if bad:
        raise DataError(f"ImageNetV2 folder(s) {bad[:5]} under {root} are not class numbers 0..{len(names) - 1}")
    folders.sort(key=int)
    label_of = {f: int(f) for f in folders}
    test = _folder_items(root, folders, label_of, names)
    return DatasetSplits(name, [], [], test, names, image_root=str(root))


def _wnid_folder_dataset(name: str, dataset_dir: Path, image_subdir: str) -> DatasetSplits:
    mapping = read_classnames_txt(dataset_dir / "classnames.txt")
    root = dataset_dir / image_subdir
    wnids = _subdirs(root, name)
    classnames = _names_for(wnids, mapping, dataset_dir / "classnames.txt")
    test = _folder_items(root, wnids, {w: i for i, w in enumerate(wnids)}, classnames)
    return DatasetSplits(name, [], [], test, classnames, image_root=str(root))


def read_imagenet_sketch(name: str, dataset_dir: Path, num_classes: int | None = None) -> DatasetSplits:
    return _wnid_folder_dataset(name, dataset_dir, "images")


def read_imagenet_a(name: str, dataset_dir: Path, num_classes: int | None = None) -> DatasetSplits:
    return _wnid_folder_dataset(name, dataset_dir, "imagenet-a")


def read_imagenet_r(name: str, dataset_dir: Path, num_classes: int | None = None) -> DatasetSplits:
    return _wnid_folder_dataset(name, dataset_dir, "imagenet-r")
