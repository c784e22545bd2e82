"""Zero-shot accuracy of a backbone on the offline datasets' test splits, with each dataset's template.

``zero_shot_report(bb, names)`` -> ``{dataset: {"acc": %, "chance": %, "classes": C}}``; a
``<name>:base`` / ``<name>:novel`` entry evaluates the base / novel half of a dataset's classes
(``fewshot.sampling.subsample_classes``) as in base-to-novel. ``python -m methods pretrain --eval``
prints it for the project backbone; ``tests/test_pretrain.py`` asserts on it.
"""

from __future__ import annotations

import torch

DEFAULT_SETS = (
    "digits",
    "shapes",
    "shapes-32:base",
    "shapes-32:novel",
    "shapes-64",
    "shapes-64:base",
    "shapes-64:novel",
)


@torch.no_grad()
def zero_shot_accuracy(bb, classnames: list[str], items, dataset: str, batch_size: int = 256) -> float:
    from torch.utils.data import DataLoader

    from fewshot.images import ImageDataset
    from fewshot.templates import template
    from fewshot.transforms import clip_transform

    text = bb.template_text_features(classnames, [template(dataset)])
    loader = DataLoader(
        ImageDataset(items, clip_transform(bb.image_size, train=False), split="test"),
        batch_size=batch_size,
        shuffle=False,
    )
    correct = total = 0
    for images, labels in loader:
        pred = (bb.encode_image(images) @ text.t()).argmax(-1).cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(1, total)


def zero_shot_report(bb, names=DEFAULT_SETS) -> dict[str, dict]:
    from fewshot.registry import load_dataset
    from fewshot.sampling import subsample_classes

    out = {}
    for name in names:
        ds_name, _, half = name.partition(":")
        ds = load_dataset(ds_name)
        if half:
            classnames, (items,) = subsample_classes("new" if half == "novel" else "base", ds.test)
        else:
            classnames, items = list(ds.classnames), ds.test
        acc = zero_shot_accuracy(bb, classnames, items, ds_name)
        out[name] = {"acc": round(acc, 2), "chance": round(100.0 / len(classnames), 2), "classes": len(classnames)}
    return out
