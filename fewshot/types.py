"""The two value types of the data layer: one labelled image (``Item``) and a built dataset (``DatasetSplits``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    """One labelled image: absolute path, 0-based label, cleaned class name (as in the split file)."""

    impath: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset as read from disk: full train/val/test lists and ``classnames[label]``.

    ``image_root`` is the directory the few-shot split cache stores paths relative to (the
    directory the split file's paths are relative to; for folder datasets, their image folder).
    Treat the lists as read-only: samplers return new lists, and ``memo`` keeps what is derived from
    the lists once per object (``fewshot.sampling``'s fingerprint and path index: seconds for ImageNet).
    """

    name: str
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]
    image_root: str = ""
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)
