"""Shared checks every method's tests run: frozen backbone, own-parameter gradients, loss falls, checkpoints.

Each method test module calls these with its own method class and config, so the behaviour that
matters for all methods is asserted the same way everywhere.
"""

from __future__ import annotations

import io

import torch
from torch.utils.data import DataLoader

from methods.backbone import Backbone


def digits_data(bb: Backbone, shots: int = 4, seed: int = 1, batch_size: int = 8, train: bool = True):
    """(classnames, DataLoader) over the K-shot digits train split at the backbone's image size."""
    from fewshot.images import ImageDataset
    from fewshot.registry import load_dataset
    from fewshot.sampling import fewshot_split
    from fewshot.transforms import clip_transform

    ds = load_dataset("digits")
    split = fewshot_split(ds, shots, seed)
    data = ImageDataset(split.train, clip_transform(bb.image_size, train=False), split="train")
    g = torch.Generator().manual_seed(seed)
    return ds.classnames, DataLoader(data, batch_size=batch_size, shuffle=train, generator=g, drop_last=False)


def backbone_snapshot(bb: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bb.model.state_dict().items()}


def assert_backbone_untouched(bb: Backbone, snapshot: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor is bit-identical and no backbone parameter holds a gradient."""
    now = bb.model.state_dict()
    assert snapshot.keys() == now.keys()
    changed = [k for k in snapshot if not torch.equal(snapshot[k], now[k])]
    assert not changed, f"backbone tensors changed: {changed[:5]}"
    with_grad = [n for n, p in bb.model.named_parameters() if p.grad is not None or p.requires_grad]
    assert not with_grad, f"backbone parameters with gradients/requires_grad: {with_grad[:5]}"


def one_step_gradients(method, images: torch.Tensor, labels: torch.Tensor) -> dict[str, bool]:
    """Run one backward pass; return {param name: received a non-zero gradient} for the method's params."""
    method.train()
    method.zero_grad(set_to_none=True)
    loss, _ = method.training_loss(images, labels)
    loss.backward()
    return {n: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for n, p in method.named_parameters()}


def train_losses(method, loader, epochs: int = 5, lr: float = 1e-2, optimizer: str = "adam") -> list[float]:
    """Mean training loss per epoch with a plain optimizer over ``param_groups`` (no schedule)."""
    from methods.base import TrainConfig

    groups = method.param_groups(TrainConfig())
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(groups, lr=lr)
    out = []
    method.train()
    for _ in range(epochs):
        total, n = 0.0, 0
        for images, labels in loader:
            opt.zero_grad(set_to_none=True)
            loss, _ = method.training_loss(images, labels)
            assert torch.isfinite(loss), "non-finite loss"
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(labels)
            n += len(labels)
        out.append(total / n)
    return out


def checkpoint_roundtrip(make_method, method, images: torch.Tensor) -> None:
    """Saving ``trainable_state_dict`` and loading it (weights_only) into a fresh method gives equal logits."""
    buf = io.BytesIO()
    torch.save(method.trainable_state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make_method()
    fresh.load_trainable_state_dict(state)
    method.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(method(images), fresh(images), atol=1e-5)
