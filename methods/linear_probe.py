"""Linear-probe CLIP (spec methods.md §5, CoOp's ``lpclip``): logistic regression on frozen image features.

Owns the closed-form baseline: L2-regularised multinomial logistic regression (scikit-learn
``LogisticRegression``, lbfgs, ``max_iter`` 1000) on the frozen, L2-normalised CLIP image features
of the K-shot training split. The inverse regularisation strength C is chosen on the few-shot
validation split by CoOp's procedure:

1. coarse grid ``c_grid`` (default {1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6}): fit on train, score on val,
   keep the best (first on ties);
2. refinement by binary search in log10 space for ``search_steps`` (8) steps on
   [C*/10, C*·10]: the worse end moves to the log-midpoint and is refitted; the final C is the better
   end after the last step;
3. refit on the training features with the chosen C (the classifier that is kept).

``c`` in the config skips the search (a fixed C, e.g. when C itself is swept). With no validation
data and no fixed ``c`` the fit raises ``ConfigError``.

The fitted classifier lives in persistent buffers (``weight`` [C, E], ``bias`` [C], ``c_value``) so
``trainable_state_dict`` checkpoints and restores it; ``forward(images)`` returns
``features @ weight.T + bias`` (the classifier's decision function) as a torch tensor. Classes absent
from the training labels get a bias of -1e4 (never predicted). The classifier is tied to the
training classes, so the only protocol is ``fewshot`` and ``set_classnames`` with other names is a
``ConfigError``.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np
import torch
from pydantic import Field

from fewshot.errors import ConfigError
from methods.backbone import Backbone
from methods.base import MethodConfig, PromptMethod

#: bias given to classes that never occur in the training labels
_ABSENT_BIAS = -1e4


class LinearProbeConfig(MethodConfig):
    """Linear probe hyperparameters (no gradient training: TrainConfig's optimiser fields are unused)."""

    c_grid: list[float] = Field(
        default_factory=lambda: [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6],
        min_length=1,
        description="coarse grid of inverse regularisation strengths C",
    )
    search_steps: int = Field(8, ge=0, description="binary-search refinement steps around the best grid C")
    max_iter: int = Field(1000, ge=1, description="lbfgs iterations")
    c: Optional[float] = Field(None, gt=0, description="fixed C (skips the validation search)")


def _features(bb: Backbone, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for images, y, *_ in loader:  # a training loader's batches carry indices too
        feats.append(bb.encode_image(images, normalize=True).cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not feats:
        return np.zeros((0, bb.embed_dim), np.float32), np.zeros((0,), np.int64)
    return torch.cat(feats).numpy().astype(np.float64), torch.cat(labels).numpy().astype(np.int64)


class LinearProbe(PromptMethod):
    """Logistic regression on frozen CLIP image features, C selected on the few-shot val split."""

    name = "linear_probe"
    protocols = ("fewshot",)
    Config = LinearProbeConfig
    frozen_image_features = True
    trains_by_gradient = False

    def __init__(self, backbone: Backbone, classnames: list[str], dataset: str, cfg: LinearProbeConfig):
        super().__init__(backbone, classnames, dataset, cfg)
        n, e = len(self.classnames), backbone.embed_dim
        self.register_buffer("weight", torch.zeros(n, e, device=backbone.device))
        self.register_buffer("bias", torch.zeros(n, device=backbone.device))
        self.register_buffer("c_value", torch.zeros((), dtype=torch.float64, device=backbone.device))
        self.search_log: list[tuple[float, float]] = []  # (C, val accuracy %) in evaluation order

    # --- fitting ----------------------------------------------------------------------------
    def _fit_clf(self, x: np.ndarray, y: np.ndarray, c: float):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(solver="lbfgs", max_iter=self.cfg.max_iter, C=c).fit(x, y)

    def _score(self, x, y, xv, yv, c: float) -> float:
        acc = 100.0 * float((self._fit_clf(x, y, c).predict(xv) == yv).mean())
        self.search_log.append((c, acc))
        return acc

    def select_c(self, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> float:
        """CoOp's C search: coarse grid, then log-space binary search; returns the chosen C."""
        grid = list(self.cfg.c_grid)
        accs = [self._score(x, y, xv, yv, c) for c in grid]
        peak = grid[int(np.argmax(accs))]
        if self.cfg.search_steps == 0:
            return peak
        c_left, c_right = peak * 0.1, peak * 10.0
        acc_left, acc_right = self._score(x, y, xv, yv, c_left), self._score(x, y, xv, yv, c_right)
        c_final = c_right if acc_left < acc_right else c_left
        for _ in range(self.cfg.search_steps):
            mid = 10 ** (0.5 * (math.log10(c_left) + math.log10(c_right)))
            if acc_left < acc_right:
                c_final = c_right
                c_left, acc_left = mid, self._score(x, y, xv, yv, mid)
            else:
                c_final = c_left
                c_right, acc_right = mid, self._score(x, y, xv, yv, mid)
        return c_final

    def fit(self, train_loader: Iterable, val_loader: Optional[Iterable]) -> dict[str, float]:
        x, y = _features(self.backbone, train_loader)
        if len(y) == 0:
            raise ConfigError("linear_probe: the training loader is empty (check the dataset's few-shot train split)")
        if len(np.unique(y)) < 2:
            raise ConfigError(
                "linear_probe: the training split has a single class; logistic regression needs at least 2"
            )
        self.search_log = []
        if self.cfg.c is not None:
            c = float(self.cfg.c)
        else:
            xv, yv = _features(self.backbone, val_loader) if val_loader is not None else (None, np.zeros(0))
            if len(yv) == 0:
                raise ConfigError(
                    "linear_probe: no validation images to choose C on "
                    "(provide a few-shot val split, or set the method option c to a fixed value)"
                )
            c = self.select_c(x, y, xv, yv)
        clf = self._fit_clf(x, y, c)
        self._store(clf, c)
        train_acc = 100.0 * float((clf.predict(x) == y).mean())
        return {"c": c, "train_acc": train_acc, "c_evaluations": float(len(self.search_log))}

    def _store(self, clf, c: float) -> None:
        n, e = self.weight.shape
        w = torch.zeros(n, e, dtype=torch.float64)
        b = torch.full((n,), _ABSENT_BIAS, dtype=torch.float64)
        classes = [int(k) for k in clf.classes_]
        if max(classes) >= n or min(classes) < 0:
            raise ConfigError(f"linear_probe: training labels {classes} are outside 0..{n - 1} (class list mismatch)")
        coef, icpt = torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)
        if len(classes) == 2:  # sklearn's binary form: one score for classes_[1]
            w[classes[1]], b[classes[1]], b[classes[0]] = coef[0], icpt[0], 0.0
        else:
            for row, k in enumerate(classes):
                w[k], b[k] = coef[row], icpt[row]
        self.weight.copy_(w.to(self.weight))
        self.bias.copy_(b.to(self.bias))
        self.c_value.fill_(c)

    # --- inference --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.encode_image(images, normalize=True)
        return self.logits_from_features(feats)

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """The fitted classifier's decision function on normalised image features [B, E]."""
        return feats.float() @ self.weight.t() + self.bias

    def num_trainable(self) -> int:
        """The fitted (closed-form, not gradient-trained) classifier: C·E weights + C biases."""
        return self.weight.numel() + self.bias.numel()

    def param_breakdown(self) -> dict[str, int]:
        return {"classifier_weight": self.weight.numel(), "classifier_bias": self.bias.numel()}

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor] = None):
        raise ConfigError("linear_probe is fitted in closed form (fit); it has no gradient training step")

    @classmethod
    def tied_to_training_classes(cls, cfg) -> bool:
        return True

    def set_classnames(self, classnames: list[str], dataset: Optional[str] = None) -> None:
        if list(classnames) != self.classnames:
            raise ConfigError(
                "linear_probe: the fitted classifier only scores its training classes "
                "(use protocol fewshot; base2novel/cross-dataset need a text-based method)"
            )
