"""Reader for datasets that ship a CoOp ``split_zhou_<Name>.json`` (Caltech101, OxfordPets,
StanfordCars, Flowers102, Food101, SUN397, DTD, EuroSAT, UCF101, and the offline datasets).

Paths in the file are relative to the dataset's image folder, except StanfordCars where they are
relative to the dataset folder itself (``image_subdir=""``).
"""

from __future__ import annotations

from pathlib import Path

from fewshot.errors import MissingDataError
from fewshot.paths import DOCS
from fewshot.splitfile import read_split_file
from fewshot.types import DatasetSplits


def read_json_split_dataset(
    name: str, dataset_dir: Path, image_subdir: str, split_name: str, num_classes: int | None
) -> DatasetSplits:
    """Read ``<dataset_dir>/split_zhou_<split_name>.json`` with paths under ``<dataset_dir>/<image_subdir>``."""
    image_dir = dataset_dir / image_subdir if image_subdir else dataset_dir
    if not image_dir.is_dir():
        raise MissingDataError(
            f"image folder {image_dir} of dataset '{name}' is missing: extract the images there (see {DOCS})"
        )
    split_file = dataset_dir / f"split_zhou_{split_name}.json"
    train, val, test, classnames = read_split_file(split_file, image_dir, num_classes)
    return DatasetSplits(name, train, val, test, classnames, image_root=str(image_dir))
