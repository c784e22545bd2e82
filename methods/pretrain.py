"""Pretraining of the project's own CLIP, ``promptsweep-mini``, and its content-keyed checkpoint cache.

``load_backbone("promptsweep-mini", "promptsweep")`` resolves the tag ``promptsweep`` to a checkpoint
file through ``pretrained_checkpoint(arch)`` and then loads that file exactly as a user's local
checkpoint (``open_clip.create_model(pretrained=<path>)``). The file is built on first use — one line
on stderr says so, then a progress bar — or ahead of time by ``python -m methods pretrain``.

* **What is trained**: the open_clip model of ``methods/model_configs/<arch>.json`` from random
  init, with CLIP's symmetric contrastive loss (learned temperature) on the generated image–caption
  corpus of ``fewshot.corpus``; AdamW, linear warm-up then cosine; settings are data:
  ``methods/model_configs/<arch>.pretrain.yaml`` (a ``PretrainConfig``).
* **Deterministic**: fixed seeds (model init, batch order) and a fixed torch thread count
  (``threads``) for the whole run, so a rerun on one machine writes the same bytes.
* **Cache**: ``<cache root>/models/<arch>-<key>.pt`` (``$PROMPTSWEEP_MODEL_CACHE`` overrides the
  folder), ``key`` = hash of the pretraining settings, the corpus settings, the model config, a
  format version and the torch / open_clip versions. Concurrent creators are safe as in the feature
  cache: an exclusive ``flock`` on ``.<name>.lock``; the first builds and ``os.replace``s the file into
  place (``fewshot.paths.atomic_open``); the others wait and then use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fewshot.corpus import CorpusConfig, build_corpus, corpus_size
from fewshot.errors import ConfigError
from fewshot.paths import atomic_open, cache_root

MINI_ARCH = "promptsweep-mini"
#: the pretrained tag that names the project-trained weights of an arch with a ``.pretrain.yaml``
PROJECT_TAG = "promptsweep"
#: bump when the training code changes what a given config produces
FORMAT_VERSION = 1
_CONFIG_DIR = Path(__file__).parent / "model_configs"


class PretrainConfig(BaseModel):
    """How one project backbone is pretrained (``<arch>.pretrain.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(500, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    seed: int = Field(0, ge=0)
    threads: int = Field(2, ge=1, description="torch intra-op threads for the whole run (determinism)")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)


def has_pretraining(arch: str) -> bool:
    return (_CONFIG_DIR / f"{arch}.pretrain.yaml").is_file()


def load_config(arch: str = MINI_ARCH) -> PretrainConfig:
    path = _CONFIG_DIR / f"{arch}.pretrain.yaml"
    if not path.is_file():
        known = sorted(p.name[: -len(".pretrain.yaml")] for p in _CONFIG_DIR.glob("*.pretrain.yaml"))
        raise ConfigError(
            f"arch '{arch}' has no project pretraining (pretrained tag '{PROJECT_TAG}' exists for: "
            f"{', '.join(known)}); use pretrained: null or a checkpoint path"
        )
    try:
        return PretrainConfig(**(yaml.safe_load(path.read_text()) or {}))
    except (ValidationError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: invalid pretraining config: {exc}") from exc


def content_key(arch: str, cfg: PretrainConfig) -> str:
    import open_clip

    model_cfg = json.loads((_CONFIG_DIR / f"{arch}.json").read_text())
    blob = json.dumps(
        {
            "arch": arch,
            "model": model_cfg,
            "pretrain": cfg.model_dump(mode="json"),
            "format": FORMAT_VERSION,
            "torch": torch.__version__,
            "open_clip": getattr(open_clip, "__version__", "?"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_dir() -> Path:
    env = os.environ.get("PROMPTSWEEP_MODEL_CACHE", "")
    return Path(env).expanduser().absolute() if env else cache_root() / "models"


def checkpoint_path(arch: str = MINI_ARCH, cfg: Optional[PretrainConfig] = None) -> Path:
    cfg = cfg or load_config(arch)
    return model_dir() / f"{arch}-{content_key(arch, cfg)}.pt"


def pretrained_checkpoint(arch: str = MINI_ARCH, cfg: Optional[PretrainConfig] = None, *, verbose: bool = True) -> Path:
    """The checkpoint file of ``arch``'s project pretraining (``cfg``: its ``.pretrain.yaml`` unless given),
    built once per cache (see the module docstring)."""
    cfg = cfg or load_config(arch)
    path = checkpoint_path(arch, cfg)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent creators: the first trains, the rest wait for its file
        try:
            if path.is_file():
                return path
            if verbose:
                print(
                    f"[promptsweep] pretraining backbone {arch} once ({cfg.steps} steps; a few minutes on a CPU); "
                    f"cached at {path}",
                    file=sys.stderr,
                    flush=True,
                )
            t0 = time.time()
            state = pretrain(arch, cfg, progress=verbose)
            with atomic_open(path, "wb") as fh:
                torch.save(state, fh)
            if verbose:
                print(
                    f"[promptsweep] {arch} pretrained in {time.time() - t0:.0f} s "
                    f"({path.stat().st_size / 2**20:.1f} MiB)",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    lo = cfg.min_lr / cfg.lr
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))


def clip_loss(model, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the batch: image i's caption is text i."""
    img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
    target = torch.arange(len(images))
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target)
    )


def pretrain(arch: str, cfg: PretrainConfig, progress: bool = False) -> dict:
    """Train ``arch`` from random init on the corpus; returns its open_clip state dict (fp32, CPU)."""
    import open_clip
    from tqdm import tqdm

    from methods.backbone import register_configs

    register_configs()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = open_clip.create_model(arch, pretrained=None, device="cpu")
            tokenizer = open_clip.get_tokenizer(arch)
            size = model.visual.image_size
            size = int(size[0] if isinstance(size, (tuple, list)) else size)
            with tqdm(
                total=corpus_size(cfg.corpus),
                desc=f"{arch}: corpus",
                unit="img",
                disable=not progress,
                file=sys.stderr,
                mininterval=1.0,
            ) as bar:
                corpus = build_corpus(cfg.corpus, size, progress=bar.update, workers=cfg.threads)
            ids = tokenizer(corpus.captions)
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
            no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=cfg.lr,
                betas=tuple(cfg.betas),
                eps=cfg.eps,
            )
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
            gen = torch.Generator().manual_seed(cfg.seed)
            order, pos = torch.randperm(len(corpus), generator=gen), 0
            model.train()
            with tqdm(
                total=cfg.steps,
                desc=f"{arch}: pretraining",
                unit="step",
                disable=not progress,
                file=sys.stderr,
                mininterval=2.0,
            ) as bar:
                for _step in range(cfg.steps):
                    if pos + cfg.batch_size > len(order):
                        order, pos = torch.randperm(len(corpus), generator=gen), 0
                    idx = order[pos : pos + cfg.batch_size]
                    pos += cfg.batch_size
                    loss = clip_loss(model, corpus.images[idx], ids[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            model.eval()
            return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
