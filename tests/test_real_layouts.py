"""Data laid out the way the field lays it out, including the usual half-prepared states: a flat ImageNet
val, unextracted train archives, a missing test image, a partial download. Each is refused up front with
its fix — never scored as 0 % — and the sweep checks resources first, prints its data check, takes
``--data-root``, ends a recorded MLflow run on an early exit, and reads a dataset once per process."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from fewshot import cli as fewshot_cli
from fewshot.errors import DataError, EmptySplitError
from fewshot.registry import forget_loaded, load_dataset
from fewshot.validate import check_sizes
from tests.layouts import WNIDS, write_imagenet, write_imagenet_variant, write_pets


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PROMPTSWEEP_DATA", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# --- ImageNet half-prepared ---------------------------------------------------------------------------------


def test_flat_imagenet_val_is_named_with_its_fix(tmp_path, capsys):
    write_imagenet(tmp_path, flat_val=True)
    with pytest.raises(
        DataError,
        match=r"images/val is flat \(6 images such as ILSVRC2012_val_00000000.png, no "
        r"folder per class\): re-folder it by wnid",
    ):
        load_dataset("imagenet", tmp_path)
    assert fewshot_cli.main(["check", "--data-root", str(tmp_path), "imagenet"]) == 2
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("imagenet")][0]
    assert line.split()[1] == "malformed" and "is flat" in line


def test_partly_foldered_imagenet_val_is_refused(tmp_path):
    d = write_imagenet(tmp_path)
    (d / "images" / "val" / "ILSVRC2012_val_00049999.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="has 1 loose image\\(s\\) beside its 3 class folders"):
        load_dataset("imagenet", tmp_path)


def test_unextracted_imagenet_train_archives_are_named(tmp_path):
    d = write_imagenet(tmp_path)
    for w in WNIDS:  # ILSVRC2012_img_train.tar extracted one level only: one tar per class, no folders
        for f in (d / "images" / "train" / w).iterdir():
            f.unlink()
        (d / "images" / "train" / w).rmdir()
        (d / "images" / "train" / f"{w}.tar").write_bytes(b"")
    with pytest.raises(DataError) as exc:
        load_dataset("imagenet", tmp_path)
    msg = str(exc.value)
    assert "holds 3 unextracted class archive(s) (e.g. n01440764.tar) next to 0 class folder(s)" in msg
    assert "tar -xf" in msg and "not classes of images/train" not in msg


# --- empty splits and counts --------------------------------------------------------------------------------


def test_an_empty_split_is_an_error_whatever_the_tolerance(tmp_path):
    d = write_pets(tmp_path)
    split = json.loads((d / "split_zhou_OxfordPets.json").read_text())
    split["val"] = []
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    ds = load_dataset("oxford_pets", tmp_path)
    with pytest.raises(EmptySplitError, match="the val split is empty \\(train 37, val 0, test 37 images\\)"):
        check_sizes(ds, tolerance=None)
    check_sizes(ds, needs_train=False, tolerance=None)  # as a target only its test split is read


def test_image_counts_are_compared_with_the_published_sizes(tmp_path):
    ds = load_dataset("oxford_pets", write_pets(tmp_path).parent)
    with pytest.raises(
        DataError,
        match="by more than 1%: train 37 \\(published: 2944\\), val 37 \\(published: 736\\), "
        "test 37 \\(published: 3669\\)",
    ):
        check_sizes(ds)
    check_sizes(ds, tolerance=None)
    with pytest.raises(DataError, match="more than 1%: test 37"):  # a target: only its test split counts
        check_sizes(ds, needs_train=False)


def test_trial_over_an_empty_test_split_fails_with_error_class_empty_split(tmp_path):
    from orchestrator.trial import TrialRequest, run_trial

    d = write_pets(tmp_path)
    split = json.loads((d / "split_zhou_OxfordPets.json").read_text())
    split["test"] = []
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    req = TrialRequest(method="zeroshot", dataset="oxford_pets", shots=1, seed=1, data_root=str(tmp_path), device="cpu")
    with pytest.raises(EmptySplitError, match="the test split of oxford_pets has no images") as exc:
        run_trial(req)
    assert exc.value.error_class == "empty_split"


# --- the sweep: refused up front ----------------------------------------------------------------------------


def _spec(tmp_path, **extra):
    spec = {
        "name": "layout",
        "methods": ["zeroshot"],
        "datasets": ["oxford_pets"],
        "shots": [1],
        "seeds": [1],
        "count_tolerance": None,
        "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(args, capsys):
    from orchestrator.sweep import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_missing_test_image_stops_the_sweep_before_training(tmp_path, capsys):
    import ray

    data = tmp_path / "data"
    victim = sorted((write_pets(data) / "images").glob("*_test_0.png"))[5]
    victim.unlink()
    rc, out, err = _sweep([_spec(tmp_path), "--data-root", data, "--output", tmp_path / "out"], capsys)  # --data-root
    assert rc == 2, err
    assert (
        err.startswith(f"error: image file {victim} is missing")
        and "1 of the 37 images of the test split of 'oxford_pets' are missing" in err
        and len(err.strip().splitlines()) == 1
    )
    assert "checking data: 1 dataset(s)" in out
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_a_partial_download_stops_the_sweep_naming_the_tolerance(tmp_path, capsys):
    data = tmp_path / "data"
    write_pets(data)
    spec = _spec(tmp_path, data_root=str(data))
    raw = yaml.safe_load(spec.read_text())
    raw.pop("count_tolerance")  # the default, 1 %
    spec.write_text(yaml.safe_dump(raw))
    rc, _, err = _sweep([spec, "--output", tmp_path / "out"], capsys)
    assert rc == 2 and "image counts differ from the published split by more than 1%" in err
    assert "count_tolerance in the spec" in err and not (tmp_path / "out").exists()


def test_bad_data_root_flag_is_one_line(tmp_path, capsys):
    rc, _, err = _sweep([_spec(tmp_path), "--data-root", tmp_path / "nowhere"], capsys)
    assert (
        rc == 2
        and err.strip()
        == f"error: --data-root: '{tmp_path / 'nowhere'}' is not a directory (it should hold "
        "the datasets' folders, see docs/data.md)"
    )


def test_a_tied_head_needs_the_targets_class_names_among_the_sources(tmp_path, capsys):
    data = tmp_path / "data"
    write_imagenet(data)
    a = write_imagenet_variant(data, "imagenet_a")
    (a / "classnames.txt").write_text((a / "classnames.txt").read_text().replace("goldfish", "goldfish (carassius)"))
    spec = _spec(
        tmp_path,
        methods=["tgpt"],
        datasets=["imagenet"],
        protocol="domain_generalization",
        targets=["imagenet_a"],
        data_root=str(data),
    )
    rc, out, err = _sweep([spec, "--output", tmp_path / "out"], capsys)
    assert rc == 2, err
    assert (
        "target imagenet_a has 1 class name(s) that are not imagenet class names (e.g. 'goldfish (carassius)')" in err
    )
    assert "2/2 imagenet_a (target)" in out


def test_an_early_exit_ends_the_recorded_mlflow_run_failed_with_the_reason(tmp_path, capsys):
    """A resumed sweep that stops in its data check: the run it recorded does not stay RUNNING."""
    from mlflow.tracking import MlflowClient

    from orchestrator.spec import load_spec

    data = tmp_path / "data"
    write_pets(data)
    spec_path = _spec(tmp_path, data_root=str(data), tracking={"experiment": "layout"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("layout"), run_name="sweep layout")
    spec = load_spec(spec_path)
    out = tmp_path / "out" / "layout"
    out.mkdir(parents=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "spec": spec.normalized(),
                "spec_hash": spec.spec_hash(),
                "status": "running",
                "tracking_uri": uri,
                "parent_run_id": run.info.run_id,
            }
        )
    )
    victim = next((data / "oxford_pets" / "images").glob("*_test_0.png"))
    victim.unlink()
    rc, _, err = _sweep([spec_path, "--output", tmp_path / "out"], capsys)
    assert rc == 2 and str(victim) in err
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FAILED" and str(victim) in got.data.tags["failure_reason"]
    assert got.data.tags["failure_reason"].startswith("MissingImageError: image file")


# --- speed at size: read once, fingerprint once, files as readable as the results ------------------------------


def test_a_dataset_is_read_once_per_process_until_its_folders_change(tmp_path):
    write_imagenet_variant(tmp_path, "imagenet_sketch")
    forget_loaded()
    first = load_dataset("imagenet_sketch", tmp_path)
    assert load_dataset("imagenet_sketch", tmp_path) is first
    (tmp_path / "imagenet-sketch" / "images" / "n01440764" / "9.png").write_bytes(b"")
    again = load_dataset("imagenet_sketch", tmp_path)
    assert again is not first and len(again.test) == len(first.test) + 1


def test_a_cached_split_costs_its_own_entries_not_a_pass_over_the_dataset(tmp_path, monkeypatch):
    """The fingerprint of the train/val lists is computed once per dataset object; reading a cached split
    touches its K x C entries only (their stored positions, checked against the paths)."""
    from fewshot import sampling

    write_imagenet(tmp_path, train_per_class=6)
    ds = load_dataset("imagenet", tmp_path)
    first = sampling.fewshot_split(ds, 2, 1)  # sampled: fingerprints the 18 + 6 train/val items once
    calls = []
    relative = sampling._relative
    monkeypatch.setattr(sampling, "_relative", lambda p, r: calls.append(p) or relative(p, r))
    again = sampling.fewshot_split(ds, 2, 1)  # read back from the cache file
    assert again.train == first.train and again.val == first.val
    assert sorted(calls) == sorted(it.impath for it in first.train + first.val)  # 6 + 6 entries, no pass
    calls.clear()
    other = sampling.fewshot_split(ds, 4, 2)  # sampled and written: only its own 12 + 6 items
    assert len(calls) == len(other.train) + len(other.val) == 18


def test_a_cache_written_without_positions_is_still_read(tmp_path):
    from fewshot import sampling

    write_imagenet(tmp_path, train_per_class=6)
    ds = load_dataset("imagenet", tmp_path)
    first = sampling.fewshot_split(ds, 2, 1)
    path = sampling.split_cache_path("imagenet", 2, 1)
    data = json.loads(path.read_text())
    del data["train_positions"], data["val_positions"]
    path.write_text(json.dumps(data))
    assert sampling.fewshot_split(ds, 2, 1) == first
    data["train_positions"] = [0] * len(data["train"])  # positions that disagree with the paths: corrupt
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"is corrupt \('train' entry"):
        sampling.fewshot_split(ds, 2, 1)


def test_split_cache_files_get_the_result_files_mode(tmp_path):
    from fewshot.paths import FILE_MODE
    from fewshot.sampling import fewshot_split, split_cache_path

    write_pets(tmp_path)
    fewshot_split(load_dataset("oxford_pets", tmp_path), 1, 3)
    mode = os.stat(split_cache_path("oxford_pets", 1, 3)).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == FILE_MODE == 0o666 & ~umask


@pytest.mark.slow
def test_a_sweep_that_fails_after_its_mlflow_run_exists_ends_it_failed(tmp_path):
    """The tuner cannot be built (injected): the sweep run and nothing else is left, ended FAILED with the reason."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    spec = {
        "name": "early",
        "methods": ["zeroshot"],
        "datasets": ["digits"],
        "shots": [1],
        "seeds": [1],
        "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
        "tracking": {"experiment": "early"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = (
        "import sys\nimport orchestrator.tune_runner as t\nfrom fewshot.errors import ConfigError\n"
        "def boom(*a, **k):\n    raise ConfigError('injected: the tuner cannot be built')\n"
        "t.build_tuner = boom\nfrom orchestrator.sweep import main\n"
        f"sys.exit(main([{str(tmp_path / 'spec.yaml')!r}, '--output', {str(tmp_path / 'out')!r}, "
        f"'--tracking-uri', {uri!r}]))\n"
    )
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2 and "error: injected: the tuner cannot be built" in r.stderr, r.stderr[-2000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("early").experiment_id])
    assert [(x.info.status, x.data.tags["failure_reason"]) for x in runs] == [
        ("FAILED", "ConfigError: injected: the tuner cannot be built")
    ]
