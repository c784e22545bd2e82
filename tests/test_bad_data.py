"""Bad data gets one clear DataError naming the file: missing / corrupt / truncated images, split JSON
files with an out-of-range label, a missing key, a malformed entry or a class without training images.
The up-front check (fewshot.validate, used by the sweep's preflight and ``python -m fewshot check --shots``)
decodes exactly the few-shot images a sweep uses, and a sweep over bad data exits 2 before Ray starts."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from fewshot import cli as fewshot_cli
from fewshot.errors import DataError, MissingDataError
from fewshot.images import ImageDataset, check_image, load_image
from fewshot.registry import load_dataset
from fewshot.sampling import fewshot_split
from fewshot.types import DatasetSplits, Item
from fewshot.validate import check_fewshot, check_images, check_labels, check_sweep_data

N_CLASSES = 10  # EuroSAT's class count
PER_CLASS = {"train": 4, "val": 2, "test": 1}


@pytest.fixture(autouse=True)
def _own_split_cache(tmp_path, monkeypatch):
    """Few-shot split caches of these fake datasets stay in this test's temp dir."""
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "cache"))


def write_eurosat(root, per_class=PER_CLASS, mutate=None):
    """A fake EuroSAT in the CoOp layout with real PNG files: ``<root>/eurosat/2750/C<lab>/<part>_<i>.png``
    and ``split_zhou_EuroSAT.json``; ``mutate(split)`` may edit the split dict before it is written."""
    image_dir = root / "eurosat" / "2750"
    split = {part: [] for part in per_class}
    for part, n in per_class.items():
        for i in range(n):
            for lab in range(N_CLASSES):
                rel = f"C{lab}/{part}_{i}.png"
                (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (lab * 20, i * 40, 90)).save(image_dir / rel)
                split[part].append([rel, lab, f"class {lab}"])
    if mutate is not None:
        mutate(split)
    split_file = root / "eurosat" / "split_zhou_EuroSAT.json"
    split_file.write_text(json.dumps(split))
    return image_dir, split_file


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- images --------------------------------------------------------------------------------------


def test_missing_image_named_by_load_check_and_dataset(tmp_path):
    gone = str(tmp_path / "gone.png")
    for fn in (load_image, check_image, lambda p: ImageDataset([Item(p, 0, "a")], None)[0]):
        with pytest.raises(MissingDataError) as exc:
            fn(gone)
        assert gone in _one_line(exc) and "is missing" in str(exc.value)


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_image_named(tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    for fn in (load_image, check_image, lambda p: ImageDataset([Item(p, 0, "a")], None)[0]):
        with pytest.raises(DataError) as exc:
            fn(str(bad))
        msg = _one_line(exc)
        assert str(bad) in msg and "corrupt or not an image" in msg
        assert not isinstance(exc.value, MissingDataError)


def test_truncated_jpeg_fails_the_decode_check(tmp_path):
    good = tmp_path / "good.jpg"
    Image.effect_noise((256, 256), 64).convert("RGB").save(good, quality=90)
    check_image(str(good))  # a sound JPEG passes (decoded at reduced scale)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with Image.open(cut) as img:  # the header alone looks fine: only decoding finds the problem
        assert img.size == (256, 256)
    with pytest.raises(DataError) as exc:
        check_image(str(cut))
    assert str(cut) in _one_line(exc)


def test_directory_listed_as_image(tmp_path):
    (tmp_path / "adir.png").mkdir()
    with pytest.raises(DataError, match="adir.png is a directory"):
        load_image(str(tmp_path / "adir.png"))


def test_dataloader_worker_error_is_one_line_naming_the_file(tmp_path):
    """A DataLoader worker re-raises with the worker's traceback in the message; ours keeps one line."""
    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"garbage")
    ds = ImageDataset([Item(str(good), 0, "a"), Item(str(bad), 1, "b")], None)
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(DataError) as exc:
        list(loader)
    msg = _one_line(exc)
    assert msg.startswith(f"image file {bad} is corrupt"), msg
    missing = ImageDataset([Item(str(tmp_path / "nope.png"), 0, "a")], None)
    with pytest.raises(MissingDataError) as exc:
        list(DataLoader(missing, batch_size=1, num_workers=1, collate_fn=lambda batch: batch))
    assert _one_line(exc).startswith(f"image file {tmp_path / 'nope.png'} is missing")


def test_check_images_reports_first_bad_file_and_count(tmp_path):
    items = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8)).save(p)
        items.append(Item(str(p), 0, "a"))
    assert check_images(items + items, "six images", workers=3) == 6  # duplicates checked once
    (tmp_path / "4.png").write_bytes(b"junk")
    (tmp_path / "2.png").unlink()
    with pytest.raises(MissingDataError) as exc:
        check_images(items, "six images", workers=3)
    msg = _one_line(exc)
    assert (
        msg.startswith(f"image file {tmp_path / '2.png'} is missing")
        and "[2 of the 6 images of six images are bad]" in msg
    )


# --- split files ---------------------------------------------------------------------------------


def _set(part, index, entry):
    def mutate(split):
        split[part][index] = entry

    return mutate


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (_set("train", 3, ["C3/train_0.png", 10, "class 3"]), "'train' entry 3 has label 10, outside 0..9"),
        (_set("val", 0, ["C0/val_0.png", -2, "class 0"]), "'val' entry 0 has label -2"),
        (lambda s: s.pop("val"), "lacks key\\(s\\) val"),
        (lambda s: s.pop("train"), "lacks key\\(s\\) train"),
        (_set("test", 1, ["C1/test_0.png", 1]), "'test' entry 1 is .*expected \\[path \\(str\\), label \\(int\\)"),
        (_set("train", 0, "C0/train_0.png"), "'train' entry 0 is"),
        (
            _set("train", 5, ["/etc/passwd", 5, "class 5"]),
            "'train' entry 5 has path \"/etc/passwd\", expected a file path relative",
        ),
        (_set("train", 5, ["", 5, "class 5"]), "'train' entry 5 has path \"\""),
        (
            lambda s: s.update(train=[e for e in s["train"] if e[1] != 3]),
            "1 class\\(es\\) have no 'train' entries \\(3 'class 3'\\)",
        ),
    ],
)
def test_bad_split_file_names_the_file(tmp_path, mutate, problem):
    _, split_file = write_eurosat(tmp_path, mutate=mutate)
    with pytest.raises(DataError, match=problem) as exc:
        load_dataset("eurosat", tmp_path)
    assert _one_line(exc).startswith(f"split file {split_file}")
    with pytest.raises(DataError, match=problem):  # the sweep's up-front check says the same
        check_sweep_data({"eurosat": {(1, 1)}}, tmp_path, tolerance=None)


def test_check_labels_on_any_reader(tmp_path):
    """The generic rule holds for datasets not read from a split file (e.g. FGVCAircraft, ImageNet folders)."""

    def items(labels):
        return [Item(str(tmp_path / f"{lab}.jpg"), lab, f"c{lab}") for lab in labels]

    check_labels(DatasetSplits("ok", items([0, 1, 2]), items([0]), items([2]), ["c0", "c1", "c2"], str(tmp_path)))
    check_labels(DatasetSplits("test_only", [], [], items([0, 1]), ["c0", "c1"]))  # e.g. ImageNet-A
    with pytest.raises(
        DataError, match=r"dataset 'gap' \(images under .*\): 1 class\(es\) have no training images \(1 'c1'\)"
    ):
        check_labels(DatasetSplits("gap", items([0, 2]), [], items([1]), ["c0", "c1", "c2"], str(tmp_path)))
    with pytest.raises(DataError, match=r"test image .*7.jpg has label 7, outside 0..2"):
        check_labels(DatasetSplits("range", items([0, 1, 2]), [], items([7]), ["c0", "c1", "c2"]))


def test_aircraft_variant_without_training_images(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    variants = [f"V{i}" for i in range(100)]
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    (d / "images_variant_train.txt").write_text("".join(f"{i:07d} V{i}\n" for i in range(99)))  # V99: none
    (d / "images_variant_val.txt").write_text("0000000 V0\n")
    (d / "images_variant_test.txt").write_text("0000001 V99\n")
    with pytest.raises(DataError, match=r"dataset 'fgvc_aircraft' .*no training images \(99 'V99'\)"):
        check_sweep_data({"fgvc_aircraft": {(1, 1)}}, tmp_path, tolerance=None)


# --- the up-front check decodes exactly the few-shot images a sweep uses -----------------------------


def test_check_fewshot_decodes_only_the_split_images(tmp_path):
    image_dir, _ = write_eurosat(tmp_path)
    ds = load_dataset("eurosat", tmp_path)
    split = fewshot_split(ds, 1, 1)
    assert check_fewshot(ds, [(1, 1)]) == len(split.train) + len(split.val) == 2 * N_CLASSES
    used = {it.impath for it in split.train + split.val}
    unused = next(it.impath for it in ds.train if it.impath not in used)
    Image.open(unused).close()
    with open(unused, "wb") as fh:  # an image no 1-shot seed-1 trial reads: not the check's business
        fh.write(b"junk")
    (image_dir / "C0" / "test_0.png").write_bytes(b"junk")  # test images are read by the trial itself
    assert check_sweep_data({"eurosat": [(1, 1)]}, tmp_path, tolerance=None) == {"eurosat": 2 * N_CLASSES}
    with pytest.raises(DataError) as exc:  # the 4-shot split uses every training image
        check_sweep_data({"eurosat": [(1, 1), (4, 1)]}, tmp_path, tolerance=None)
    msg = _one_line(exc)
    assert unused in msg and "4-shot splits of 'eurosat' (seeds 1)" in msg


def test_missing_fewshot_image_is_caught_up_front(tmp_path):
    write_eurosat(tmp_path)
    ds = load_dataset("eurosat", tmp_path)
    victim = fewshot_split(ds, 2, 3).val[5].impath
    import os

    os.remove(victim)
    with pytest.raises(MissingDataError) as exc:
        check_sweep_data({"eurosat": {(2, 3)}}, tmp_path, tolerance=None)
    assert victim in _one_line(exc)


def test_fewshot_check_cli_decodes_with_shots(tmp_path, capsys):
    write_eurosat(tmp_path)
    assert (
        fewshot_cli.main(
            [
                "check",
                "--data-root",
                str(tmp_path),
                "--count-tolerance",
                "none",
                "--shots",
                "1,2",
                "--seeds",
                "1",
                "eurosat",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "present" in out and "few-shot images decode" in out
    victim = fewshot_split(load_dataset("eurosat", tmp_path), 1, 1).train[0].impath
    with open(victim, "wb") as fh:
        fh.write(b"not a png")
    assert (
        fewshot_cli.main(["check", "--data-root", str(tmp_path), "--count-tolerance", "none", "eurosat"]) == 0
    )  # without --shots: structure only
    capsys.readouterr()
    assert (
        fewshot_cli.main(
            [
                "check",
                "--data-root",
                str(tmp_path),
                "--count-tolerance",
                "none",
                "--shots",
                "1",
                "--seeds",
                "1",
                "eurosat",
            ]
        )
        == 2
    )
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("eurosat")][0]
    assert "malformed" in line and victim in line
    for bad, why in (("0", "must be >= 1 (got 0)"), ("1,x", "invalid int value: 'x'")):
        assert (
            fewshot_cli.main(
                ["check", "--data-root", str(tmp_path), "--count-tolerance", "none", "--shots", bad, "eurosat"]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert err.startswith(f"error: argument --shots: {why}") and len(err.strip().splitlines()) == 1, err


# --- the sweep: bad data is refused before any trial, Ray or output directory ---------------------


def _sweep_spec(tmp_path, data_root, **extra):
    spec = {
        "name": "baddata",
        "methods": ["zeroshot"],
        "datasets": ["eurosat"],
        "shots": [1],
        "seeds": [1],
        "data_root": str(data_root),
        "count_tolerance": None,
        **extra,
    }  # a 10-image-per-class EuroSAT
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.mark.parametrize("damage", ["corrupt", "missing", "label"])
def test_sweep_refuses_bad_fewshot_data_before_ray(tmp_path, capsys, damage):
    import ray

    from orchestrator.sweep import main

    data = tmp_path / "data"
    if damage == "label":
        _, split_file = write_eurosat(data, mutate=_set("val", 3, ["C3/val_0.png", 11, "class 3"]))
        named = str(split_file)
    else:
        write_eurosat(data)
        named = fewshot_split(load_dataset("eurosat", data), 1, 1).train[4].impath
        if damage == "corrupt":
            with open(named, "wb") as fh:
                fh.write(b"\xff\xd8 definitely not a whole jpeg")
        else:
            import os

            os.remove(named)
    out = tmp_path / "out"
    rc = main([str(_sweep_spec(tmp_path, data)), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert not out.exists()


def test_sweep_checks_every_seed_and_search_seed(tmp_path, capsys):
    """The preflight covers the search seeds too, not only the final seeds."""
    from orchestrator.sweep import main

    data = tmp_path / "data"
    write_eurosat(data)
    ds = load_dataset("eurosat", data)
    final_used = {it.impath for s in (1, 2) for it in fewshot_split(ds, 1, s).train + fewshot_split(ds, 1, s).val}
    victim = next(it.impath for it in fewshot_split(ds, 1, 7).train if it.impath not in final_used)
    with open(victim, "wb") as fh:
        fh.write(b"junk")
    search = {"coop": {"n_trials": 1, "seeds": [7], "space": {"lr": {"type": "float", "low": 0.001, "high": 0.01}}}}
    spec = _sweep_spec(tmp_path, data, methods=["zeroshot", "coop"], seeds=[1, 2], search=search)
    rc = main([str(spec), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and victim in err and "seeds 1, 2, 7" in err, err
    assert not (tmp_path / "out").exists()
