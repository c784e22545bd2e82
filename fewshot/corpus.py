"""The procedurally generated image–caption corpus that ``promptsweep-mini`` is pretrained on.

Two sources, both drawn by the same code as the offline datasets (``fewshot.offline``):

* **shapes**: ``render_shape`` images of (colour, shape) pairs with a caption that combines the
  pair with what the renderer drew — size (``small`` / ``large``), position (``on the left`` ...),
  background (``dark`` / ``light``) — in one of several caption templates, none of them a downstream
  dataset's template (``"a photo of a {}."``): zero-shot with the dataset's template works, and a
  learned prompt has room above it. ``augmented_fraction`` of them are seen through the few-shot
  training transform (random resized crop + flip; captioned without size or position), so that
  the backbone's features of the crops few-shot training sees stay meaningful. Every colour and
  every shape word occurs, but
  the ``held_out_pairs`` (by default the novel half of ``shapes-32``: classes 16..31) never do as a
  pair: the model learns the concepts, and those class names only *combine* them, so a base-to-novel
  split of ``shapes-32`` has novel classes the backbone has never seen as such.
* **digits**: the *training part* of the ``digits`` dataset (``offline.digits_split_indices``) —
  never its val or test images — as stored there plus ``digit_views - 1`` shifted copies, captioned
  ``"the digit seven."``, ``"a handwritten seven."``, ...

Disjoint from every offline split: shapes are drawn from ``numpy.random.default_rng([CORPUS_STREAM,
seed, i])`` streams, the offline shapes datasets from ``[SPLIT_SEED, label]`` (different seed
sequences give independent streams); ``tests/test_pretrain.py`` checks that no corpus image equals
a val or test image of ``shapes-64`` or ``digits``.

``build_corpus(cfg, image_size)`` returns the images through the CLIP evaluation transform (the
view zero-shot evaluation sees) and their captions. Deterministic for a given config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from fewshot.offline import (
    COLOURS,
    DIGIT_NAMES,
    DIGITS_SIZE,
    SHAPES,
    SHAPES_SIZE,
    digit_image,
    digits_split_indices,
    render_shape_with_attributes,
    shape_classes,
)

#: first element of every corpus seed sequence (the offline datasets use ``SPLIT_SEED`` = 0)
CORPUS_STREAM = 7919


#: the base-to-novel dataset whose novel classes the corpus never shows as a pair
NOVEL_DATASET_CLASSES = 32


def default_held_out() -> list[str]:
    """The novel half of ``shapes-32`` (``subsample_classes('new')`` keeps labels 16..31)."""
    n = NOVEL_DATASET_CLASSES
    return [f"{c} {s}" for c, s in shape_classes(n)[n // 2 :]]


class CorpusConfig(BaseModel):
    """What the corpus holds (part of the pretrained checkpoint's content key)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(1, ge=0)
    shape_images: int = Field(20000, ge=1)
    digit_views: int = Field(3, ge=0, description="copies of each digits training image (the first unshifted)")
    augmented_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of shape images seen through the few-shot "
        "training transform (random resized crop + flip) instead of the evaluation one",
    )
    held_out_pairs: list[str] = Field(
        default_factory=default_held_out, description="'colour shape' pairs that never occur together"
    )


#: caption templates; none is a downstream dataset's template ("a photo of a {}.", "a photo of the digit
#: {}."), as web captions are not CLIP's prompts: zero-shot works but a learned prompt can do better
SHAPE_TEMPLATES = [
    "a {size}{colour} {shape}.",
    "a {colour} {shape}{pos}.",
    "a {colour} {shape} on a {bg} background.",
    "a {shape} coloured {colour}.",
    "there is a {size}{colour} {shape}{pos}.",
    "a {size}{colour} {shape} on a {bg} background{pos}.",
    "{colour} {shape}",
]
#: for cropped / flipped views, whose size and position words would be wrong
PLAIN_TEMPLATES = [
    "a {colour} {shape}.",
    "{colour} {shape}",
    "a {shape} coloured {colour}.",
    "part of a {colour} {shape}.",
]
DIGIT_TEMPLATES = [
    "the digit {name}.",
    "a handwritten {name}.",
    "the number {name}.",
    "handwritten digit {name}.",
]


def _size_word(radius: float) -> str:
    return "small " if radius < 0.26 else "large " if radius > 0.32 else ""


def _pos_words(centre: tuple[float, float]) -> str:
    x, y = centre
    v = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
    h = "left" if x < 0.4 else "right" if x > 0.6 else ""
    if not v and not h:
        return " in the middle"
    return f" on the {'-'.join(w for w in (v, h) if w)}"


def _bg_word(level: float) -> str:
    return "dark" if level < 100 else "light" if level > 150 else "grey"


def shape_caption(colour: str, shape: str, attrs: dict, rng: np.random.Generator, plain: bool = False) -> str:
    templates = PLAIN_TEMPLATES if plain else SHAPE_TEMPLATES
    t = templates[int(rng.integers(len(templates)))]
    return t.format(
        colour=colour,
        shape=shape,
        size=_size_word(attrs["radius"]),
        pos=_pos_words(attrs["centre"]),
        bg=_bg_word(attrs["background"]),
    )


def shape_pairs(cfg: CorpusConfig) -> list[tuple[str, str]]:
    held = set(cfg.held_out_pairs)
    return [(c, s) for s in SHAPES for c in COLOURS if f"{c} {s}" not in held]


@dataclass
class Corpus:
    images: torch.Tensor  # [N, 3, S, S] float32, CLIP-normalised evaluation view
    captions: list[str]
    kinds: list[str]  # "shape" | "digit" per example

    def __len__(self) -> int:
        return len(self.captions)


def _shape_example(cfg: CorpusConfig, pairs: list[tuple[str, str]], i: int) -> tuple[Image.Image, str, bool]:
    """Shape example ``i``: ``(image, caption, augment)``, from its own generator (so any process can draw it)."""
    rng = np.random.default_rng([CORPUS_STREAM, cfg.seed, i])
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    img, attrs = render_shape_with_attributes(colour, shape, rng, SHAPES_SIZE)
    augment = bool(rng.random() < cfg.augmented_fraction)
    return img, shape_caption(colour, shape, attrs, rng, plain=augment), augment


def _shape_chunk(cfg: CorpusConfig, start: int, stop: int) -> list[tuple[Image.Image, str, bool]]:
    pairs = shape_pairs(cfg)
    return [_shape_example(cfg, pairs, i) for i in range(start, stop)]


def _shape_examples(cfg: CorpusConfig, workers: int):
    """Every shape example in order; rendered by ``workers`` processes when more than one (the images are
    the same either way: each comes from its own generator)."""
    chunk = 500
    bounds = [(a, min(a + chunk, cfg.shape_images)) for a in range(0, cfg.shape_images, chunk)]
    if workers <= 1 or len(bounds) <= 1:
        for a, b in bounds:
            yield from _shape_chunk(cfg, a, b)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: a spawned child would re-run the caller's main script (any script calling load_backbone). The
    # children only run numpy and PIL code, never torch's thread pool, which a forked child could hang on.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for part in pool.map(_shape_chunk, [cfg] * len(bounds), *zip(*bounds)):
            yield from part


def iter_raw(cfg: CorpusConfig, workers: int = 1):
    """``(PIL image, caption, kind, augment)`` of every corpus example, in order (deterministic, whatever
    ``workers``: the processes that render the shapes); ``augment``: view it through the training
    transform (its caption then names no size or position)."""
    for img, caption, augment in _shape_examples(cfg, workers):
        yield img, caption, "shape", augment
    if cfg.digit_views:
        from sklearn.datasets import load_digits

        pixels = load_digits().images
        for label, _cname, train, _val, _test in digits_split_indices():
            for i in train:
                base = digit_image(pixels[i], DIGITS_SIZE)
                for v in range(cfg.digit_views):
                    rng = np.random.default_rng([CORPUS_STREAM, cfg.seed, 1_000_000 + i, v])
                    img = base if v == 0 else _shifted(base, rng)
                    t = DIGIT_TEMPLATES[int(rng.integers(len(DIGIT_TEMPLATES)))]
                    yield img, t.format(name=DIGIT_NAMES[label]), "digit", False


def _shifted(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    return img.transform(img.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.NEAREST)


def corpus_size(cfg: CorpusConfig) -> int:
    return cfg.shape_images + cfg.digit_views * sum(len(t) for _, _, t, _, _ in digits_split_indices())


def build_corpus(cfg: CorpusConfig, image_size: int, progress=None, workers: int = 1) -> Corpus:
    """The corpus' images (CLIP evaluation transform for ``image_size``, or for the ``augment`` ones the
    few-shot training transform under a fixed torch seed, applied here in order) and captions; ``workers``
    processes render the shapes (the result does not depend on it)."""
    from fewshot.transforms import clip_transform

    eval_tf, train_tf = clip_transform(image_size, train=False), clip_transform(image_size, train=True)
    total = corpus_size(cfg)
    images = torch.empty(total, 3, image_size, image_size)
    captions, kinds = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CORPUS_STREAM + cfg.seed)  # the random crops and flips
        for n, (img, cap, kind, augment) in enumerate(iter_raw(cfg, workers)):
            images[n] = (train_tf if augment else eval_tf)(img)
            captions.append(cap)
            kinds.append(kind)
            if progress is not None:
                progress(1)
    return Corpus(images[: len(captions)], captions, kinds)
