"""A trial's checkpoint: one directory holding ``state.pt`` (saved with ``torch.save``).

Contents: the method's ``trainable_state_dict``, optimizer and scheduler state, the finished epoch,
the step count, the best-val state (for ``selection: best_val``), and the RNG states (python,
numpy, torch, the shuffling generator) so a resumed trial continues exactly as an uninterrupted
one on CPU. Everything is stored as tensors / plain containers so that it loads with
``torch.load(weights_only=True)``; a missing or unreadable checkpoint raises ``CheckpointError``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from fewshot.errors import CheckpointError
from fewshot.paths import atomic_open

STATE_FILE = "state.pt"


def rng_state(generator: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, state: dict) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically (``fewshot.paths.atomic_open``); returns the directory."""
    directory = Path(directory)
    with atomic_open(directory / STATE_FILE, "wb") as fh:
        torch.save(state, fh)
    return directory


def load(directory: Path) -> dict:
    """Read a checkpoint directory (or a ``state.pt`` file); ``CheckpointError`` if missing/unreadable."""
    path = Path(directory)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass a checkpoint directory written by an earlier trial")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}): delete it and restart the trial without resume"
        ) from None
    if not isinstance(state, dict) or "epoch" not in state or "method" not in state:
        raise CheckpointError(f"checkpoint {path} is not a promptsweep trial checkpoint (missing epoch/method)")
    return state
