"""Hostile or broken data trees end in one DataError naming the file or entry, in ``python -m fewshot check``,
in the readers a trial uses and before a sweep starts (exit 2, one line, no Ray, no output folder): a split
JSON nested too deeply for Python, a NUL byte in a path, paths that leave the dataset's image folder (``..``,
absolute, a symbolic link — of a file or a class folder — pointing elsewhere), a named pipe where an image
should be, and a cache folder that cannot be written. A dataset whose folders are themselves links stays fine."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from fewshot import cli as fewshot_cli
from fewshot.errors import ConfigError, DataError
from fewshot.images import ImageDataset, ImageError, check_image, file_problem, load_image
from fewshot.paths import check_cache_writable
from fewshot.registry import load_dataset
from fewshot.sampling import fewshot_split
from fewshot.types import Item
from fewshot.validate import check_files_exist, check_sweep_data
from tests.layouts import png, write_imagenet
from tests.test_bad_data import _sweep_spec, write_eurosat


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "cache"))


def _check_line(data: Path, capsys, *extra: str, dataset: str = "eurosat") -> str:
    """``python -m fewshot check`` on one dataset: exit 2, and its line (which must not be a traceback)."""
    rc = fewshot_cli.main(["check", "--data-root", str(data), "--count-tolerance", "none", *extra, dataset])
    out = capsys.readouterr()
    assert rc == 2, out
    assert "Traceback" not in out.out + out.err
    return next(ln for ln in out.out.splitlines() if ln.startswith(dataset))


def _sweep_refuses(tmp_path: Path, capsys, spec: Path, named: str) -> str:
    """The sweep exits 2 with one ``error:`` line naming ``named``, before Ray and without an output folder."""
    import ray

    from orchestrator.sweep import main

    out = tmp_path / "out"
    rc = main([str(spec), "--output", str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert not ray.is_initialized() and not out.exists()
    return lines[0]


def _rewrite_split(split_file: Path, edit) -> None:
    split = json.loads(split_file.read_text())
    edit(split)
    split_file.write_text(json.dumps(split))


# --- 1. a split file nested deeper than Python's recursion limit -----------------------------------


@pytest.mark.parametrize(
    "text", ["[" * 100_000 + "]" * 100_000, '{"train": ' + "[" * 100_000 + "]" * 100_000 + ', "val": [], "test": []}']
)
def test_deeply_nested_split_file_is_a_data_error(tmp_path, capsys, text):
    _, split_file = write_eurosat(tmp_path)
    split_file.write_text(text)
    with pytest.raises(DataError, match="nested too deeply") as exc:
        load_dataset("eurosat", tmp_path)
    assert str(split_file) in str(exc.value) and "\n" not in str(exc.value)
    line = _check_line(tmp_path, capsys)
    assert "malformed" in line and str(split_file) in line


def test_sweep_refuses_a_deeply_nested_split_file(tmp_path, capsys):
    data = tmp_path / "data"
    _, split_file = write_eurosat(data)
    split_file.write_text("[" * 100_000 + "]" * 100_000)
    _sweep_refuses(tmp_path, capsys, _sweep_spec(tmp_path, data), str(split_file))


# --- 2. a NUL byte in a path ----------------------------------------------------------------------


def test_nul_byte_in_a_split_path_names_the_entry(tmp_path, capsys):
    _, split_file = write_eurosat(tmp_path)
    _rewrite_split(split_file, lambda s: s["train"][3].__setitem__(0, "C3/train_0.png\u0000.png"))
    with pytest.raises(DataError, match=r"'train' entry 3 has path .*NUL byte") as exc:
        load_dataset("eurosat", tmp_path)
    assert str(split_file) in str(exc.value)
    line = _check_line(tmp_path, capsys)
    assert "malformed" in line and "'train' entry 3" in line


def test_nul_byte_in_an_image_path_is_an_image_error_where_images_are_opened(tmp_path):
    bad = str(tmp_path / "a\0b.png")
    for fn in (
        load_image,
        check_image,
        lambda p: ImageDataset([Item(p, 0, "a")], None)[0],
        lambda p: check_files_exist([Item(p, 0, "a")], "a list"),
    ):
        with pytest.raises(ImageError, match="NUL byte") as exc:
            fn(bad)
        assert "\n" not in str(exc.value)
    from orchestrator.feature_cache import items_fingerprint

    assert items_fingerprint([Item(bad, 0, "a")])  # the cache key of such a list is no ValueError either


# --- 3. paths that leave the image folder --------------------------------------------------------


def _outside_entry(tmp_path: Path, image_dir: Path, how: str) -> str:
    """Make train entry 0 point at a real image outside the image folder ``how``; returns its listed path."""
    secret = tmp_path / "elsewhere" / "secret.png"
    png(secret, (1, 2, 3))
    if how == "dotdot":
        return os.path.relpath(secret, image_dir)
    if how == "absolute":
        return str(secret)
    if how == "file link":
        (image_dir / "C0" / "link.png").symlink_to(secret)
        return "C0/link.png"
    (image_dir / "CX").symlink_to(secret.parent, target_is_directory=True)  # a linked class folder
    return "CX/secret.png"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "file link", "folder link"])
def test_split_paths_outside_the_image_folder_are_refused(tmp_path, capsys, how):
    data = tmp_path / "data"
    image_dir, split_file = write_eurosat(data)
    listed = _outside_entry(tmp_path, image_dir, how)
    _rewrite_split(split_file, lambda s: s["train"][0].__setitem__(0, listed))
    with pytest.raises(DataError, match=r"'train' entry 0 has path ") as exc:
        load_dataset("eurosat", data)  # what a trial reads, too
    assert str(split_file) in str(exc.value) and listed in str(exc.value)
    line = _check_line(data, capsys)
    assert "malformed" in line and "'train' entry 0" in line and "present" not in line.split()[1]
    if how == "file link":
        _sweep_refuses(tmp_path, capsys, _sweep_spec(tmp_path, data), str(split_file))


def test_linked_dataset_folders_and_inside_links_are_fine(tmp_path, capsys):
    """The data root, a dataset folder and its image folder may be links; a link to an image inside is fine."""
    real = tmp_path / "store"
    image_dir, split_file = write_eurosat(real)
    (image_dir / "C0" / "alias.png").symlink_to(image_dir / "C0" / "train_0.png")
    _rewrite_split(split_file, lambda s: s["test"][0].__setitem__(0, "C0/alias.png"))
    (tmp_path / "root").symlink_to(real, target_is_directory=True)
    ds = load_dataset("eurosat", tmp_path / "root")
    assert ds.test[0].impath.endswith("alias.png")
    # the image folder itself moved elsewhere and linked back (as docs/data.md shows for ImageNet)
    other = tmp_path / "linked"
    other.mkdir()
    (other / "eurosat").mkdir()
    (other / "eurosat" / "split_zhou_EuroSAT.json").write_text(split_file.read_text())
    (other / "eurosat" / "2750").symlink_to(image_dir, target_is_directory=True)
    assert (
        fewshot_cli.main(
            ["check", "--data-root", str(other), "--count-tolerance", "none", "--shots", "1", "--seeds", "1", "eurosat"]
        )
        == 0
    ), capsys.readouterr()


@pytest.mark.parametrize("how", ["class folder", "image"])
def test_imagenet_links_pointing_outside_are_refused(tmp_path, capsys, how):
    write_imagenet(tmp_path / "data")
    train = tmp_path / "data" / "imagenet" / "images" / "train"
    outside = tmp_path / "elsewhere"
    png(outside / "x.png", (9, 9, 9))
    if how == "class folder":
        wnid = "n01440764"
        victim = train / wnid
        for f in victim.iterdir():
            f.unlink()
        victim.rmdir()
        victim.symlink_to(outside, target_is_directory=True)
    else:
        victim = train / "n01443537" / "zz.png"
        victim.symlink_to(outside / "x.png")
    with pytest.raises(DataError, match="outside") as exc:
        load_dataset("imagenet", tmp_path / "data")
    assert str(victim) in str(exc.value) and "\n" not in str(exc.value)
    line = _check_line(tmp_path / "data", capsys, dataset="imagenet")
    assert "malformed" in line and str(victim) in line


def test_imagenet_with_linked_image_folders_is_fine(tmp_path):
    write_imagenet(tmp_path / "store")
    d = tmp_path / "data" / "imagenet"
    d.mkdir(parents=True)
    (d / "classnames.txt").write_text((tmp_path / "store" / "imagenet" / "classnames.txt").read_text())
    (d / "images").symlink_to(tmp_path / "store" / "imagenet" / "images", target_is_directory=True)
    assert len(load_dataset("imagenet", tmp_path / "data").train) == 12


def test_aircraft_image_id_leaving_the_images_folder(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("".join(f"V{i}\n" for i in range(100)))
    (d / "images_variant_train.txt").write_text("".join(f"{i:07d} V{i}\n" for i in range(100)))
    (d / "images_variant_val.txt").write_text("0000000 V0\n../../../etc/hostname V1\n")
    (d / "images_variant_test.txt").write_text("0000001 V1\n")
    with pytest.raises(DataError, match=r"images_variant_val.txt line 2: .*outside"):
        load_dataset("fgvc_aircraft", tmp_path)


# --- 4. a named pipe (or device) where an image should be ----------------------------------------


def _fifo_in_place_of(path: str):
    """Replace ``path`` by a FIFO; a watchdog opens its write end after a while, so a reader that did block
    on it gets an empty read (and a wrong error) instead of hanging the test run."""
    os.remove(path)
    os.mkfifo(path)

    def unblock():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader is blocked on it: nothing to do
            pass

    timer = threading.Timer(30, unblock)
    timer.daemon = True
    timer.start()
    return timer


def test_fifo_image_is_refused_without_opening_it(tmp_path, capsys):
    data = tmp_path / "data"
    write_eurosat(data)
    victim = fewshot_split(load_dataset("eurosat", data), 1, 1).train[2].impath
    timer = _fifo_in_place_of(victim)
    try:
        for fn in (
            load_image,
            check_image,
            lambda p: ImageDataset([Item(p, 0, "a")], None)[0],
            lambda p: check_files_exist([Item(p, 0, "a")], "a list"),
        ):
            with pytest.raises(ImageError, match=r"is a named pipe \(FIFO\), not an image file") as exc:
                fn(victim)
            assert victim in str(exc.value)
        line = _check_line(data, capsys, "--shots", "1", "--seeds", "1")
        assert "malformed" in line and victim in line and "named pipe" in line
        _sweep_refuses(tmp_path, capsys, _sweep_spec(tmp_path, data), victim)
    finally:
        timer.cancel()


def test_fifo_in_a_test_list_is_refused(tmp_path, capsys):
    write_eurosat(tmp_path)
    victim = load_dataset("eurosat", tmp_path).test[4].impath
    timer = _fifo_in_place_of(victim)
    try:
        with pytest.raises(ImageError, match="named pipe") as exc:
            check_sweep_data({}, tmp_path, targets=["eurosat"], tolerance=None)
        assert victim in str(exc.value)
    finally:
        timer.cancel()


def test_device_and_directory_are_not_image_files(tmp_path):
    assert "a character device" in str(file_problem(os.devnull))
    assert "a directory" in str(file_problem(str(tmp_path)))
    assert file_problem(str(tmp_path / "gone.png")).__class__.__name__ == "MissingImageError"
    png(tmp_path / "ok.png", (1, 1, 1))
    assert file_problem(str(tmp_path / "ok.png")) is None


# --- 6. a cache folder that cannot be written ----------------------------------------------------


@pytest.mark.parametrize("shape", ["a file", "below a file"])
def test_cache_that_is_not_a_folder_is_one_error_up_front(tmp_path, monkeypatch, capsys, shape):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    cache = blocker if shape == "a file" else blocker / "cache"
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(cache))
    with pytest.raises(ConfigError, match=r"\$PROMPTSWEEP_CACHE\) is unusable: .* is not a directory") as exc:
        check_cache_writable()
    assert str(cache) in str(exc.value)
    data = tmp_path / "data"
    write_eurosat(data)
    assert (
        fewshot_cli.main(["split", "--dataset", "eurosat", "--shots", "1", "--seed", "1", "--data-root", str(data)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: cache folder") and len(err.strip().splitlines()) == 1, err
    _sweep_refuses(tmp_path, capsys, _sweep_spec(tmp_path, data), "PROMPTSWEEP_CACHE")


def _data_with_a_file_for_cache(tmp_path: Path, monkeypatch, env: str) -> Path:
    """A small EuroSAT under ``tmp_path/data`` and ``$env`` pointing at a file where a cache folder should be."""
    blocker = tmp_path / f"blocker-{env}"
    blocker.write_text("not a folder")
    monkeypatch.setenv(env, str(blocker))
    data = tmp_path / "data"
    write_eurosat(data)
    return data


def test_model_cache_is_checked_for_the_project_backbone(tmp_path, monkeypatch, capsys):
    data = _data_with_a_file_for_cache(tmp_path, monkeypatch, "PROMPTSWEEP_MODEL_CACHE")
    spec = _sweep_spec(tmp_path, data, backbone={"arch": "promptsweep-mini", "pretrained": "promptsweep"})
    _sweep_refuses(tmp_path, capsys, spec, "PROMPTSWEEP_MODEL_CACHE")


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into a 0o555 folder, so permissions cannot make it read-only"
)
def test_read_only_populated_cache_is_one_error_up_front(tmp_path, capsys):
    data = tmp_path / "data"
    write_eurosat(data)
    fewshot_split(load_dataset("eurosat", data), 1, 1)  # populate splits/
    cache = tmp_path / "cache"
    folders = [cache, *[p for p in cache.rglob("*") if p.is_dir()]]
    for f in folders:
        f.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="cannot be written"):
            check_cache_writable()
        _sweep_refuses(tmp_path, capsys, _sweep_spec(tmp_path, data), "PROMPTSWEEP_CACHE")
    finally:
        for f in folders:
            f.chmod(0o755)


@contextmanager
def _read_only(folder: Path):
    """``folder`` made read-only: a read-only bind mount as root (root writes through permission bits),
    mode 0o555 otherwise; skipped where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("a read-only bind mount is not permitted here")
    try:
        if os.access(folder, os.W_OK) and _writable(folder):
            pytest.skip("the bind mount is not read-only here")
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_read_only_model_cache_holding_the_checkpoint_is_fine(tmp_path, monkeypatch, capsys):
    """The model cache is only read when the project checkpoint is already in it: read-only is then fine (the
    sweep goes on to its next check, here a missing image); without the checkpoint it is refused by name."""
    from methods.pretrain import checkpoint_path

    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("PROMPTSWEEP_MODEL_CACHE", str(models))
    data = tmp_path / "data"
    image_dir, _ = write_eurosat(data)
    (image_dir / "C0" / "test_0.png").unlink()
    spec = _sweep_spec(tmp_path, data, backbone={"arch": "promptsweep-mini", "pretrained": "promptsweep"})
    with _read_only(models):
        _sweep_refuses(tmp_path, capsys, spec, "PROMPTSWEEP_MODEL_CACHE")
    checkpoint_path("promptsweep-mini").write_bytes(b"stands for the built checkpoint: only its presence is checked")
    with _read_only(models):
        assert "test_0.png" in _sweep_refuses(tmp_path, capsys, spec, "test_0.png")


def test_split_cache_nested_too_deeply_is_a_data_error(tmp_path):
    from fewshot.sampling import split_cache_path

    data = tmp_path / "data"
    write_eurosat(data)
    ds = load_dataset("eurosat", data)
    fewshot_split(ds, 1, 1)
    cached = split_cache_path("eurosat", 1, 1)
    cached.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        fewshot_split(ds, 1, 1)


def test_trial_cli_checks_the_cache_folder_first(tmp_path, monkeypatch, capsys):
    from orchestrator import trial

    data = _data_with_a_file_for_cache(tmp_path, monkeypatch, "PROMPTSWEEP_CACHE")
    rc = trial.main(
        ["--method", "zeroshot", "--dataset", "eurosat", "--shots", "1", "--seed", "1", "--data-root", str(data)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cache folder") and "PROMPTSWEEP_CACHE" in err, err
    assert len(err.strip().splitlines()) == 1


def test_dangling_link_in_a_dataset_folder_is_no_traceback(tmp_path, capsys):
    """An unlisted broken link beside the split file is ignored; a listed one is a missing image."""
    _, split_file = write_eurosat(tmp_path)
    (tmp_path / "eurosat" / "dangling").symlink_to(tmp_path / "gone")
    assert len(load_dataset("eurosat", tmp_path).test) == 10
    (tmp_path / "eurosat" / "2750" / "C0" / "broken.png").symlink_to(tmp_path / "eurosat" / "2750" / "C0" / "gone.png")
    _rewrite_split(split_file, lambda s: s["test"][0].__setitem__(0, "C0/broken.png"))
    line = _check_line(tmp_path, capsys)
    assert "malformed" in line and "broken.png is missing" in line
