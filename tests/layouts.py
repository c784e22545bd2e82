"""Small data trees in the CoOp layout, with real PNG files, that tests write: a few-class ImageNet, its
four variants (ImageNet-A/R on a subset of its wnids, V2 numbered folders) and a JSON-split dataset."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
#: OxfordPets' reader wants its 37 classes: two real breed names, then stand-ins
PETS = ["abyssinian", "american bulldog"] + [f"breed {i}" for i in range(2, 37)]


def png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def _classnames(folder: Path, mapping: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in mapping.items()))


def write_imagenet(root: Path, train_per_class: int = 4, val_per_class: int = 2, flat_val: bool = False) -> Path:
    """``<root>/imagenet``: classnames.txt, images/train/<wnid>/, images/val/<wnid>/ (or a flat val)."""
    d = root / "imagenet"
    _classnames(d, WNIDS)
    for lab, w in enumerate(WNIDS):
        for i in range(train_per_class):
            png(d / "images" / "train" / w / f"{w}_{i}.png", (60 * lab, 20 * i, 90))
        for i in range(val_per_class):
            name = f"ILSVRC2012_val_{lab * val_per_class + i:08d}.png"
            png(d / "images" / "val" / (name if flat_val else f"{w}/{name}"), (60 * lab, 30, 20 * i))
    return d


def write_imagenet_variant(root: Path, name: str, per_class: int = 2) -> Path:
    """One of ImageNet's test-only variants: V2 (numbered folders), Sketch (all wnids), A / R (two of them)."""
    folder, subdir, wnids = {
        "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", list(WNIDS)),
        "imagenet_sketch": ("imagenet-sketch", "images", list(WNIDS)),
        "imagenet_a": ("imagenet-adversarial", "imagenet-a", list(WNIDS)[1:]),
        "imagenet_r": ("imagenet-rendition", "imagenet-r", list(WNIDS)[:2]),
    }[name]
    d = root / folder
    _classnames(d, WNIDS)
    for w in wnids:
        cls = str(list(WNIDS).index(w)) if name == "imagenet_v2" else w
        for i in range(per_class):
            png(d / subdir / cls / f"{i}.png", (40 * list(WNIDS).index(w), 10, 30 * i))
    return d


def write_pets(root: Path, per_class: tuple[int, int, int] = (1, 1, 1)) -> Path:
    """``<root>/oxford_pets``: images/*.png and split_zhou_OxfordPets.json over ``PETS``."""
    d = root / "oxford_pets"
    split: dict[str, list] = {}
    for part, n in zip(("train", "val", "test"), per_class):
        split[part] = []
        for lab, cname in enumerate(PETS):
            for i in range(n):
                rel = f"{cname.replace(' ', '_')}_{part}_{i}.png"
                png(d / "images" / rel, (6 * lab, 40 * i, 60))
                split[part].append([rel, lab, cname])
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split, indent=4))
    return d
