"""Offline datasets that need no download, materialised once as real PNG files in the CoOp layout.

* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, 10 classes
  ``"zero".."nine"``), upsampled to 32x32 RGB; per class 50% train / 20% val / 30% test with a fixed
  seed.
* ``shapes`` / ``shapes-<N>``: procedurally drawn coloured shapes (``"red circle"``, ...), N classes
  (default 10, 2..64), random position / size / rotation / background noise per image; 48x48 RGB.

Each is written to ``<cache>/offline/<name>/`` as ``images/<class>/<n>.png`` plus
``split_zhou_<Name>.json`` and then read by the same JSON-split reader as the real datasets. The
folder is built in a temp dir and renamed into place, so concurrent creators are safe: the first
rename wins and the others discard their copy.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fewshot.errors import DataError
from fewshot.paths import cache_root
from fewshot.readers.json_split import read_json_split_dataset
from fewshot.splitfile import dump_split
from fewshot.types import DatasetSplits, Item

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
}
SPLIT_SEED = 0
DIGITS_SIZE = 32
SHAPES_SIZE = 48
SHAPES_PER_CLASS = (20, 8, 12)  # train / val / test images per class
MAX_SHAPE_CLASSES = len(SHAPES) * len(COLOURS)
_SHAPES_RE = re.compile(r"^shapes(?:-(\d+))?$")


def is_offline(name: str) -> bool:
    return name == "digits" or bool(_SHAPES_RE.match(name))


def shapes_class_count(name: str) -> int:
    m = _SHAPES_RE.match(name)
    if not m:
        raise DataError(f"'{name}' is not a shapes dataset name (use 'shapes' or 'shapes-<N>')")
    n = int(m.group(1)) if m.group(1) else 10
    if not 2 <= n <= MAX_SHAPE_CLASSES:
        raise DataError(f"dataset '{name}': shapes class count must be 2..{MAX_SHAPE_CLASSES}, got {n}")
    return n


def shape_classes(n: int) -> list[tuple[str, str]]:
    """The first ``n`` (colour, shape) classes; consecutive classes differ in both shape and colour."""
    colours = list(COLOURS)
    out = []
    for i in range(n):
        s, k = i % len(SHAPES), i // len(SHAPES)
        out.append((colours[(s + k) % len(colours)], SHAPES[s]))
    return out


def offline_dir(name: str) -> Path:
    return cache_root() / "offline" / name


def load_offline(name: str) -> DatasetSplits:
    """Materialise ``name`` if needed, then read it through the JSON-split reader."""
    if name == "digits":
        num_classes, split_name = 10, "Digits"
    else:
        num_classes, split_name = shapes_class_count(name), "Shapes"
    target = offline_dir(name)
    if not (target / f"split_zhou_{split_name}.json").is_file():
        _materialise(name, target, split_name)
    return read_json_split_dataset(name, target, "images", split_name, num_classes)


def _materialise(name: str, target: Path, split_name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.building-"))
    try:
        images = tmp / "images"
        parts = _write_digits(images) if name == "digits" else _write_shapes(images, shapes_class_count(name))
        # the split file is written last: a renamed folder is always complete
        (tmp / f"split_zhou_{split_name}.json").write_text(dump_split(*parts, str(images)), encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / f"split_zhou_{split_name}.json").is_file():
                raise DataError(f"cannot create offline dataset folder {target}: remove it and retry") from None
            # another process won the race; its copy is identical
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _split_counts(n: int) -> tuple[int, int]:
    n_train = round(0.5 * n)
    n_val = round(0.2 * n)
    return n_train, n_val


def _save(img: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
    return str(path)


def digits_split_indices() -> list[tuple[int, str, list[int], list[int], list[int]]]:
    """``(label, class name, train, val, test)`` indices into ``sklearn.datasets.load_digits()`` per class:
    the ``digits`` dataset's split (50 / 20 / 30 % under ``SPLIT_SEED``). The pretraining corpus
    (``fewshot.corpus``) reads the train part only."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rng = np.random.RandomState(SPLIT_SEED)
    out = []
    for label, cname in enumerate(DIGIT_NAMES):
        idx = np.flatnonzero(target == label)
        idx = idx[rng.permutation(len(idx))]
        n_train, n_val = _split_counts(len(idx))
        out.append(
            (
                label,
                cname,
                [int(i) for i in idx[:n_train]],
                [int(i) for i in idx[n_train : n_train + n_val]],
                [int(i) for i in idx[n_train + n_val :]],
            )
        )
    return out


def digit_image(pixels: np.ndarray, size: int = DIGITS_SIZE) -> Image.Image:
    """One 8x8 ``load_digits`` image (values 0..16) as the ``digits`` dataset stores it: ``size`` px RGB."""
    pix = (pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pix, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def _write_digits(images: Path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, val, test = [], [], []
    for label, cname, *parts in digits_split_indices():
        for part, out in zip(parts, (train, val, test)):
            for i in part:
                out.append(Item(_save(digit_image(digits.images[i]), images / cname / f"{i:04d}.png"), label, cname))
    return train, val, test


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    steps = n * 2 if inner else n
    for j in range(steps):
        a = rot + 2 * math.pi * j / steps
        rr = inner if (inner and j % 2) else r
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        w = max(2.0, r * 0.4)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=int(w))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot + math.pi / 4), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot - math.pi / 2), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot - math.pi / 2, inner=r * 0.45), fill=fill)
    elif shape == "cross":
        t = r * 0.35
        c, s = math.cos(rot), math.sin(rot)
        for dx, dy in ((r, t), (t, r)):
            corners = [(-dx, -dy), (dx, -dy), (dx, dy), (-dx, dy)]
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def render_shape(colour: str, shape: str, rng: np.random.Generator, size: int = SHAPES_SIZE) -> Image.Image:
    """One image: noisy tinted background, the shape at a random place, size, rotation and shade."""
    return render_shape_with_attributes(colour, shape, rng, size)[0]


def render_shape_with_attributes(
    colour: str, shape: str, rng: np.random.Generator, size: int = SHAPES_SIZE
) -> tuple[Image.Image, dict]:
    """``render_shape``'s image plus what it drew: ``radius`` and ``centre`` (fractions of the image
    side) and ``background`` (mean grey level 0..255 of the tint). The generator is consumed exactly as
    ``render_shape`` always did, so the offline datasets' images do not change."""
    scale = 4  # draw large, then downsample: anti-aliased edges
    big = size * scale
    bg = rng.integers(60, 190, size=3)
    noise = rng.normal(0, 28, size=(size, size, 3))
    background = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background, mode="RGB").resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    r = rng.uniform(0.2, 0.38) * big
    cx, cy = rng.uniform(r, big - r, size=2)
    rot = rng.uniform(0, 2 * math.pi)
    shade = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, size=3), 0, 255)
    _draw_shape(draw, shape, cx, cy, r, rot, tuple(int(v) for v in shade))
    img = canvas.resize((size, size), Image.BOX)
    speckle = rng.normal(0, 8, size=(size, size, 3))
    out = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + speckle, 0, 255).astype(np.uint8), mode="RGB")
    return out, {"radius": r / big, "centre": (cx / big, cy / big), "background": float(bg.mean())}


def _write_shapes(images: Path, n_classes: int):
    n_train, n_val, n_test = SHAPES_PER_CLASS
    train, val, test = [], [], []
    for label, (colour, shape) in enumerate(shape_classes(n_classes)):
        cname = f"{colour} {shape}"
        rng = np.random.default_rng([SPLIT_SEED, label])  # class i looks the same whatever N is
        for j in range(n_train + n_val + n_test):
            img = render_shape(colour, shape, rng)
            item = Item(_save(img, images / cname.replace(" ", "_") / f"{j:03d}.png"), label, cname)
            (train if j < n_train else val if j < n_train + n_val else test).append(item)
    return train, val, test
