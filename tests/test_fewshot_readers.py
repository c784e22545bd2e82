"""Each on-disk reader parses a small fake tree of its CoOp layout, with the right class names,
and missing / malformed data raise DataError naming the path."""

from __future__ import annotations

import json

import pytest

from fewshot.errors import DataError, MissingDataError
from fewshot.registry import CATALOG, dataset_names, load_dataset, resolve_data_root

JSON_DATASETS = {  # name: (folder, image subdir, split name)
    "caltech101": ("caltech-101", "101_ObjectCategories", "Caltech101"),
    "oxford_pets": ("oxford_pets", "images", "OxfordPets"),
    "stanford_cars": ("stanford_cars", "", "StanfordCars"),
    "oxford_flowers": ("oxford_flowers", "jpg", "OxfordFlowers"),
    "food101": ("food-101", "images", "Food101"),
    "sun397": ("sun397", "SUN397", "SUN397"),
    "dtd": ("dtd", "images", "DescribableTextures"),
    "eurosat": ("eurosat", "2750", "EuroSAT"),
    "ucf101": ("ucf101", "UCF-101-midframes", "UCF101"),
}


def write_json_dataset(root, name, split=None):
    """Fake split_zhou file with every class of ``name`` once per split; returns the dict written."""
    folder, image_subdir, split_name = JSON_DATASETS[name]
    n = CATALOG[name].num_classes
    ddir = root / folder
    (ddir / image_subdir).mkdir(parents=True, exist_ok=True)
    if name == "stanford_cars":
        (ddir / "cars_train").mkdir(exist_ok=True)
    if split is None:
        prefix = {"stanford_cars": "cars_{part}/", "sun397": "a/class_{lab}/"}.get(name, "class_{lab}/")
        split = {
            part: [
                [prefix.format(part=part, lab=lab) + f"{part}_{lab:05d}.jpg", lab, f"class name {lab}"]
                for lab in reversed(range(n))
            ]
            for part in ("train", "val", "test")
        }
    text = split if isinstance(split, str) else json.dumps(split, indent=4)
    (ddir / f"split_zhou_{split_name}.json").write_text(text)
    return split


@pytest.mark.parametrize("name", list(JSON_DATASETS))
def test_json_split_datasets(tmp_path, name):
    split = write_json_dataset(tmp_path, name)
    ds = load_dataset(name, tmp_path)
    folder, image_subdir, _ = JSON_DATASETS[name]
    base = tmp_path.resolve() / folder / image_subdir if image_subdir else tmp_path.resolve() / folder
    assert ds.name == name and ds.num_classes == CATALOG[name].num_classes
    assert ds.classnames == [f"class name {lab}" for lab in range(ds.num_classes)]
    for part in ("train", "val", "test"):
        items = getattr(ds, part)
        assert [(it.impath, it.label, it.classname) for it in items] == [
            (str(base / p), lab, c) for p, lab, c in split[part]
        ]
    assert ds.image_root == str(base)


def test_stanford_cars_paths_are_relative_to_dataset_dir(tmp_path):
    write_json_dataset(tmp_path, "stanford_cars")
    ds = load_dataset("stanford_cars", tmp_path)
    assert ds.train[0].impath == str(tmp_path.resolve() / "stanford_cars" / "cars_train" / "train_00195.jpg")
    assert ds.test[0].impath == str(tmp_path.resolve() / "stanford_cars" / "cars_test" / "test_00195.jpg")


def test_data_root_from_env(tmp_path, monkeypatch):
    write_json_dataset(tmp_path, "eurosat")
    monkeypatch.setenv("PROMPTSWEEP_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path.resolve()
    assert len(load_dataset("eurosat").train) == 10


def test_missing_root_folder_and_split_file(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMPTSWEEP_DATA", raising=False)
    with pytest.raises(MissingDataError, match="PROMPTSWEEP_DATA.*docs/data.md"):
        load_dataset("dtd")
    with pytest.raises(MissingDataError, match=str(tmp_path / "nope")):
        load_dataset("dtd", tmp_path / "nope")
    with pytest.raises(MissingDataError, match=f"{tmp_path.resolve() / 'dtd'} is missing.*docs/data.md"):
        load_dataset("dtd", tmp_path)
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(MissingDataError, match="split_zhou_DescribableTextures.json is missing"):
        load_dataset("dtd", tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*caltech101"):
        load_dataset("mnist", tmp_path)


def _good():
    return {p: [[f"c{lab}/{p}{lab}.jpg", lab, f"c{lab}"] for lab in range(10)] for p in ("train", "val", "test")}


def _with(part, index, entry):
    d = _good()
    d[part][index] = entry
    return d


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{oops", "not valid JSON"),
        ([["a.jpg", 0, "c0"]], "must hold a JSON object"),
        ({"train": [], "val": []}, "lacks key.*test"),
        ({"train": {}, "val": [], "test": []}, "'train' must be a list"),
        (_with("train", 3, ["a.jpg", 3]), "'train' entry 3 .*expected \\[path"),
        (_with("val", 0, ["a.jpg", "0", "c0"]), "'val' entry 0"),
        (_with("test", 1, ["a.jpg", 1, 5]), "'test' entry 1"),
        (_with("train", 2, ["a.jpg", -1, "c2"]), "label -1, outside 0..9"),
        (_with("train", 2, ["a.jpg", 10, "c2"]), "label 10, outside 0..9"),
        (_with("train", 2, ["a.jpg", 1, "other"]), "label 1 is named both"),
    ],
)
def test_malformed_split_json(tmp_path, content, problem):
    write_json_dataset(tmp_path, "eurosat", content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=f"split_zhou_EuroSAT.json.*{problem}") as err:
        load_dataset("eurosat", tmp_path)
    assert not isinstance(err.value, MissingDataError)


def test_fgvc_aircraft_lists(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    variants = ["707-320", "A340-500", "Boeing 717"] + [f"V{i}" for i in range(97)]
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    (d / "images_variant_train.txt").write_text("1025794 707-320\n1340192 Boeing 717\n")
    (d / "images_variant_val.txt").write_text("0034309 A340-500\n")
    (d / "images_variant_test.txt").write_text("0056978 V96\n0000001 Boeing 717\n")
    ds = load_dataset("fgvc_aircraft", tmp_path)
    img = tmp_path.resolve() / "fgvc_aircraft" / "images"
    assert ds.classnames[:3] == ["707-320", "A340-500", "Boeing 717"] and ds.num_classes == 100
    assert [(it.impath, it.label, it.classname) for it in ds.train] == [
        (str(img / "1025794.jpg"), 0, "707-320"),
        (str(img / "1340192.jpg"), 2, "Boeing 717"),
    ]
    assert [(it.label, it.classname) for it in ds.val] == [(1, "A340-500")]
    assert [it.label for it in ds.test] == [99, 2]
    (d / "images_variant_val.txt").write_text("0034309 A380\n")
    with pytest.raises(DataError, match="images_variant_val.txt line 1: variant 'A380'"):
        load_dataset("fgvc_aircraft", tmp_path)
    (d / "images_variant_test.txt").unlink()
    (d / "images_variant_val.txt").write_text("0034309 A340-500\n")
    with pytest.raises(MissingDataError, match="images_variant_test.txt is missing"):
        load_dataset("fgvc_aircraft", tmp_path)


WNIDS = {"n01443537": "goldfish", "n01440764": "tench", "n01484850": "great white shark"}  # file order unsorted


def _touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def _classnames(path, mapping):
    path.write_text("".join(f"{w} {n}\n" for w, n in mapping.items()))


def test_imagenet_folders(tmp_path):
    d = tmp_path / "imagenet"
    d.mkdir()
    _classnames(d / "classnames.txt", WNIDS)
    for w in WNIDS:
        _touch_images(d / "images" / "train" / w, ["b.JPEG", "a.JPEG", ".DS_Store"])
        _touch_images(d / "images" / "val" / w, ["v.JPEG"])
    ds = load_dataset("imagenet", tmp_path)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]  # sorted wnid order
    root = tmp_path.resolve() / "imagenet" / "images"
    assert [(it.impath, it.label) for it in ds.train[:3]] == [
        (str(root / "train/n01440764/a.JPEG"), 0),
        (str(root / "train/n01440764/b.JPEG"), 0),
        (str(root / "train/n01443537/a.JPEG"), 1),
    ]
    assert len(ds.train) == 6 and [it.label for it in ds.test] == [0, 1, 2]
    assert ds.val == ds.test and ds.test[2].classname == "great white shark"
    (d / "images" / "val" / "n99999999").mkdir()
    with pytest.raises(DataError, match="n99999999"):
        load_dataset("imagenet", tmp_path)


def test_imagenet_v2_numbered_folders(tmp_path):
    d = tmp_path / "imagenetv2"
    d.mkdir()
    mapping = {f"n{i:08d}": f"name {i}" for i in range(12)}
    _classnames(d / "classnames.txt", mapping)
    for i in range(12):
        _touch_images(d / "imagenetv2-matched-frequency-format-val" / str(i), [f"{i}.jpeg"])
    ds = load_dataset("imagenet_v2", tmp_path)
    assert ds.train == [] and ds.val == [] and ds.num_classes == 12
    assert [it.label for it in ds.test] == list(range(12))  # numeric, not string, folder order
    assert ds.test[10].impath.endswith("imagenetv2-matched-frequency-format-val/10/10.jpeg")
    assert ds.test[10].classname == "name 10"


@pytest.mark.parametrize(
    "name, folder, subdir",
    [
        ("imagenet_sketch", "imagenet-sketch", "images"),
        ("imagenet_a", "imagenet-adversarial", "imagenet-a"),
        ("imagenet_r", "imagenet-rendition", "imagenet-r"),
    ],
)
def test_imagenet_wnid_variants(tmp_path, name, folder, subdir):
    d = tmp_path / folder
    d.mkdir()
    _classnames(d / "classnames.txt", WNIDS)
    used = ["n01484850", "n01443537"]  # a subset of the wnids, like A/R's 200 of 1000
    for w in used:
        _touch_images(d / subdir / w, ["2.jpg", "1.jpg"])
    (d / subdir / "README.txt").write_text("ignore me")
    ds = load_dataset(name, tmp_path)
    assert ds.classnames == ["goldfish", "great white shark"]
    assert [(it.label, it.impath.rsplit("/", 2)[-2:]) for it in ds.test] == [
        (0, ["n01443537", "1.jpg"]),
        (0, ["n01443537", "2.jpg"]),
        (1, ["n01484850", "1.jpg"]),
        (1, ["n01484850", "2.jpg"]),
    ]
    (d / "classnames.txt").unlink()
    with pytest.raises(MissingDataError, match="classnames.txt is missing"):
        load_dataset(name, tmp_path)


def test_catalog_names():
    names = dataset_names()
    assert names[:11] == [
        "imagenet",
        "caltech101",
        "oxford_pets",
        "stanford_cars",
        "oxford_flowers",
        "food101",
        "fgvc_aircraft",
        "sun397",
        "dtd",
        "eurosat",
        "ucf101",
    ]
    assert set(names[11:]) == {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "digits", "shapes"}
