"""Per-method defaults as data: ``methods/defaults/<method>.yaml`` resolved for one cell.

File format::

    train:   {optimizer: sgd, lr: 0.002, batch_size: 32, epochs: 200}   # TrainConfig fields
    method:  {n_ctx: 16, ctx_init: null}                               # the method's Config fields
    overrides:                                                          # applied in order
      - when: {shots: [1]}                 # keys: dataset, shots, protocol (lists = any of)
        train: {epochs: 50}
      - when: {dataset: [imagenet], protocol: [base2novel]}
        train: {epochs: 50}
        method: {n_ctx: 4, ctx_init: "a photo of a"}

``_datasets.yaml`` in the same folder holds the training settings that follow from a dataset, not a
method (the offline sets' crop range), in the same format without ``method``: it is applied first, so a
method's own file can still override them. A ``dataset`` value may be a shell-style pattern
(``shapes-*``).

``resolve(method, dataset, shots, protocol)`` returns ``(train_dict, method_dict)``; later
overrides win; user overrides (spec / ``--set``) are applied on top by the caller, after
``schedule_overrides``: an explicit ``epochs`` sets the schedule even where the defaults train by
iterations (TGP-T's ``max_iters``), and ``epochs`` with a ``max_iters`` is refused — neither is ever
silently ignored.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from fewshot.errors import ConfigError

DEFAULTS_DIR = Path(__file__).parent / "defaults"
_WHEN_KEYS = {"dataset", "shots", "protocol"}
#: the file (without .yaml) of the settings every method takes from the dataset, applied before the method's
DATASET_DEFAULTS = "_datasets"


@lru_cache(maxsize=None)
def _load(method: str) -> dict:
    path = DEFAULTS_DIR / f"{method}.yaml"
    if not path.exists():
        return {"train": {}, "method": {}, "overrides": []}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    unknown = set(data) - {"train", "method", "overrides"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)} (allowed: train, method, overrides)")
    for i, ov in enumerate(data.get("overrides") or []):
        bad = set(ov.get("when", {})) - _WHEN_KEYS
        if bad:
            raise ConfigError(
                f"{path}: overrides[{i}].when has unknown key(s) {sorted(bad)} (allowed: {sorted(_WHEN_KEYS)})"
            )
    return data


def _matches(when: dict, ctx: dict) -> bool:
    for key, allowed in when.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        value = ctx.get(key)
        if not any(value == a or (key == "dataset" and isinstance(a, str) and fnmatchcase(value, a)) for a in allowed):
            return False
    return True


def _apply(data: dict, ctx: dict, train: dict, meth: dict) -> None:
    train.update(data.get("train") or {})
    meth.update(data.get("method") or {})
    for ov in data.get("overrides") or []:
        if _matches(ov.get("when") or {}, ctx):
            train.update(ov.get("train") or {})
            meth.update(ov.get("method") or {})


def resolve(method: str, dataset: str, shots: int, protocol: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Default (train, method) hyperparameter dicts for one cell: the dataset-wide settings, then the method's."""
    train: dict[str, Any] = {}
    meth: dict[str, Any] = {}
    ctx = {"dataset": dataset, "shots": shots, "protocol": protocol}
    _apply(_load(DATASET_DEFAULTS), ctx, train, meth)
    _apply(_load(method), ctx, train, meth)
    return train, meth


def schedule_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """User ``overrides`` with the schedule rule applied (``max_iters`` beats ``epochs`` in ``TrainConfig``):

    * ``epochs`` without ``max_iters``: train for those epochs — a default iteration budget is cleared
      (``max_iters: None``), so ``--set epochs=1`` on TGP-T trains one epoch, not 12,800 iterations;
    * ``epochs`` with a ``max_iters`` (not null): ConfigError, one of them would be ignored.
    """
    if "epochs" not in overrides:
        return dict(overrides)
    if overrides.get("max_iters") is not None:
        raise ConfigError(
            f"epochs={overrides['epochs']} and max_iters={overrides['max_iters']} are both set and max_iters "
            "would win: set only one of them (max_iters: null trains for the epochs)"
        )
    return {**overrides, "max_iters": None}
