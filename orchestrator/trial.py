"""One trial: train one method on one few-shot split and evaluate it (``run_trial``), plus its CLI.

``run_trial(req, *, output_dir=None, report=None, resume_from=None) -> dict`` (docs/architecture.md):

1. seeds python/numpy/torch with ``req.seed``; the few-shot split is ``fewshot_split(ds, shots, seed)``
   (Dassl's rule); base2novel keeps the base half for train/val/base test (``subsample_classes``);
2. configuration = ``methods.defaults.resolve`` for the cell, then ``req.overrides`` (each key is a
   ``TrainConfig`` field or a field of the method's ``Config``; unknown keys and bad values are
   ``ConfigError``);
3. gradient methods train for ``epochs`` (or ``max_iters``) with the optimizer/schedule of
   ``orchestrator.training``, one ``training_loss(images, labels, indices=...)`` per step (``indices``: each
   sample's position in the training split, for methods that pair it with per-image data); after every epoch the val accuracy is measured, a checkpoint written
   (when ``output_dir`` is given) and ``report(metrics, checkpoint_dir)`` called; a NaN/inf loss stops
   at once (``TrainingError`` with ``error_class="nan_loss"``); ``selection: best_val`` evaluates the
   best-val state. With ``max_trial_s`` a run of the trial that passes that much wall time (checked before
   every step and evaluation batch) stops with ``TrainingError`` (``error_class="timeout"``). Methods with
   ``trains_by_gradient=False`` get one ``fit`` call and no epochs, on the
   training images through the evaluation transform (as CoOp's lpclip extracts its features);
4. ``stage="final"`` then evaluates the test split(s): ``test_acc`` (fewshot), ``base_acc``/
   ``novel_acc``/``hm`` (base2novel), ``test_acc`` + ``acc_<target>`` + ``target_avg`` (cross_dataset,
   domain_generalization: each target's full test set with ``set_classnames(its names, target)``, so
   with the target's own templates). A target that fails is recorded (``failed_targets``, error class
   ``target_failed``) without discarding the others. ``stage="search"`` never builds a test loader
   (``test_images_read`` = 0). An empty train/val/test split is ``EmptySplitError`` (error class
   ``empty_split``), never an accuracy.

CLI: ``python -m orchestrator.trial --method coop --dataset digits --shots 4 --seed 1 [--set k=v] --json``
prints the final metrics as JSON on the last stdout line; user errors print ``error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field, ValidationError

from fewshot.errors import CheckpointError, ConfigError, EmptySplitError, TrainingError, UserError, error_line
from fewshot.protocols import TRANSFER_PROTOCOLS, Protocol
from methods.backbone import TINY_ARCH
from methods.base import PromptMethod, StrictModel, TrainConfig
from orchestrator import checkpoint as ckpt
from orchestrator import training

Report = Callable[[dict, Optional[Path]], None]


class BackboneRef(StrictModel):
    arch: str = TINY_ARCH
    pretrained: Optional[str] = None


class TrialRequest(StrictModel):
    """Everything that defines one trial."""

    method: str
    dataset: str
    shots: int = Field(16, ge=1)
    seed: int = 1
    protocol: Protocol = "fewshot"
    stage: Literal["search", "final"] = "final"
    backbone: BackboneRef = Field(default_factory=BackboneRef)
    data_root: Optional[str] = None
    targets: Optional[list[str]] = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def _validation_message(exc: ValidationError, what: str) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    return f"invalid {what} '{loc}': {e['msg']} (got {e.get('input')!r})"


#: reliability tests inject a fault from outside the spec (which a retry must be able to keep unchanged):
#: ``method=coop,stage=final,fault=nan_loss`` sets ``fault`` on the trials that match every given field
FAULT_ENV = "PROMPTSWEEP_FAULT_INJECT"


def injected_fault(req: TrialRequest) -> dict[str, Any]:
    """The ``fault`` training setting ``$PROMPTSWEEP_FAULT_INJECT`` gives this trial (a test hook), or nothing."""
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text:
        return {}
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    fault = fields.pop("fault", None)
    if fault and all(str(getattr(req, k, None)) == v for k, v in fields.items()):
        return {"fault": fault}
    return {}


def build_configs(req: TrialRequest, method_cls) -> tuple[TrainConfig, Any]:
    """Defaults for the cell, then ``req.overrides``; ConfigError for unknown keys or bad values."""
    from methods.defaults import resolve, schedule_overrides

    train, meth = resolve(req.method, req.dataset, req.shots, req.protocol)
    tf, mf = TrainConfig.model_fields, method_cls.Config.model_fields
    for key, value in schedule_overrides(req.overrides).items():
        if key in tf:
            train[key] = value
        elif key in mf:
            meth[key] = value
        else:
            raise ConfigError(
                f"unknown setting '{key}' for method {req.method} (valid: training "
                f"{', '.join(sorted(tf))}; method {', '.join(sorted(mf)) or '(none)'})"
            )
    train.update(injected_fault(req))
    try:
        train_cfg = TrainConfig(**train)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, "training setting")) from None
    try:
        method_cfg = method_cls.Config(**meth)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, f"{req.method} setting")) from None
    method_cls.check_training(train_cfg, method_cfg)
    return train_cfg, method_cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(req: TrialRequest) -> torch.device:
    if req.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available (use device auto or cpu)")
    if req.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(req.device)


def _autocast(device: torch.device, cfg: TrainConfig):
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class TimeLimit:
    """``TrainConfig.max_trial_s`` for one run of a trial: ``check`` raises ``TrainingError`` (error class
    ``timeout``) once that much wall time has passed since ``t0`` (checked per step and per evaluation batch)."""

    def __init__(self, cfg: TrainConfig, t0: float):
        self.limit_s = cfg.max_trial_s
        self.t0 = t0

    def check(self, where: str) -> None:
        if self.limit_s is not None and time.time() - self.t0 > self.limit_s:
            raise TrainingError(
                f"the trial ran past its time limit max_trial_s={self.limit_s:g} s ({where}); raise "
                "max_trial_s (train.defaults or --set max_trial_s=SECONDS) or remove it",
                error_class="timeout",
            )


@torch.no_grad()
def evaluate(
    method,
    loader,
    device: torch.device,
    cfg: TrainConfig,
    what: str = "the evaluation split",
    limit: Optional[TimeLimit] = None,
) -> float:
    """Top-1 accuracy in percent over ``loader`` (micro average); ``EmptySplitError`` (error class
    ``empty_split``) when it holds no image — an accuracy over nothing is not 0 %. ``limit`` is checked per batch."""
    method.eval()
    correct = total = 0
    for images, labels in loader:
        if limit is not None:
            limit.check(f"evaluating {what}")
        with _autocast(device, cfg):
            logits = method(images.to(device))
        correct += int((logits.float().argmax(-1).cpu() == labels).sum())
        total += len(labels)
    if total == 0:
        raise EmptySplitError(
            f"{what} has no images: nothing to score (check the dataset with python -m fewshot check)"
        )
    return 100.0 * correct / total


def _data(req: TrialRequest):
    """(train classnames, train items, val items, test sets) for the protocol: ``(key, dataset, load)`` per
    test set, ``load() -> (classnames, test items)`` reading a target only when it is scored (so a target
    that cannot be read fails alone)."""
    from fewshot.registry import load_dataset
    from fewshot.sampling import fewshot_split, subsample_classes

    ds = load_dataset(req.dataset, req.data_root)
    split = fewshot_split(ds, req.shots, req.seed)
    if req.protocol == "base2novel":
        names, (train, val, test) = subsample_classes("base", split.train, split.val, ds.test)
        novel_names, (_, novel_test) = subsample_classes("new", split.train, ds.test)
        return (
            names,
            train,
            val,
            [("base", req.dataset, lambda: (names, test)), ("novel", req.dataset, lambda: (novel_names, novel_test))],
        )

    def target(name: str):
        tds = load_dataset(name, req.data_root)
        return list(tds.classnames), tds.test

    tests = [("source", req.dataset, lambda: (list(ds.classnames), ds.test))]
    if req.protocol in TRANSFER_PROTOCOLS:
        tests += [(f"acc_{t}", t, lambda t=t: target(t)) for t in req.targets or []]
    return list(ds.classnames), split.train, split.val, tests


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))
    )


class _Stepper:
    """Forward + backward of one optimizer step, in micro-batches after an out-of-memory retry.

    ``step`` zeroes the gradients and accumulates ``loss_chunk * len(chunk) / len(batch)`` over
    micro-batches of ``micro`` samples (the whole batch until an OOM), so the gradient is the full
    batch's for losses that average over samples; it returns the batch loss as a float (the one
    host sync of the step). ``on_oom`` halves ``micro`` (``oom_retry``) or raises ``TrainingError``
    with error class ``oom``. The ``fault*`` settings inject NaN/inf losses and OOMs for tests.
    """

    def __init__(self, method, opt, cfg: TrainConfig, device: torch.device):
        self.method, self.opt, self.cfg, self.device = method, opt, cfg, device
        self.micro: Optional[int] = None  # None = whole batch

    def step_retrying(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, step: int) -> float:
        """``step``, retried with smaller micro-batches after each out-of-memory (``on_oom``)."""
        while True:
            try:
                return self.step(images, labels, indices, step)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if not is_oom(exc):
                    raise
                self.on_oom(exc, step)

    def step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, step: int) -> float:
        cfg, n = self.cfg, len(labels)
        size = n if self.micro is None else min(self.micro, n)
        self.opt.zero_grad(set_to_none=True)
        total = None
        for i in range(0, n, size):
            x, y, idx = images[i : i + size], labels[i : i + size], indices[i : i + size]
            if cfg.fault == "oom" and step >= cfg.fault_step and len(y) > cfg.fault_oom_batch:
                raise torch.OutOfMemoryError(f"injected out-of-memory for a micro-batch of {len(y)} (fault: oom)")
            with _autocast(self.device, cfg):
                loss, _parts = self.method.training_loss(x, y, indices=idx)
            if cfg.fault in ("nan_loss", "inf_loss") and step >= cfg.fault_step:
                loss = loss + (float("nan") if cfg.fault == "nan_loss" else float("inf"))
            part = loss * (len(y) / n)
            part.backward()
            total = part.detach() if total is None else total + part.detach()
        return float(total)

    def on_oom(self, exc: BaseException, step: int) -> None:
        import gc

        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        current = self.micro or self.cfg.batch_size
        if not self.cfg.oom_retry or current <= 1:
            raise TrainingError(
                f"out of memory at step {step} with a micro-batch of {current}: lower batch_size, set "
                f"oom_retry: true (smaller micro-batches, same effective batch), or give each trial "
                f"more GPU memory (fewer trials per GPU) ({str(exc)[:200]})",
                error_class="oom",
            ) from None
        self.micro = max(1, current // 2)
        print(
            f"[trial] out of memory at step {step}: retrying with micro-batches of {self.micro}",
            file=sys.stderr,
            flush=True,
        )


class _Views:
    """The trial's datasets: images through the transforms, or — for methods with frozen image
    features — cached features (``orchestrator.feature_cache``; eval exact, train views optional)."""

    def __init__(self, bb, cls, cfg: TrainConfig, device: torch.device):
        from fewshot.transforms import clip_transform

        self.bb, self.cls, self.cfg, self.device = bb, cls, cfg, device
        self.train_tf = clip_transform(bb.image_size, train=True, crop_scale=cfg.crop_scale)
        self.eval_tf = clip_transform(bb.image_size, train=False)
        self.cache = None
        if cls.frozen_image_features and cfg.feature_cache:
            from orchestrator.feature_cache import FeatureCache

            self.cache = FeatureCache()

    def _features(self, items, transform, view: str, split: str, seed=None):
        from orchestrator.feature_cache import cached_split

        return cached_split(
            self.cache,
            self.bb,
            items,
            transform,
            view,
            split,
            self.cfg.eval_batch_size,
            self.cfg.num_workers,
            lambda: _autocast(self.device, self.cfg),
            self.device.type,
            seed,
            encode=self.cls.frozen_image_output,
            output=self.cls.frozen_output_kind,
        )

    def eval(self, items, split: str):
        from fewshot.images import ImageDataset

        if self.cache is None:
            return ImageDataset(items, self.eval_tf, split=split)
        from orchestrator.feature_cache import FeatureDataset

        return FeatureDataset(
            [self._features(items, self.eval_tf, "eval", split)], [it.label for it in items], split, items=items
        )

    def train(self, items):
        from fewshot.images import ImageDataset

        k = self.cfg.train_feature_views
        if self.cache is None or not k:
            return ImageDataset(items, self.train_tf, split="train")
        from orchestrator.feature_cache import FeatureDataset

        lo, hi = self.cfg.crop_scale  # part of a view's key: views drawn with another crop range are other views
        views = [
            self._features(items, self.train_tf, f"train-{i}-crop{lo:g}-{hi:g}", "train", seed=1000 + i)
            for i in range(k)
        ]
        return FeatureDataset(views, [it.label for it in items], "train", items=items)


@dataclass
class _Run:
    """One run of a trial once built (``_build``): its settings, method, datasets and loaders, and the
    validation images it has scored (part of its cost: ``images_evaluated``)."""

    req: TrialRequest
    cls: type
    train_cfg: TrainConfig
    limit: TimeLimit
    device: torch.device
    classnames: list[str]
    test_sets: list
    views: _Views
    method: PromptMethod
    train_ds: Any
    loader: Any
    val_loader: Any
    gen: torch.Generator
    state: Optional[dict]  # the checkpoint this run resumes from
    resume_from: Optional[Path]
    val_images: int = 0

    def val_acc(self) -> float:
        acc = evaluate(
            self.method,
            self.val_loader,
            self.device,
            self.train_cfg,
            f"the validation split of {self.req.dataset}",
            self.limit,
        )
        self.val_images += len(self.val_loader.dataset)
        return acc


@dataclass
class _Progress:
    """Where training stands — what a checkpoint saves and a resume restores (epochs, step, best and last val) —
    plus this run's own counts: examples stepped, seconds in its training loops, the micro-batch OOM retries
    left it with."""

    epochs_run: int = 0
    step: int = 0
    best_val: float = -1.0
    best_state: Optional[dict] = None
    last_val: Optional[float] = None
    train_images: int = 0
    train_s: float = 0.0
    micro_batch: Optional[int] = None

    def keep_if_best(self, val: Optional[float], method: PromptMethod) -> None:
        """Remember the method's state when ``val`` beats the best validation accuracy so far."""
        if val is not None and val > self.best_val:
            self.best_val, self.best_state = val, copy.deepcopy(method.trainable_state_dict())


@dataclass
class _Schedule:
    """The optimizer, its per-step learning-rate schedule and the trial's length in steps and epochs."""

    opt: torch.optim.Optimizer
    sched: Any
    steps_per_epoch: int
    n_total: int
    n_epochs: int


def run_trial(
    req: TrialRequest,
    *,
    output_dir: Optional[Path] = None,
    report: Optional[Report] = None,
    resume_from: Optional[Path] = None,
) -> dict:
    """Run one trial and return its final metrics (see the module docstring): ``_build`` (settings, checkpoint,
    data, method), then ``_train`` (epochs of ``_train_step``s, each epoch ended by ``_end_epoch``) or ``_fit``,
    then ``_final_metrics`` (with ``_test``)."""
    t0 = time.time()
    report = report or (lambda metrics, checkpoint_dir=None: None)
    run = _build(req, t0, resume_from)
    progress = _train(run, output_dir, report) if run.cls.trains_by_gradient else _fit(run)
    final = _final_metrics(run, progress, t0)
    report(final, None)
    return final


def _method_class(req: TrialRequest):
    """The request's method class; ConfigError when it cannot run the request's protocol."""
    from methods.registry import get_method

    cls = get_method(req.method)
    if req.protocol not in cls.protocols:
        raise ConfigError(
            f"method {req.method} does not support protocol {req.protocol} (it supports: {', '.join(cls.protocols)})"
        )
    if req.protocol in TRANSFER_PROTOCOLS and not req.targets:
        raise ConfigError(
            f"protocol {req.protocol} needs targets: the datasets to evaluate on (e.g. --target imagenet_v2)"
        )
    return cls


def _build(req: TrialRequest, t0: float, resume_from: Optional[Path]) -> _Run:
    """Settings, checkpoint (read before anything heavy), seeded backbone, splits, method and loaders."""
    from methods.backbone import load_backbone

    cls = _method_class(req)
    train_cfg, method_cfg = build_configs(req, cls)
    limit = TimeLimit(train_cfg, t0)
    device = _device(req)
    state = ckpt.load(resume_from) if resume_from is not None else None

    seed_everything(req.seed)
    bb = load_backbone(req.backbone.arch, req.backbone.pretrained, device)
    classnames, train_items, val_items, test_sets = _data(req)
    views = _Views(bb, cls, train_cfg, device)
    if not val_items:
        raise EmptySplitError(
            f"the {req.shots}-shot validation split of {req.dataset} (seed {req.seed}) is empty: the "
            "dataset has no val images (check it with python -m fewshot check)"
        )
    # closed-form methods (the linear probe) fit on the training images as evaluated — centre crops, as CoOp's
    # lpclip extracts its features — not on random augmentations; gradient methods train on augmented views
    train_ds = views.train(train_items) if cls.trains_by_gradient else views.eval(train_items, "train")
    val_loader = training.eval_loader(views.eval(val_items, "val"), train_cfg)

    torch.manual_seed(req.seed)
    method = cls(bb, classnames, req.dataset, method_cfg)
    gen = torch.Generator().manual_seed(req.seed)
    loader = training.train_loader(train_ds, train_cfg, gen)
    if len(train_ds) == 0:
        raise EmptySplitError(f"the {req.shots}-shot training split of {req.dataset} is empty")
    return _Run(
        req,
        cls,
        train_cfg,
        limit,
        device,
        classnames,
        test_sets,
        views,
        method,
        train_ds,
        loader,
        val_loader,
        gen,
        state,
        resume_from,
    )


def _fit(run: _Run) -> _Progress:
    """A closed-form method: one ``fit`` on the training split, then the validation accuracy."""
    progress = _Progress()
    run.method.prepare(run.loader)
    run.method.fit(run.loader, run.val_loader)
    if type(run.method).fit is not PromptMethod.fit:  # a closed-form fit reads the training split once
        progress.train_images = len(run.train_ds)
    run.limit.check("after fitting")
    progress.last_val = run.val_acc()
    return progress


def _train(run: _Run, output_dir: Optional[Path], report: Report) -> _Progress:
    """A gradient method: epochs from the checkpoint (or the start) to the schedule's end, each validated,
    checkpointed and reported; then, with ``selection: best_val``, the best-val state is the one kept."""
    run.method.prepare(run.loader)
    schedule = _schedule(run)
    progress = _restore(run, schedule) if run.state is not None else _Progress()
    stepper = _Stepper(run.method, schedule.opt, run.train_cfg, run.device)
    prev_dir = None
    for epoch in range(progress.epochs_run, schedule.n_epochs):
        train_loss = _run_epoch(run, schedule, stepper, progress, epoch)
        progress.epochs_run = epoch + 1
        ckpt_dir = _end_epoch(run, schedule, progress, train_loss, output_dir, report)
        if prev_dir is not None and prev_dir != ckpt_dir:
            shutil.rmtree(prev_dir, ignore_errors=True)  # only the newest checkpoint is kept
        prev_dir = ckpt_dir
        if progress.step >= schedule.n_total:
            break
    progress.micro_batch = stepper.micro
    if run.train_cfg.selection == "best_val" and progress.best_state is not None:
        run.method.load_trainable_state_dict(progress.best_state)
        progress.last_val = progress.best_val
    return progress


def _schedule(run: _Run) -> _Schedule:
    cfg = run.train_cfg
    opt = training.build_optimizer(run.method.param_groups(cfg), cfg)
    steps_per_epoch = len(run.loader)
    sched = training.build_scheduler(opt, cfg, steps_per_epoch)
    n_total = training.total_steps(cfg, steps_per_epoch)
    n_epochs = math.ceil(n_total / steps_per_epoch) if cfg.max_iters else cfg.epochs
    return _Schedule(opt, sched, steps_per_epoch, n_total, n_epochs)


def _restore(run: _Run, schedule: _Schedule) -> _Progress:
    """Method, optimizer, schedule, progress and RNG states from the checkpoint the run resumes from."""
    state = run.state
    try:
        run.method.load_trainable_state_dict(state["method"])
        schedule.opt.load_state_dict(state["optimizer"])
        schedule.sched.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {run.resume_from} does not fit this trial ({run.req.method}, its "
            f"configuration): {str(exc)[:200]}; resume only with the same request"
        ) from None
    progress = _Progress(
        epochs_run=state["epoch"],
        step=state["step"],
        best_val=state["best_val"],
        best_state=state.get("best_state"),
        last_val=state.get("last_val"),
    )
    ckpt.restore_rng(state["rng"], run.gen)
    return progress


def _run_epoch(run: _Run, schedule: _Schedule, stepper: "_Stepper", progress: _Progress, epoch: int) -> float:
    """Train epoch ``epoch`` (up to the schedule's last step); returns its mean training loss. With
    ``selection: best_val`` and ``eval_every_iters`` the best state is also looked for within the epoch."""
    cfg = run.train_cfg
    if hasattr(run.train_ds, "set_epoch"):
        run.train_ds.set_epoch(epoch)  # cached augmented views: epoch e trains on view e mod k
    run.method.train()
    total_loss, seen = 0.0, 0
    loop_t0, val_s = time.perf_counter(), 0.0
    for images, labels, indices in run.loader:
        if progress.step >= schedule.n_total:
            break
        loss_value = _train_step(run, schedule, stepper, progress, epoch, images, labels, indices)
        total_loss += loss_value * len(labels)
        seen += len(labels)
        if _validates_mid_epoch(cfg, progress.step, schedule.steps_per_epoch):
            val_t0 = time.perf_counter()
            progress.keep_if_best(run.val_acc(), run.method)
            run.method.train()
            val_s += time.perf_counter() - val_t0
    progress.train_s += time.perf_counter() - loop_t0 - val_s
    progress.train_images += seen
    return total_loss / max(1, seen)


def _validates_mid_epoch(cfg: TrainConfig, step: int, steps_per_epoch: int) -> bool:
    """True after a step ``eval_every_iters`` asks to validate at (an epoch's last step is validated anyway)."""
    return bool(
        cfg.selection == "best_val"
        and cfg.eval_every_iters
        and step % cfg.eval_every_iters == 0
        and step % steps_per_epoch != 0
    )


def _train_step(
    run: _Run,
    schedule: _Schedule,
    stepper: "_Stepper",
    progress: _Progress,
    epoch: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
) -> float:
    """One optimizer step (time limit checked first; NaN/inf loss stops the trial); returns the batch loss."""
    cfg, where = run.train_cfg, f"at epoch {epoch + 1} step {progress.step + 1}"
    run.limit.check(where)
    batch = (images.to(run.device), labels.to(run.device), indices.to(run.device))
    loss_value = stepper.step_retrying(*batch, progress.step + 1)
    if not math.isfinite(loss_value):
        raise TrainingError(
            f"loss became {loss_value} {where}: lower the learning rate (lr={cfg.lr}) or enable grad_clip",
            error_class="nan_loss",
        )
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in schedule.opt.param_groups for p in g["params"]], cfg.grad_clip)
    schedule.opt.step()
    schedule.sched.step()
    progress.step += 1
    return loss_value


def _end_epoch(
    run: _Run, schedule: _Schedule, progress: _Progress, train_loss: float, output_dir: Optional[Path], report: Report
) -> Optional[Path]:
    """Validate, keep the best state, write the checkpoint (with ``output_dir``) and report the epoch's metrics;
    returns the checkpoint directory."""
    progress.last_val = run.val_acc()
    progress.keep_if_best(progress.last_val, run.method)
    metrics = {
        "epoch": progress.epochs_run,
        "train_loss": train_loss,
        "lr": schedule.opt.param_groups[0]["lr"],
        "step": progress.step,
    }
    if progress.last_val is not None:
        metrics["val_acc"] = progress.last_val
    ckpt_dir = _save_checkpoint(run, schedule, progress, output_dir) if output_dir is not None else None
    print(
        f"[trial] epoch {progress.epochs_run}/{schedule.n_epochs} loss {train_loss:.4f}"
        + (f" val {progress.last_val:.2f}" if progress.last_val is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    report(metrics, ckpt_dir)
    return ckpt_dir


def _save_checkpoint(run: _Run, schedule: _Schedule, progress: _Progress, output_dir: Path) -> Path:
    """``<output_dir>/checkpoints/epoch_NNNN``: everything ``_restore`` reads back (``orchestrator.checkpoint``)."""
    return ckpt.save(
        Path(output_dir) / "checkpoints" / f"epoch_{progress.epochs_run:04d}",
        {
            "method": run.method.trainable_state_dict(),
            "optimizer": schedule.opt.state_dict(),
            "scheduler": schedule.sched.state_dict(),
            "epoch": progress.epochs_run,
            "step": progress.step,
            "best_val": progress.best_val,
            "best_state": progress.best_state,
            "last_val": progress.last_val,
            "rng": ckpt.rng_state(run.gen),
        },
    )


def _final_metrics(run: _Run, progress: _Progress, t0: float) -> dict:
    """The trial's result: validation accuracy, cost in images and time, test accuracies (``stage="final"``) and
    the method's run notes."""
    final: dict[str, Any] = {
        "val_acc": progress.last_val,
        "epochs_run": progress.epochs_run,
        "images_trained": progress.train_images,
    }
    if progress.train_images and run.cls.trains_by_gradient:  # training throughput (data loading in; validation not)
        final.update(
            train_images=progress.train_images, train_images_per_s=progress.train_images / max(progress.train_s, 1e-9)
        )
    if progress.micro_batch is not None:
        final["micro_batch"] = progress.micro_batch  # out-of-memory retries shrank it (gradients accumulated)
    if run.req.stage == "final":
        final.update(_test(run.req, run.method, run.views, run.test_sets, run.train_cfg, run.device, run.limit))
        run.method.set_classnames(run.classnames, run.req.dataset)
    final.setdefault("test_images_read", 0)
    final["images_evaluated"] = run.val_images + final["test_images_read"]
    notes = run.method.run_notes()
    if notes:
        final["run_notes"] = json.dumps(notes, sort_keys=True)
    final["wall_time_s"] = time.time() - t0
    return final


def _test(
    req: TrialRequest,
    method,
    views: "_Views",
    test_sets: list,
    cfg: TrainConfig,
    device: torch.device,
    limit: Optional[TimeLimit] = None,
) -> dict:
    """Score every test set, each with its own dataset's class names and templates. The source (and base /
    novel) failing fails the trial; a transfer target that fails (unreadable, empty) is recorded as
    ``failed_targets`` / error class ``target_failed`` and the other targets' accuracies are kept (then no
    ``target_avg``: an average over fewer targets is not the protocol's)."""
    results: dict[str, float] = {}
    failed: dict[str, str] = {}
    read = 0
    for key, dataset, load in test_sets:
        try:
            names, items = load()
            method.set_classnames(names, dataset)
            data = views.eval(items, "test")
            results[key] = evaluate(
                method, training.eval_loader(data, cfg), device, cfg, f"the test split of {dataset}", limit
            )
            read += data.images_read
        except UserError as exc:
            if not key.startswith("acc_") or getattr(exc, "error_class", None) == "timeout":
                raise
            failed[key[4:]] = f"{getattr(exc, 'error_class', type(exc).__name__)}: {exc}"
            print(f"[trial] target {key[4:]} failed: {exc}", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"test_images_read": read}
    if req.protocol == "base2novel":
        b, n = results["base"], results["novel"]
        out.update(base_acc=b, novel_acc=n, hm=2 * b * n / (b + n) if b + n > 0 else 0.0)
        return out
    out["test_acc"] = results.pop("source")
    out.update(results)
    if results and not failed:
        out["target_avg"] = sum(results.values()) / len(results)
    if failed:
        out["error_class"] = "target_failed"
        out["error_message"] = "; ".join(f"{t}: {why}" for t, why in failed.items())[:2000]
        out["failed_targets"] = ",".join(failed)
    return out


# ----------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.trial", description="run one prompt-tuning trial")
    ap.add_argument("--method", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--protocol", default="fewshot")
    ap.add_argument("--stage", default="final")
    ap.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="DATASET",
        help="evaluation dataset for cross_dataset / domain_generalization (repeatable)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", default=None, help="directory for checkpoints")
    ap.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--arch", default=TINY_ARCH)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the final metrics as JSON on the last line")
    return ap


def main(argv=None) -> int:
    from methods.__main__ import parse_sets

    args = _parser().parse_args(argv)
    try:
        try:
            req = TrialRequest(
                method=args.method,
                dataset=args.dataset,
                shots=args.shots,
                seed=args.seed,
                protocol=args.protocol,
                stage=args.stage,
                targets=args.targets,
                backbone=BackboneRef(arch=args.arch, pretrained=args.pretrained),
                data_root=args.data_root,
                overrides=parse_sets(args.set),
                device=args.device,
            )
        except ValidationError as exc:
            raise ConfigError(_validation_message(exc, "trial option")) from None
        from fewshot.registry import dataset_names
        from methods.registry import get_method

        get_method(req.method)
        if req.dataset not in dataset_names():
            raise ConfigError(f"unknown dataset '{req.dataset}' (valid: {', '.join(dataset_names())})")
        from fewshot.paths import check_cache_writable

        check_cache_writable()  # the split and feature caches are written there
        final = run_trial(
            req,
            output_dir=Path(args.output) if args.output else None,
            resume_from=Path(args.resume) if args.resume else None,
        )
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    print(json.dumps(final) if args.json else "\n".join(f"{k}: {v}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
