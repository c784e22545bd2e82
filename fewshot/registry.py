"""The dataset catalogue: names, on-disk folders, expected sizes, label spaces, and ``load_dataset``.

Standard datasets live in the CoOp layout under the data root (``--data-root`` /
``$PROMPTSWEEP_DATA``); the offline ``digits`` and ``shapes[-N]`` are built under the cache root.

``load_dataset`` keeps what it read for the life of the process (a warm Ray worker reads ImageNet's
1.28M-file listing once, not per trial), keyed by the dataset folder and checked against a cheap
signature of it (the modification times of its split/list files, and for folder datasets of its class
folders, which change when a class folder gains or loses an image), so a dataset changed on disk is
read again.

``label_subset_of(target, source)``: whether ``target``'s classes are (a subset of) ``source``'s, as
ImageNet-V2 / -Sketch (the same 1,000) and ImageNet-A / -R (200 of them) are of ImageNet — what a
method whose classifier is tied to its training classes can still be evaluated on.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fewshot import offline
from fewshot.errors import DataError, MissingDataError
from fewshot.paths import DOCS, resolve_data_root
from fewshot.readers.aircraft import read_aircraft
from fewshot.readers.imagenet import (
    read_imagenet,
    read_imagenet_a,
    read_imagenet_r,
    read_imagenet_sketch,
    read_imagenet_v2,
)
from fewshot.readers.json_split import read_json_split_dataset
from fewshot.types import DatasetSplits

__all__ = [
    "DatasetInfo",
    "CATALOG",
    "COUNT_TOLERANCE",
    "dataset_names",
    "dataset_info",
    "load_dataset",
    "label_subset_of",
    "resolve_data_root",
]

#: how far (relative, per split) a standard dataset's train/val/test image counts may be from the
#: published split sizes before ``fewshot check`` and the sweep refuse it (a partial download, a flat
#: ImageNet val, a wrong split file); 0.01 = 1 %. ``None`` skips the comparison (own subsets).
COUNT_TOLERANCE = 0.01


@dataclass(frozen=True)
class DatasetInfo:
    """A standard dataset: key, folder under the data root, expected class count and split sizes, and the
    dataset whose label space it shares (``label_source``: ImageNet's variants use ImageNet's classes)."""

    name: str
    folder: str
    num_classes: int
    sizes: tuple[int, int, int]  # train / val / test as published by CoOp
    reader: Callable[[str, Path, int | None], DatasetSplits]
    label_source: Optional[str] = None
    #: how deep the image listing reaches below the dataset folder: 1 for datasets listed by their split /
    #: list files; the folder datasets list class folders (ImageNet: images/train/<wnid>, 3 levels)
    listing_depth: int = 1


def _json(image_subdir: str, split_name: str):
    def read(name, dataset_dir, num_classes):
        return read_json_split_dataset(name, dataset_dir, image_subdir, split_name, num_classes)

    return read


CATALOG: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("imagenet", "imagenet", 1000, (1281167, 50000, 50000), read_imagenet, listing_depth=3),
        DatasetInfo("caltech101", "caltech-101", 100, (4128, 1649, 2465), _json("101_ObjectCategories", "Caltech101")),
        DatasetInfo("oxford_pets", "oxford_pets", 37, (2944, 736, 3669), _json("images", "OxfordPets")),
        DatasetInfo("stanford_cars", "stanford_cars", 196, (6509, 1635, 8041), _json("", "StanfordCars")),
        DatasetInfo("oxford_flowers", "oxford_flowers", 102, (4093, 1633, 2463), _json("jpg", "OxfordFlowers")),
        DatasetInfo("food101", "food-101", 101, (50500, 20200, 30300), _json("images", "Food101")),
        DatasetInfo("fgvc_aircraft", "fgvc_aircraft", 100, (3334, 3333, 3333), read_aircraft),
        DatasetInfo("sun397", "sun397", 397, (15880, 3970, 19850), _json("SUN397", "SUN397")),
        DatasetInfo("dtd", "dtd", 47, (2820, 1128, 1692), _json("images", "DescribableTextures")),
        DatasetInfo("eurosat", "eurosat", 10, (13500, 5400, 8100), _json("2750", "EuroSAT")),
        DatasetInfo("ucf101", "ucf101", 101, (7639, 1898, 3783), _json("UCF-101-midframes", "UCF101")),
        DatasetInfo("imagenet_v2", "imagenetv2", 1000, (0, 0, 10000), read_imagenet_v2, "imagenet", listing_depth=2),
        DatasetInfo(
            "imagenet_sketch", "imagenet-sketch", 1000, (0, 0, 50889), read_imagenet_sketch, "imagenet", listing_depth=2
        ),
        DatasetInfo(
            "imagenet_a", "imagenet-adversarial", 200, (0, 0, 7500), read_imagenet_a, "imagenet", listing_depth=2
        ),
        DatasetInfo(
            "imagenet_r", "imagenet-rendition", 200, (0, 0, 30000), read_imagenet_r, "imagenet", listing_depth=2
        ),
    ]
}

OFFLINE_NAMES = ["digits", "shapes"]


def dataset_names(include_offline: bool = True) -> list[str]:
    """All dataset keys (standard ones first; ``shapes-<N>`` variants are accepted too)."""
    return list(CATALOG) + (OFFLINE_NAMES if include_offline else [])


def dataset_info(name: str) -> DatasetInfo:
    if name not in CATALOG:
        raise DataError(_unknown(name))
    return CATALOG[name]


def _unknown(name: str) -> str:
    return f"unknown dataset '{name}': choose one of {', '.join(dataset_names())} (or shapes-<N>)"


def label_subset_of(target: str, source: str) -> bool:
    """True when every class of ``target`` is a class of ``source`` (same dataset, an ImageNet variant of
    ImageNet, or ``shapes-<M>`` of ``shapes-<N>`` with M <= N: shapes class i is the same for every N)."""
    if target == source:
        return True
    if target in CATALOG and CATALOG[target].label_source == source:
        return True
    shapes = [n for n in (target, source) if offline.is_offline(n) and n.startswith("shapes")]
    if len(shapes) == 2:
        return offline.shapes_class_count(target) <= offline.shapes_class_count(source)
    return False


_LOADED: "OrderedDict[tuple[str, str], tuple[tuple, DatasetSplits]]" = OrderedDict()
_LOADED_MAX = 4  # datasets kept per process (ImageNet's lists are ~0.5 GB of Python objects)
_loaded_lock = threading.Lock()


def _signature(folder: Path, depth: int) -> tuple:
    """Modification times (and sizes, for files) of ``folder``'s entries down to ``depth`` levels; entries
    at the deepest level are stat'ed, not listed, so ImageNet (depth 3) costs ~2,000 stats, not 1.28M."""
    out: list = []

    def walk(path: str, level: int) -> None:
        with os.scandir(path) as it:
            for e in sorted(it, key=lambda e: e.name):
                try:
                    st = e.stat()
                except OSError:  # a dangling link: its own stamp (the readers name it if it is listed)
                    st = e.stat(follow_symlinks=False)
                out.append((e.path, st.st_mtime_ns, st.st_size if e.is_file() else -1))
                if level < depth and e.is_dir():
                    walk(e.path, level + 1)

    st = folder.stat()
    out.append((str(folder), st.st_mtime_ns, -1))
    walk(str(folder), 1)
    return tuple(out)


def load_dataset(name: str, data_root: str | os.PathLike | None = None) -> DatasetSplits:
    """Read a dataset; DataError naming the missing path (and docs/data.md) if it is not there.

    A dataset read before by this process is returned again when its folder's signature is unchanged
    (the same object: treat its lists as read-only)."""
    if not isinstance(name, str):
        raise DataError(_unknown(str(name)))
    if offline.is_offline(name):
        return offline.load_offline(name)
    if name not in CATALOG:
        raise DataError(_unknown(name))
    info = CATALOG[name]
    folder = resolve_data_root(data_root) / info.folder
    if not folder.is_dir():
        raise MissingDataError(
            f"dataset '{name}' not found: folder {folder} is missing; download it as described in {DOCS}"
        )
    key = (name, str(folder))
    sig = _signature(folder, info.listing_depth)
    with _loaded_lock:
        hit = _LOADED.get(key)
        if hit is not None and hit[0] == sig:
            _LOADED.move_to_end(key)
            return hit[1]
    ds = info.reader(name, folder, info.num_classes)
    with _loaded_lock:
        _LOADED[key] = (sig, ds)
        _LOADED.move_to_end(key)
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return ds


def forget_loaded() -> None:
    """Drop every dataset this process keeps (the next ``load_dataset`` reads from disk)."""
    with _loaded_lock:
        _LOADED.clear()
