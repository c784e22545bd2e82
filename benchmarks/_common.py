"""Shared pieces of ``benchmarks/memory.py`` and ``benchmarks/step_time.py``.

* ``setup(arch, device)``: the frozen backbone through ``methods.backbone.load_backbone``;
* ``build(name, bb, n_classes, batch_size, dataset)``: a registered method with its project defaults
  (``methods.defaults.resolve`` for ``dataset`` / 16 shots / fewshot), synthetic class names
  ``"class 0" .. "class C-1"``, its ``prepare`` run on synthetic images (one per class, image i of class
  i, so SEP's prototypes cover every class; each image has a synthetic description in a temporary
  ``captions.txt``, so TGP-T's content loss is on as in a run with captions), and its optimizer from
  ``orchestrator.training.build_optimizer`` over ``method.param_groups``;
* ``train_step(...)``: one step exactly as ``orchestrator.trial`` runs it (autocast as the trial
  sets it — bf16 on CUDA, fp32 on CPU —, ``training_loss`` with the samples' indices — a synthetic
  sample of class c stands for image c of the prepared split —, ``zero_grad(set_to_none)``, backward,
  optional grad clipping, ``optimizer.step``);
* ``build_floor(bb, batch_size)`` / ``timed_step(built, images, labels)``: the *floor* — forward and
  backward through the frozen image tower to a learnable input perturbation (``step_time.py``'s
  baseline; ``packing.py``'s bare-backbone throughput) — and one synchronised, timed step;
* ``write_spec`` / ``run_sweep`` / ``trial_finals``: a generated sweep spec, ``python -m
  orchestrator.sweep`` on it in a subprocess, and each trial's final Tune result (``overhead.py``,
  ``packing.py``);
* ``emit(figures)``: prints the JSON object that is every benchmark's last stdout line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from torch import nn

from methods import towers
from methods.backbone import Backbone, load_backbone
from methods.base import MethodConfig, PromptMethod, TrainConfig
from methods.defaults import resolve
from methods.registry import get_method
from orchestrator import training
from orchestrator.trial import _autocast


def setup(arch: str, device: str) -> Backbone:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but no CUDA GPU is available")
    torch.manual_seed(0)
    return load_backbone(arch, None, device)


def synthetic_batch(bb: Backbone, batch_size: int, n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, bb.image_size, bb.image_size, generator=g)
    labels = torch.randint(0, n_classes, (batch_size,), generator=g)
    return images.to(bb.device), labels.to(bb.device)


class _SyntheticLoader:
    """One random image per class, in batches; ``.dataset.items`` names an image file per sample."""

    def __init__(self, bb: Backbone, classnames: list[str], batch_size: int, folder: Path):
        from fewshot.types import Item

        self.bb, self.batch_size, self.n = bb, batch_size, len(classnames)
        items = [Item(str(folder / f"img{i}.png"), i, c) for i, c in enumerate(classnames)]
        self.dataset = SimpleNamespace(items=items)
        (folder / "captions.txt").write_text(
            "".join(f"img{i}.png\ta small photo of {c} on a table\n" for i, c in enumerate(classnames))
        )

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        size = self.bb.image_size
        for start in range(0, self.n, self.batch_size):
            labels = torch.arange(start, min(self.n, start + self.batch_size))
            yield torch.randn(len(labels), 3, size, size, generator=g).to(self.bb.device), labels


@dataclass
class Built:
    name: str
    method: PromptMethod
    train_cfg: TrainConfig
    optimizer: torch.optim.Optimizer


def build(name: str, bb: Backbone, n_classes: int, batch_size: int, dataset: str = "imagenet") -> Built:
    """A registered gradient method with its default configuration, prepared, plus its optimizer."""
    cls = get_method(name)
    train, meth = resolve(name, dataset, 16, "fewshot")
    train_cfg = TrainConfig(**{**train, "batch_size": batch_size})
    classnames = [f"class {i}" for i in range(n_classes)]
    torch.manual_seed(0)
    method = cls(bb, classnames, dataset, cls.Config(**meth))
    with tempfile.TemporaryDirectory() as tmp:
        method.prepare(_SyntheticLoader(bb, classnames, max(batch_size, 64), Path(tmp)))
    method.train()
    return Built(name, method, train_cfg, training.build_optimizer(method.param_groups(train_cfg), train_cfg))


def train_step(b: Built, images: torch.Tensor, labels: torch.Tensor) -> float:
    """One optimisation step, as ``orchestrator.trial.run_trial`` runs it; returns the loss."""
    with _autocast(images.device, b.train_cfg):
        loss, _ = b.method.training_loss(images, labels, indices=labels)  # image c of the split is of class c
    b.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if b.train_cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(
            [p for g in b.optimizer.param_groups for p in g["params"]], b.train_cfg.grad_clip
        )
    b.optimizer.step()
    return float(loss.detach())


class Floor(PromptMethod):
    """Frozen image tower forward + backward to a learnable additive input perturbation."""

    name = "floor"

    def __init__(self, backbone: Backbone):
        super().__init__(backbone, [], "imagenet", MethodConfig())
        size = backbone.image_size
        self.delta = nn.Parameter(torch.zeros(3, size, size, device=backbone.device))

    def training_loss(self, images, labels, indices=None):
        feats = towers.encode_image(self.backbone, images + self.delta)
        loss = feats.float().square().mean()
        return loss, {"floor": float(loss.detach())}


def build_floor(bb: Backbone, batch_size: int) -> Built:
    cfg = TrainConfig(optimizer="sgd", batch_size=batch_size)
    floor = Floor(bb)
    return Built("floor", floor, cfg, training.build_optimizer(floor.param_groups(cfg), cfg))


def timed_step(b: Built, images, labels) -> float:
    cuda = images.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_step(b, images, labels)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


REPO = Path(__file__).resolve().parents[1]


def write_spec(
    path: Path,
    *,
    name: str,
    methods: list[str],
    seeds: list[int],
    output: Path,
    arch: str,
    dataset: str = "digits",
    shots: int = 1,
    train: dict | None = None,
    resources: dict | None = None,
    device: str = "auto",
) -> Path:
    """A final-stage-only sweep spec (no search) for a benchmark, as YAML data."""
    spec = {
        "name": name,
        "protocol": "fewshot",
        "methods": methods,
        "datasets": [dataset],
        "shots": [shots],
        "seeds": seeds,
        "backbone": {"arch": arch, "pretrained": None},
        "device": device,
        "train": train or {},
        "resources": resources or {"cpu": 1, "gpu": 0},
        "max_retries": 0,
        "tracking": {"experiment": f"benchmark-{name}"},
        "output": str(output),
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_sweep(spec: Path, work: Path, env: dict, max_concurrent: int | None = None) -> float:
    """``python -m orchestrator.sweep spec`` (MLflow in ``work/mlflow.db``); its wall time in seconds."""
    cmd = [sys.executable, "-m", "orchestrator.sweep", str(spec), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    if max_concurrent:
        cmd += ["--max-concurrent", str(max_concurrent)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"sweep {spec.name} failed: {p.stdout[-2000:]} {p.stderr[-3000:]}")
    return wall


def trial_finals(sweep_dir: Path) -> list[dict]:
    """The last Tune result of every trial of a finished sweep (``<output>/<name>/tune/*/result.json``),
    with ``end`` (epoch seconds: the trial's ``reported_at``, else Tune's whole-second ``timestamp``) and
    ``start`` = ``end`` minus its running time."""
    out = []
    for res in sorted(Path(sweep_dir, "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in res.read_text().splitlines() if line.strip()]
        final = dict(rows[-1])
        final["end"] = final.get("reported_at") or final["timestamp"]
        final["start"] = final["end"] - final["time_total_s"]
        out.append(final)
    return out


def bench_env(work: Path) -> dict:
    """The environment benchmark sweeps run in: Ray without auth on loopback, a private cache."""
    os.environ.setdefault("PROMPTSWEEP_CACHE", str(work / "cache"))
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_CHDIR_TO_TRIAL_DIR="0", PYTHONPATH=str(REPO))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(bb: Backbone) -> dict:
    dev = bb.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    return {
        "device": dev.type,
        "device_name": name,
        "arch": bb.arch,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def emit(figures: dict) -> None:
    """The benchmark's figures as one JSON object on the last stdout line."""
    print(json.dumps(figures, sort_keys=False), flush=True)
