"""Reader for FGVCAircraft (the ``data/`` folder of fgvc-aircraft-2013b): official variant lists.

``variants.txt`` gives the class order (label = line index, classname = the variant string);
``images_variant_{train,val,test}.txt`` lines are ``<image_id> <variant with spaces>`` and the image
is ``images/<image_id>.jpg``, which must resolve inside ``images/`` (``fewshot.paths.first_escape``).
"""

from __future__ import annotations

from pathlib import Path

from fewshot.errors import DataError, MissingDataError
from fewshot.paths import DOCS, first_escape
from fewshot.types import DatasetSplits, Item


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingDataError(
            f"FGVCAircraft list {path} is missing: copy the data/ folder of fgvc-aircraft-2013b there (see {DOCS})"
        )
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def read_aircraft(name: str, dataset_dir: Path, num_classes: int | None = None) -> DatasetSplits:
    classnames = _read_lines(dataset_dir / "variants.txt")
    if num_classes is not None and len(classnames) != num_classes:
        raise DataError(f"{dataset_dir / 'variants.txt'} lists {len(classnames)} variants, expected {num_classes}")
    label_of = {c: i for i, c in enumerate(classnames)}
    image_dir = dataset_dir / "images"
    parts = []
    for split in ("train", "val", "test"):
        list_file = dataset_dir / f"images_variant_{split}.txt"
        items = []
        for lineno, line in enumerate(_read_lines(list_file), 1):
            image_id, _, variant = line.partition(" ")
            variant = variant.strip()
            if variant not in label_of:
                raise DataError(f"{list_file} line {lineno}: variant '{variant}' is not in variants.txt")
            items.append(Item(str(image_dir / f"{image_id}.jpg"), label_of[variant], variant))
        bad = first_escape(image_dir, [it.impath for it in items])
        if bad is not None:
            raise DataError(
                f"{list_file} line {bad[0] + 1}: image {items[bad[0]].impath!r} {bad[1]}: every image must be "
                f"a file inside {image_dir}; fix the line (see {DOCS})"
            )
        parts.append(items)
    return DatasetSplits(name, parts[0], parts[1], parts[2], classnames, image_root=str(image_dir))
