"""The node-local frozen-feature cache: CLIP image features computed once, shared by every trial.

Methods whose image tower is untouched (``PromptMethod.frozen_image_features``: zero-shot, linear
probe, CoOp, CoCoOp, KgCoOp, TGP-T) read a fixed function of each image from the tower,
``cls.frozen_image_output(backbone, images)``: the pooled feature ``[B, D]`` for the first five
(``Backbone.encode_image`` passes a 2-D input through as already-encoded features), TGP-T's pooled
feature stacked on its projected last-block token map ``[B, 1 + L, E]`` (``frozen_output_kind``
"pooled+tokens"; its ``_image`` unpacks a 3-D input). For them the trial serves those outputs instead
of images, so no method needs a second code path. A token map is large: ``N x (1 + L) x E x 4`` bytes
per split (ViT-B/16: 197 x 512 floats, 0.4 MB per image, 20 GB for ImageNet's 50,000 test images);
writing an entry over 1 GB prints one line naming its size, and ``feature_cache: false`` turns it off.

Entries are keyed by a content hash of (backbone identity, image size, device type and precision,
the split's items — path, size, mtime and label of every image —, the transform view and the output
kind) and stored
under ``<cache root>/features/<hash>.npy`` (``$PROMPTSWEEP_CACHE``, local disk), with the sha256 of the
file's bytes beside it in ``<hash>.npy.sha256``. A writer computes into a temp file and ``os.replace``s it
into place (the array, then its checksum) under an exclusive ``flock``; concurrent creators on the node
wait for the first one and then memory-map its file. Readers verify the checksum on every lookup (one
sequential read of the entry, which the trial then reads anyway) and ``np.load(mmap_mode="r")``; an entry
that fails it (truncated, overwritten, its checksum missing) is never used: it is recomputed and replaced
under the lock.

Views:

* ``eval``: the deterministic evaluation transform — exact: the same numbers as running the images.
* ``train-<i>-crop<low>-<high>`` (``TrainConfig.train_feature_views = k``): k fixed augmented views of the
  training split (view i drawn with the training transform, crop area range ``crop_scale``, under torch
  seed i); epoch e trains on view
  ``e mod k``. This is an approximation of fresh augmentation and therefore an explicit option; the
  default (``None``) trains on fresh augmentations through the image tower, as the references do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from fewshot.paths import atomic_open, cache_root, check_cache_writable
from fewshot.types import Item

#: how many cache entries this process computed / memory-mapped (benchmarks and tests read them)
STATS = {"computed": 0, "hits": 0, "rejected": 0}
#: an entry larger than this is announced on stderr when written (token maps of large splits)
LARGE_ENTRY_BYTES = 2**30


def cache_dir() -> Path:
    return cache_root() / "features"


def items_fingerprint(items: list[Item]) -> str:
    """Hash of the split's content: every image's path, size, mtime and label, in order."""
    h = hashlib.sha256()
    for it in items:
        try:
            st = os.stat(it.impath)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except (OSError, ValueError):  # missing, or a NUL byte in the path (the image load names it)
            stamp = "missing"
        h.update(f"{it.impath}\0{stamp}\0{it.label}\n".encode())
    return h.hexdigest()


def entry_key(
    backbone_id: str, image_size: int, device_kind: str, items: list[Item], view: str, output: str = "pooled"
) -> str:
    blob = json.dumps(
        {
            "backbone": backbone_id,
            "image_size": image_size,
            "device": device_kind,
            "items": items_fingerprint(items),
            "n": len(items),
            "view": view,
            "output": output,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class FeatureDataset(Dataset):
    """``(cached output fp32 — [D], or [1 + L, E] for a token map —, label)`` per item of a split, from one
    or several cached views.

    ``images_read`` counts examples served (the counterpart of ``ImageDataset.images_read``), so a
    trial's ``test_images_read`` means the same with or without the cache. ``items``: the split's ``Item``s
    position by position (as ``ImageDataset.items``; None when not given), so a training sample's index names
    its image in every view.
    """

    in_memory = True  # orchestrator.training loads it without worker processes

    def __init__(self, views: list[np.ndarray], labels: list[int], split: str, items: Optional[list[Item]] = None):
        self.views = views
        self.labels = list(labels)
        self.items = None if items is None else list(items)
        self.split = split
        self.view = 0
        self.images_read = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % len(self.views)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        self.images_read += 1
        return torch.from_numpy(np.array(self.views[self.view][index], dtype=np.float32)), self.labels[index]


class _HashingWriter:
    """A binary file wrapper that hashes what is written through it (``np.save`` writes in chunks)."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class FeatureCache:
    """Computes or memory-maps the features of one (backbone, split, view) (see the module docstring)."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    @staticmethod
    def checksum_path(path: Path) -> Path:
        return path.with_name(path.name + ".sha256")

    def _load_verified(self, path: Path) -> Optional[np.ndarray]:
        """The memory-mapped entry if it exists and matches its checksum; None otherwise (never a bad array)."""
        try:
            want = self.checksum_path(path).read_text(encoding="ascii").strip()
            if _file_sha256(path) != want:
                return None
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, UnicodeDecodeError):  # absent, checksum missing, unreadable header
            return None

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``key``; ``compute()`` runs at most once per node for it (and again when
        the stored entry fails its checksum)."""
        path = self.path(key)
        arr = self._load_verified(path) if path.exists() else None
        if arr is not None:
            STATS["hits"] += 1
            return arr
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = open(self.root / f".{key}.lock", "w")
        except OSError:
            check_cache_writable()  # the one clear error naming the folder and $PROMPTSWEEP_CACHE
            raise
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent creators: the first computes, the rest wait
            try:
                existed = path.exists()
                arr = self._load_verified(path) if existed else None
                if arr is not None:
                    STATS["hits"] += 1
                    return arr
                if existed:
                    STATS["rejected"] += 1
                    print(
                        f"[feature cache] entry {path} fails its checksum (damaged): recomputing it",
                        file=sys.stderr,
                        flush=True,
                    )
                arr = np.ascontiguousarray(compute(), dtype=np.float32)
                if arr.nbytes > LARGE_ENTRY_BYTES:
                    print(
                        f"[feature cache] writing {arr.nbytes / 2**30:.1f} GB ({' x '.join(map(str, arr.shape))} "
                        f"floats) to {path}",
                        file=sys.stderr,
                        flush=True,
                    )
                with atomic_open(path, "wb") as fh:
                    writer = _HashingWriter(fh)
                    np.save(writer, arr)
                with atomic_open(self.checksum_path(path), "w", encoding="ascii") as fh:
                    fh.write(writer.sha.hexdigest() + "\n")
                STATS["computed"] += 1
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        out = self._load_verified(path)
        if out is None:  # changed under us since it was written: serve what was computed, never a bad entry
            return arr
        return out


@torch.no_grad()
def encode_split(
    backbone,
    items: list[Item],
    transform,
    split: str,
    batch_size: int,
    num_workers: int,
    autocast,
    seed: Optional[int] = None,
    encode: Optional[Callable] = None,
) -> np.ndarray:
    """fp32 ``encode(backbone, images)`` of every item, stacked: by default (``PromptMethod.frozen_image_output``)
    the unnormalised image features [N, D] (``seed`` fixes a random transform's draws)."""
    from torch.utils.data import DataLoader

    from fewshot.images import ImageDataset
    from methods.base import PromptMethod

    encode = encode or PromptMethod.frozen_image_output
    loader = DataLoader(
        ImageDataset(items, transform, split=split),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0 if seed is not None else num_workers,
    )
    out = []
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for images, _ in loader:
            with autocast():
                out.append(encode(backbone, images).float().cpu())
    if not out:
        return np.zeros((0, backbone.embed_dim), np.float32)
    return torch.cat(out).numpy()


def cached_split(
    cache: FeatureCache,
    backbone,
    items: list[Item],
    transform,
    view: str,
    split: str,
    batch_size: int,
    num_workers: int,
    autocast,
    device_kind: str,
    seed: Optional[int] = None,
    encode: Optional[Callable] = None,
    output: str = "pooled",
) -> np.ndarray:
    """The cached ``encode`` outputs of a split (``output`` names what ``encode`` returns, for the key)."""
    key = entry_key(backbone.identity(), backbone.image_size, device_kind, items, view, output)
    return cache.get(
        key, lambda: encode_split(backbone, items, transform, split, batch_size, num_workers, autocast, seed, encode)
    )
