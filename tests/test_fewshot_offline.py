"""Offline datasets (digits, shapes): real PNG files in the CoOp layout, deterministic, right
counts, safe concurrent materialisation; read back through the JSON-split reader."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp

import numpy as np
import pytest
from PIL import Image

from fewshot.errors import DataError
from fewshot.offline import offline_dir, shape_classes
from fewshot.registry import load_dataset


def _fingerprint(ds):
    """Labels, names and the bytes of every image file, in split order."""
    h = hashlib.sha256()
    for part in (ds.train, ds.val, ds.test):
        for it in part:
            h.update(f"{it.impath.split('/offline/')[1]}|{it.label}|{it.classname}".encode())
            with open(it.impath, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_digits_layout_counts_and_determinism(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "a"))
    ds = load_dataset("digits")
    root = offline_dir("digits")
    assert (root / "split_zhou_Digits.json").is_file() and ds.image_root == str(root / "images")
    assert ds.classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    for lab in range(10):  # per class 50 / 20 / 30 %
        n = [sum(it.label == lab for it in part) for part in (ds.train, ds.val, ds.test)]
        total = sum(n)
        assert 174 <= total <= 183
        assert n[0] == round(0.5 * total) and n[1] == round(0.2 * total)
    img = Image.open(ds.train[0].impath)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    split = json.loads((root / "split_zhou_Digits.json").read_text())
    assert split["train"][0][1:] == [ds.train[0].label, ds.train[0].classname]
    assert not split["train"][0][0].startswith("/")
    first = _fingerprint(ds)
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "b"))
    assert _fingerprint(load_dataset("digits")) == first


def test_shapes_classes_counts_and_determinism(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "a"))
    ds = load_dataset("shapes")
    assert ds.num_classes == 10 and len(set(ds.classnames)) == 10
    assert ds.classnames[:3] == ["red circle", "green square", "blue triangle"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (200, 80, 120)
    ds4 = load_dataset("shapes-4")
    assert ds4.classnames == ds.classnames[:4]
    assert len(shape_classes(64)) == len(set(shape_classes(64))) == 64
    first = _fingerprint(ds4)
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "b"))
    assert _fingerprint(load_dataset("shapes-4")) == first
    for bad in ("shapes-1", "shapes-65", "shapes-x"):
        with pytest.raises(DataError, match=bad):
            load_dataset(bad)


def _pixels(items, size=16):
    return np.stack(
        [np.asarray(Image.open(it.impath).resize((size, size)), dtype=np.float32).ravel() / 255 for it in items]
    )


def test_shapes_vary_per_image_and_are_learnable(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path))
    ds = load_dataset("shapes")
    x_train, x_test = _pixels(ds.train), _pixels(ds.test)
    assert len({row.tobytes() for row in x_train}) == len(x_train)  # no two images alike
    clf = LogisticRegression(max_iter=1000).fit(x_train, [it.label for it in ds.train])
    acc = clf.score(x_test, [it.label for it in ds.test])
    assert 0.3 < acc < 0.95  # chance is 0.1: learnable from pixels, but not trivially


def _load(cache, name, start, queue):
    import os

    os.environ["PROMPTSWEEP_CACHE"] = cache
    from fewshot.registry import load_dataset as load

    start.wait()
    ds = load(name)
    queue.put([(it.impath, it.label) for it in ds.train + ds.val + ds.test])


def test_concurrent_materialisation(tmp_path):
    ctx = mp.get_context("spawn")
    start, queue = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_load, args=(str(tmp_path), "shapes-3", start, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == results[2] and len(results[0]) == 120
    assert sorted(p.name for p in (tmp_path / "offline").iterdir()) == ["shapes-3"]  # no temp dirs left
    assert all(Image.open(path).size == (48, 48) for path, _ in results[0][:5])
