"""Optimizer, learning-rate schedule and loaders of one trial, built from a ``TrainConfig``.

* ``build_optimizer``: sgd (momentum, weight decay) / adam / adamw (betas, eps, weight decay) over
  the method's ``param_groups`` (a group's own ``lr``/``weight_decay`` wins over the config's).
* ``build_scheduler``: a per-step ``LambdaLR``. Total steps = ``max_iters`` or ``epochs * steps per
  epoch``; warm-up = ``warmup_iters`` or ``round(warmup_epochs * steps per epoch)`` steps, either
  constant at ``warmup_lr`` (CoOp/Dassl) or linear from ``warmup_lr`` to ``lr``; then cosine from
  ``lr`` to ``min_lr`` over the total steps (``constant`` keeps ``lr``). Factors are relative to
  ``lr``, so groups with their own lr keep their ratio.
* ``train_loader``: batches ``(inputs, labels, indices)`` — ``indices`` each sample's position in the
  training split (``IndexedDataset``), which the trial passes to ``training_loss`` so a method can pair a
  sample with per-image data it read in ``prepare`` (TGP-T's captions); seeded shuffling generator,
  ``drop_last`` only when ``len >= batch_size``; in-memory datasets (cached features) are loaded without
  worker processes.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from fewshot.errors import ConfigError
from methods.base import TrainConfig


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not groups:
        raise ConfigError(
            "the method has no trainable parameters; use a method with trains_by_gradient=False or "
            "check its configuration"
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return int(cfg.max_iters) if cfg.max_iters else int(cfg.epochs) * steps_per_epoch


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based)."""
    total = max(1, total_steps(cfg, steps_per_epoch))
    warm = cfg.warmup_iters if cfg.warmup_iters is not None else int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        w = cfg.warmup_lr / cfg.lr
        return w if cfg.warmup_type == "constant" else w + (1.0 - w) * step / max(1, warm)
    if cfg.scheduler == "constant":
        return 1.0
    lo = cfg.min_lr / cfg.lr
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, steps_per_epoch))


def _workers(data: Dataset, cfg: TrainConfig) -> int:
    return 0 if getattr(data, "in_memory", False) else cfg.num_workers  # cached features need no workers


class IndexedDataset(Dataset):
    """``(input, label, index)`` for each sample of ``data``: the index is the sample's position in ``data``, whose
    ``items`` (when it has them: ``ImageDataset``, ``FeatureDataset``) name the image at that position."""

    def __init__(self, data: Dataset):
        self.data = data

    @property
    def items(self):
        return getattr(self.data, "items", None)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, label = self.data[index]
        return x, label, index


def train_loader(data: Dataset, cfg: TrainConfig, generator: torch.Generator) -> DataLoader:
    """Shuffled training batches ``(inputs, labels, indices)`` over ``data`` (see the module docstring)."""
    return DataLoader(
        IndexedDataset(data),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=cfg.drop_last and len(data) >= cfg.batch_size,
        num_workers=_workers(data, cfg),
        persistent_workers=False,
    )


def eval_loader(data: Dataset, cfg: TrainConfig) -> DataLoader:
    return DataLoader(data, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=_workers(data, cfg))
