"""The frozen-feature cache: exact for evaluation, computed once per node (also under concurrent
creators), never half-written, keyed by content, optional cached training views, and only used by
methods whose image tower is untouched."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.registry import load_dataset
from fewshot.transforms import clip_transform
from fewshot.types import Item
from orchestrator import feature_cache as fc
from orchestrator.trial import TrialRequest, run_trial


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "cache"))
    return fc.FeatureCache()


def _items(n=12):
    return load_dataset("digits").test[:n]


def test_cached_eval_features_equal_the_image_tower(tiny_backbone, cache):
    items = _items()
    tf = clip_transform(tiny_backbone.image_size, train=False)
    from contextlib import nullcontext

    got = fc.cached_split(cache, tiny_backbone, items, tf, "eval", "test", 5, 0, nullcontext, "cpu")
    from fewshot.images import ImageDataset

    images = torch.stack([ImageDataset(items, tf)[i][0] for i in range(len(items))])
    direct = torch.cat(
        [tiny_backbone.encode_image(images[i : i + 5], normalize=False) for i in range(0, len(items), 5)]
    )
    assert torch.equal(torch.from_numpy(np.array(got)), direct)
    # a 2-D input to encode_image is these features: normalised, not re-encoded
    assert torch.allclose(
        tiny_backbone.encode_image(torch.from_numpy(np.array(got))), tiny_backbone.encode_image(images), atol=1e-6
    )


def test_tgpt_caches_its_pooled_feature_and_token_map_exactly(tiny_backbone, cache):
    """TGP-T's cached entry is [N, 1 + L, E] (pooled row on the projected tokens), and its logits from the
    cached entry equal its logits from the images."""
    from contextlib import nullcontext

    from fewshot.images import ImageDataset
    from methods.registry import get_method

    items = _items(6)
    tf = clip_transform(tiny_backbone.image_size, train=False)
    cls = get_method("tgpt")
    assert cls.frozen_image_features and cls.frozen_output_kind != "pooled"
    got = fc.cached_split(
        cache,
        tiny_backbone,
        items,
        tf,
        "eval",
        "test",
        3,
        0,
        nullcontext,
        "cpu",
        encode=cls.frozen_image_output,
        output=cls.frozen_output_kind,
    )
    images = torch.stack([ImageDataset(items, tf)[i][0] for i in range(len(items))])
    n_tokens = 1 + (tiny_backbone.image_size // tiny_backbone.model.visual.patch_size[0]) ** 2
    assert got.shape == (6, 1 + n_tokens, tiny_backbone.embed_dim)
    pooled = torch.cat([tiny_backbone.encode_image(images[i : i + 3], normalize=False) for i in (0, 3)])
    assert torch.allclose(torch.from_numpy(np.array(got[:, 0])), pooled, atol=1e-5)
    # a different output kind of the same split is a different entry
    assert fc.entry_key("bb", 32, "cpu", items, "eval", "pooled") != fc.entry_key(
        "bb", 32, "cpu", items, "eval", cls.frozen_output_kind
    )
    names = load_dataset("digits").classnames
    method = cls(tiny_backbone, names, "digits", cls.Config())
    with torch.no_grad():
        assert torch.equal(method(torch.from_numpy(np.array(got[:3]))), method(images[:3]))


@pytest.mark.parametrize("method", ["zeroshot", "coop", "linear_probe", "tgpt"])
def test_trial_metrics_are_the_same_with_and_without_the_cache(tiny_backbone, cache, method):
    schedule = {"max_iters": 3} if method == "tgpt" else {"epochs": 1}  # TGP-T's schedule counts iterations

    def run(use):
        return run_trial(
            TrialRequest(
                method=method,
                dataset="digits",
                shots=2,
                seed=3,
                device="cpu",
                overrides={**schedule, "batch_size": 8, "feature_cache": use},
            )
        )

    before = dict(fc.STATS)
    off, on, again = run(False), run(True), run(True)
    assert fc.STATS["computed"] - before["computed"] >= 1 and fc.STATS["hits"] - before["hits"] >= 2
    for k in ("val_acc", "test_acc", "test_images_read"):
        assert off[k] == on[k] == again[k], k


def test_image_tower_methods_never_use_the_cache(tiny_backbone, cache):
    before = dict(fc.STATS)
    run_trial(
        TrialRequest(
            method="vpt",
            dataset="digits",
            shots=1,
            seed=1,
            device="cpu",
            overrides={"epochs": 1, "feature_cache": True},
        )
    )
    assert fc.STATS == before and not (cache.root.exists() and any(cache.root.glob("*.npy")))


def test_computed_once_then_memory_mapped_and_keyed_by_content(tiny_backbone, cache, tmp_path):
    calls = []
    arr = cache.get("k1", lambda: calls.append(1) or np.arange(6, dtype=np.float32).reshape(2, 3))
    again = cache.get("k1", lambda: calls.append(1) or np.zeros((2, 3), np.float32))
    assert calls == [1] and isinstance(again, np.memmap) and np.array_equal(arr, again)
    assert not list(cache.root.glob(".*.tmp"))
    # the key follows the split's content: an image rewritten in place is a new entry
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    items = [Item(str(img), 0, "a")]
    k_before = fc.entry_key("bb", 32, "cpu", items, "eval")
    assert fc.entry_key("bb", 32, "cpu", items, "eval") == k_before
    os.utime(img, ns=(1, 2))
    assert fc.entry_key("bb", 32, "cpu", items, "eval") != k_before
    assert fc.entry_key("bb", 32, "cuda", items, "eval") != fc.entry_key("bb", 32, "cpu", items, "eval")
    assert fc.entry_key("bb", 32, "cpu", items, "train-0") != fc.entry_key("bb", 32, "cpu", items, "eval")
    assert fc.entry_key("bb", 32, "cpu", items, "eval") != fc.entry_key("bb2", 32, "cpu", items, "eval")


def test_a_failed_compute_leaves_nothing_behind(cache):
    def boom():
        raise RuntimeError("killed mid-compute")

    with pytest.raises(RuntimeError):
        cache.get("k2", boom)
    assert not cache.path("k2").exists() and not list(cache.root.glob(".k2.*.tmp"))
    assert cache.get("k2", lambda: np.ones((1, 2), np.float32)).shape == (1, 2)


def _creator(root: str, counter: str, out: str) -> None:
    c = fc.FeatureCache(Path(root))

    def compute():
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(0.5)
        return np.full((3, 4), 7.0, np.float32)

    np.save(out, np.array(c.get("shared", compute)))


def test_concurrent_creators_compute_once(tmp_path):
    root, counter = tmp_path / "feats", tmp_path / "computes"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_creator, args=(str(root), str(counter), str(tmp_path / f"out{i}.npy"))) for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert counter.read_text() == "x"
    for i in range(4):
        assert np.array_equal(np.load(tmp_path / f"out{i}.npy"), np.full((3, 4), 7.0, np.float32))


def test_cached_training_views(tiny_backbone, cache):
    over = {"epochs": 3, "batch_size": 8, "train_feature_views": 2}
    before = dict(fc.STATS)
    out = run_trial(TrialRequest(method="coop", dataset="digits", shots=2, seed=1, device="cpu", overrides=over))
    assert out["epochs_run"] == 3
    from fewshot.sampling import fewshot_split

    assert fc.STATS["computed"] - before["computed"] == 4  # 2 train views + val + test
    items = fewshot_split(load_dataset("digits"), 2, 1).train
    bb = tiny_backbone
    # digits trains with crop_scale [0.5, 1] (methods/defaults/_datasets.yaml): part of each view's key
    train = [
        np.load(cache.path(fc.entry_key(bb.identity(), bb.image_size, "cpu", items, f"train-{i}-crop0.5-1")))
        for i in range(2)
    ]
    assert train[0].shape == (20, bb.embed_dim) and not np.array_equal(train[0], train[1])  # two augmentations
    ds = fc.FeatureDataset(train, list(range(20)), "train")
    ds.set_epoch(0)
    a = ds[0][0]
    ds.set_epoch(1)
    b = ds[0][0]
    ds.set_epoch(2)
    assert not torch.equal(a, b) and torch.equal(ds[0][0], a)
    again = run_trial(TrialRequest(method="coop", dataset="digits", shots=2, seed=1, device="cpu", overrides=over))
    assert (again["val_acc"], again["test_acc"]) == (out["val_acc"], out["test_acc"])  # deterministic views
    before = dict(fc.STATS)
    run_trial(
        TrialRequest(
            method="coop",
            dataset="digits",
            shots=2,
            seed=1,
            device="cpu",
            overrides={**over, "epochs": 1, "crop_scale": [0.08, 1.0]},
        )
    )
    assert fc.STATS["computed"] - before["computed"] == 2  # another crop range: new train views, same eval features


def _damage(path: Path, how: str) -> None:
    """Damage a stored entry for real: cut it short, overwrite its numbers keeping the size and the valid
    .npy header (what np.load would serve without complaint), or lose its checksum file."""
    data = path.read_bytes()
    if how == "truncated":
        os.truncate(path, len(data) // 2)
    elif how == "garbage":
        payload = np.load(path, mmap_mode="r").nbytes
        with open(path, "r+b") as fh:
            fh.seek(len(data) - payload)
            fh.write(np.random.default_rng(0).standard_normal(payload // 4).astype(np.float32).tobytes())
        assert path.stat().st_size == len(data)
    else:
        fc.FeatureCache.checksum_path(path).unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage", "checksum lost"])
def test_a_damaged_entry_is_recomputed_never_used(tiny_backbone, cache, how):
    from contextlib import nullcontext

    items = _items(8)
    tf = clip_transform(tiny_backbone.image_size, train=False)

    def lookup():
        return np.array(fc.cached_split(cache, tiny_backbone, items, tf, "eval", "test", 4, 0, nullcontext, "cpu"))

    fresh = lookup()
    (entry,) = cache.root.glob("*.npy")
    _damage(entry, how)
    before = dict(fc.STATS)
    again = lookup()
    assert fc.STATS["computed"] - before["computed"] == 1 and fc.STATS["rejected"] - before["rejected"] == 1
    assert again.dtype == fresh.dtype and again.tobytes() == fresh.tobytes()  # bit-identical to a fresh compute
    # the replaced entry is whole again: the next lookup memory-maps it without computing
    hit = cache.get(entry.stem, lambda: pytest.fail("a sound entry was recomputed"))
    assert isinstance(hit, np.memmap) and hit.tobytes() == fresh.tobytes()
    assert not list(cache.root.glob(".*.tmp"))


def test_unwritable_feature_cache_is_one_clear_error(tmp_path, monkeypatch):
    """A cache root that is a file: the lookup names the folder and $PROMPTSWEEP_CACHE, not an OSError."""
    from fewshot.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(blocker))
    with pytest.raises(ConfigError, match=r"\$PROMPTSWEEP_CACHE"):
        fc.FeatureCache().get("k", lambda: np.zeros((1, 2), np.float32))
