"""K-shot sampling equals Dassl's generate_fewshot_dataset; split cache; base/novel split."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fewshot.errors import DataError
from fewshot.readers.json_split import read_json_split_dataset
from fewshot.sampling import fewshot_split, sample_fewshot, split_cache_path, subsample_classes
from fewshot.types import DatasetSplits, Item

# label -> (n train, n val); label 3 first in the file, class 2 has fewer items than most K
CLASS_SIZES = {3: (9, 5), 0: (12, 6), 2: (2, 1), 1: (17, 4), 4: (6, 3)}
NAMES = ["cat", "dog", "eel", "fox", "gnu"]


def write_fake_dataset(root):
    """A CoOp-layout dataset with interleaved labels (first-appearance order 3, 0, 2, 1, 4)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    split = {"train": [], "val": [], "test": []}
    for part, idx in (("train", 0), ("val", 1)):
        pending = {lab: list(range(sizes[idx])) for lab, sizes in CLASS_SIZES.items()}
        while any(pending.values()):  # round-robin: items of a class are spread through the list
            for lab in CLASS_SIZES:
                if pending[lab]:
                    n = pending[lab].pop(0)
                    split[part].append([f"{NAMES[lab]}/{part}_{n}.png", lab, NAMES[lab]])
    split["test"] = [[f"{NAMES[lab]}/test_0.png", lab, NAMES[lab]] for lab in range(5)]
    (root / "split_zhou_Fake.json").write_text(json.dumps(split))
    return read_json_split_dataset("fake", root, "images", "Fake", 5)


def dassl_generate_fewshot(data_source, num_shots):
    """Independent re-implementation of Dassl's rule, drawing from the GLOBAL random module."""
    if num_shots < 1:
        return data_source
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for _label, items in tracker.items():
        if len(items) >= num_shots:
            sampled = random.sample(items, num_shots)
        else:
            sampled = items
        dataset.extend(sampled)
    return dataset


def dassl_split(ds, shots, seed):
    state = random.getstate()
    try:
        random.seed(seed)
        train = dassl_generate_fewshot(ds.train, shots)
        val = dassl_generate_fewshot(ds.val, min(shots, 4))
    finally:
        random.setstate(state)
    return train, val


@pytest.fixture
def fake_ds(tmp_path):
    return write_fake_dataset(tmp_path / "fake")


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fewshot_split_equals_dassl(fake_ds, tmp_path, shots, seed):
    split = fewshot_split(fake_ds, shots, seed, cache_dir=tmp_path / "cache")
    train, val = dassl_split(fake_ds, shots, seed)
    assert split.train == train
    assert split.val == val
    # class order = first appearance (3, 0, 2, 1, 4); a small class keeps all its items, no repeats
    order = list(dict.fromkeys(it.label for it in split.train))
    assert order == [3, 0, 2, 1, 4]
    for lab, (n_train, n_val) in CLASS_SIZES.items():
        assert sum(it.label == lab for it in split.train) == min(shots, n_train)
        assert sum(it.label == lab for it in split.val) == min(shots, 4, n_val)
    assert len(set(split.train)) == len(split.train)
    # the cached copy gives the same lists
    again = fewshot_split(fake_ds, shots, seed, cache_dir=tmp_path / "cache")
    assert again.train == split.train and again.val == split.val


def test_seeds_differ_and_global_random_untouched(fake_ds, tmp_path):
    random.seed(1234)
    before = random.getstate()
    a = fewshot_split(fake_ds, 4, 1, cache_dir=tmp_path / "c")
    b = fewshot_split(fake_ds, 4, 2, cache_dir=tmp_path / "c")
    assert random.getstate() == before
    assert a.train != b.train


def test_val_drawn_from_same_stream_after_train(fake_ds):
    rng = random.Random(7)
    sample_fewshot(fake_ds.train, 8, rng)
    expected_val = sample_fewshot(fake_ds.val, 4, rng)
    fresh_val = sample_fewshot(fake_ds.val, 4, random.Random(7))
    assert fewshot_split(fake_ds, 8, 7).val == expected_val
    assert expected_val != fresh_val  # the order matters: val does not restart the stream


def test_shots_below_one_return_lists_unchanged(fake_ds, tmp_path):
    split = fewshot_split(fake_ds, 0, 1, cache_dir=tmp_path / "c")
    assert split.train == fake_ds.train and split.val == fake_ds.val
    assert sample_fewshot(fake_ds.train, -1, random.Random(0)) == fake_ds.train
    assert not (tmp_path / "c").exists()


def test_cache_file_layout_and_relative_paths(fake_ds, tmp_path):
    split = fewshot_split(fake_ds, 2, 3, cache_dir=tmp_path / "c")
    path = split_cache_path("fake", 2, 3, tmp_path / "c")
    assert path == tmp_path / "c" / "fake" / "shot_2-seed_3.json"
    data = json.loads(path.read_text())
    assert data["train"][0] == [
        split.train[0].impath.split("images/")[1],
        split.train[0].label,
        split.train[0].classname,
    ]
    assert all(not p.startswith("/") for p, _, _ in data["train"] + data["val"])
    assert [e[0] for e in data["val"]] == [it.impath.split("images/")[1] for it in split.val]


def test_default_cache_dir_is_under_promptsweep_cache(fake_ds, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "pc"))
    fewshot_split(fake_ds, 1, 1)
    assert (tmp_path / "pc" / "splits" / "fake" / "shot_1-seed_1.json").is_file()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"train": []}),
        json.dumps({"train": [["cat/train_0.png", 0, "cat"]], "val": []}),  # no source fingerprint
    ],
)
def test_corrupt_cache_raises_data_error(fake_ds, tmp_path, content):
    path = split_cache_path("fake", 4, 1, tmp_path / "c")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(DataError, match="shot_4-seed_1.json"):
        fewshot_split(fake_ds, 4, 1, cache_dir=tmp_path / "c")


def _create_split(root, cache_dir, start, queue):
    ds = read_json_split_dataset("fake", root, "images", "Fake", 5)
    start.wait()
    split = fewshot_split(ds, 4, 2, cache_dir=cache_dir)
    queue.put([it.impath for it in split.train + split.val])


def test_concurrent_cache_creation_gives_one_valid_file(fake_ds, tmp_path):
    ctx = mp.get_context("spawn")
    start, queue = ctx.Event(), ctx.Queue()
    root = tmp_path / "fake"
    procs = [ctx.Process(target=_create_split, args=(root, tmp_path / "c", start, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    files = list((tmp_path / "c" / "fake").iterdir())
    assert [f.name for f in files] == ["shot_4-seed_2.json"]  # no temp files left behind
    train, val = dassl_split(fake_ds, 4, 2)
    expected = [it.impath for it in train + val]
    assert all(r == expected for r in results)
    cached = fewshot_split(fake_ds, 4, 2, cache_dir=tmp_path / "c")
    assert [it.impath for it in cached.train + cached.val] == expected


def _items(labels):
    return [Item(f"/x/{i}.png", lab, f"c{lab}") for i, lab in enumerate(labels)]


@pytest.mark.parametrize("n_classes", [10, 7, 1])
def test_subsample_classes_base_new_rule(n_classes):
    labels = list(range(n_classes))[::-1] * 2  # unsorted on purpose
    train, test = _items(labels), _items(labels + labels)
    m = math.ceil(n_classes / 2)
    names_b, (train_b, test_b) = subsample_classes("base", train, test)
    names_n, (train_n, test_n) = subsample_classes("new", train, test)
    assert names_b == [f"c{lab}" for lab in range(m)]
    assert names_n == [f"c{lab}" for lab in range(m, n_classes)]
    assert [it.label for it in train_b] == [lab for lab in labels if lab < m]
    assert [it.label for it in train_n] == [lab - m for lab in labels if lab >= m]
    assert len(test_b) == 2 * len(train_b) and len(test_n) == 2 * len(train_n)
    assert all(it.classname == names_n[it.label] for it in test_n)
    names_a, (train_a, test_a) = subsample_classes("all", train, test)
    assert names_a == [f"c{lab}" for lab in range(n_classes)] and train_a == train and test_a == test


def test_subsample_labels_come_from_train_only():
    train = _items([0, 2, 4])  # labels 1 and 3 absent from the few-shot train
    test = _items([0, 1, 2, 3, 4])
    names, (_, test_b) = subsample_classes("base", train, test)
    assert names == ["c0", "c2"]
    assert [(it.label, it.classname) for it in test_b] == [(0, "c0"), (1, "c2")]
    with pytest.raises(Exception, match="all, base, new"):
        subsample_classes("half", train)


def test_shots_and_seed_must_be_integers(fake_ds, tmp_path):
    import numpy as np

    from fewshot.errors import ConfigError

    assert fewshot_split(fake_ds, np.int64(2), np.int32(1), cache_dir=tmp_path).train == dassl_split(fake_ds, 2, 1)[0]
    for shots, seed in ((2.5, 1), ("2", 1), (True, 1), (2, None)):
        with pytest.raises(ConfigError, match="must be an integer"):
            fewshot_split(fake_ds, shots, seed, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "part, index, entry",
    [
        ("train", 0, ["cat/train_0.png", 1, "cat"]),  # wrong label
        ("train", 3, ["cat/nonexistent.png", 0, "cat"]),  # not an image of the dataset
        ("val", 1, ["cat/val_0.png", 0]),  # not [path, label, name]
        ("val", 0, "x"),
    ],
)
def test_tampered_cache_entry_raises_data_error(fake_ds, tmp_path, part, index, entry):
    fewshot_split(fake_ds, 4, 1, cache_dir=tmp_path / "c")
    path = split_cache_path("fake", 4, 1, tmp_path / "c")
    data = json.loads(path.read_text())
    data[part][index] = entry
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"shot_4-seed_1.json is corrupt \\('{part}' entry {index}"):
        fewshot_split(fake_ds, 4, 1, cache_dir=tmp_path / "c")


def test_cache_from_changed_dataset_is_resampled(fake_ds, tmp_path):
    fewshot_split(fake_ds, 4, 1, cache_dir=tmp_path / "c")
    changed = DatasetSplits("fake", fake_ds.train[5:], fake_ds.val, [], fake_ds.classnames, fake_ds.image_root)
    split = fewshot_split(changed, 4, 1, cache_dir=tmp_path / "c")
    assert (split.train, split.val) == dassl_split(changed, 4, 1)
    assert fewshot_split(changed, 4, 1, cache_dir=tmp_path / "c").train == split.train


def test_dataset_without_image_root(tmp_path):
    items = [Item(f"/data/toy/{c}/{i}.png", lab, c) for lab, c in enumerate("ab") for i in range(5)]
    ds = DatasetSplits("toy", items, items[:2] + items[5:7], [], ["a", "b"])
    first = fewshot_split(ds, 2, 1, cache_dir=tmp_path)
    assert json.loads(split_cache_path("toy", 2, 1, tmp_path).read_text())["train"][0][0].startswith(("a/", "b/"))
    again = fewshot_split(ds, 2, 1, cache_dir=tmp_path)
    assert again.train == first.train == dassl_split(ds, 2, 1)[0]


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 6), max_size=60), shots=st.integers(-1, 9), seed=st.integers(0, 2**31))
def test_sample_fewshot_matches_dassl_on_any_list(labels, shots, seed):
    items = [Item(f"/d/{i}.png", lab, f"c{lab}") for i, lab in enumerate(labels)]
    state = random.getstate()
    random.seed(seed)
    expected = dassl_generate_fewshot(items, shots)
    random.setstate(state)
    assert sample_fewshot(items, shots, random.Random(seed)) == expected
