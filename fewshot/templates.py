"""Hand-crafted prompt templates per dataset (data.md §1.4): CoOp zero-shot, KgCoOp, SEP "ori",
and CoOp's ZeroshotCLIP2 ensemble (7 ImageNet "select" templates + the dataset's own).

Templates contain one ``{}`` for the class name (callers replace ``_`` by a space first).
"""

from __future__ import annotations

from fewshot.errors import ConfigError

COOP = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "digits": "a photo of the digit {}.",
    "shapes": "a photo of a {}.",
}
KGCOOP = {**COOP, "dtd": "a photo of a {}, a type of texture."}
SEP = {
    **KGCOOP,
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "stanford_cars": "a photo of a {}, a type of car.",
    "food101": "a photo of a {}, a type of food.",
}
KINDS = {"coop": COOP, "kgcoop": KGCOOP, "sep": SEP}
IMAGENET_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def _key(dataset: str) -> str:
    key = "shapes" if dataset.startswith("shapes-") else dataset
    if key not in COOP:
        raise ConfigError(f"no templates for dataset '{dataset}': choose one of {', '.join(COOP)} (or shapes-<N>)")
    return key


def template(dataset: str, kind: str = "coop") -> str:
    """The single hand-crafted template of ``dataset`` for ``kind`` in coop | kgcoop | sep."""
    if kind not in KINDS:
        raise ConfigError(f"unknown template kind '{kind}': choose one of {', '.join(KINDS)}")
    return KINDS[kind][_key(dataset)]


def ensemble_templates(dataset: str) -> list[str]:
    """CoOp ZeroshotCLIP2: the 7 ImageNet select templates plus the dataset's own (not for ImageNet)."""
    key = _key(dataset)
    return list(IMAGENET_SELECT) if key == "imagenet" else IMAGENET_SELECT + [COOP[key]]
