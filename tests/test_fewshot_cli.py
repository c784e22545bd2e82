"""``python -m fewshot check|split`` run as a subprocess: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fewshot.registry import load_dataset
from fewshot.sampling import fewshot_split


def run_cli(*args, env_extra=None, drop_data_env=True):
    env = dict(os.environ)
    if drop_data_env:
        env.pop("PROMPTSWEEP_DATA", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "fewshot", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def write_eurosat(root, bad_label=False):
    """A fake EuroSAT (10 classes) with 6 train / 3 val / 2 test images per class (empty files: ``check``
    without --shots only checks that they exist)."""
    (root / "eurosat" / "2750").mkdir(parents=True)
    split = {
        part: [[f"C{lab}/{part}_{i}.jpg", lab, f"class {lab}"] for i in range(n) for lab in range(10)]
        for part, n in (("train", 6), ("val", 3), ("test", 2))
    }
    for part in split.values():
        for rel, _, _ in part:
            (root / "eurosat" / "2750" / rel).parent.mkdir(exist_ok=True)
            (root / "eurosat" / "2750" / rel).touch()
    if bad_label:
        split["val"][4][1] = 12
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    write_eurosat(root)
    (root / "dtd").mkdir()  # folder without images/split: missing
    return root


def test_check_reports_present_missing_malformed(data_root, tmp_path):
    bad = tmp_path / "bad"
    write_eurosat(bad, bad_label=True)
    small = run_cli("check", "--data-root", data_root, "eurosat")  # 60 of EuroSAT's 13,500 training images
    assert small.returncode == 2, small.stderr
    line = [ln for ln in small.stdout.splitlines() if ln.startswith("eurosat")][0]
    assert line.split()[1] == "mismatch" and "classes 10/10" in line
    assert "train 60/13500 !" in line and "val 30/5400 !" in line and "test 20/8100 !" in line
    assert "by more than 1%: train 60 (published: 13500), val 30 (published: 5400), test 20 (published: 8100)" in line
    assert "--count-tolerance" in line
    ok = run_cli("check", "--data-root", data_root, "--count-tolerance", "none", "eurosat")  # a deliberate subset
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = [ln for ln in ok.stdout.splitlines() if ln.startswith("eurosat")][0]
    assert line.split()[1] == "present" and "within the tolerance" in line
    both = run_cli("check", "--data-root", data_root, "--count-tolerance", "none", "eurosat", "dtd", "digits")
    assert both.returncode == 2
    lines = {ln.split()[0]: ln for ln in both.stdout.splitlines()[1:]}
    assert lines["dtd"].split()[1] == "missing" and "dtd/images" in lines["dtd"]
    assert lines["digits"].split()[1] == "present" and "classes 10/10" in lines["digits"]
    malformed = run_cli("check", "--data-root", bad, "--count-tolerance", "none", "eurosat")
    assert malformed.returncode == 2
    assert "malformed" in malformed.stdout and "label 12, outside 0..9" in malformed.stdout


def test_check_all_defaults_to_the_15_standard_datasets(data_root):
    res = run_cli("check", env_extra={"PROMPTSWEEP_DATA": str(data_root)}, drop_data_env=False)
    assert res.returncode == 2
    rows = [ln.split()[:2] for ln in res.stdout.splitlines()[1:]]
    assert len(rows) == 15 and rows[0] == ["imagenet", "missing"]
    assert ["eurosat", "mismatch"] in rows


def test_split_json_matches_library(data_root):
    res = run_cli("split", "--dataset", "eurosat", "--shots", "4", "--seed", "2", "--data-root", data_root, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    split = fewshot_split(load_dataset("eurosat", data_root), 4, 2)
    assert out["train"] == [[it.impath.split("/2750/")[1], it.label, it.classname] for it in split.train]
    assert out["val"] == [[it.impath.split("/2750/")[1], it.label, it.classname] for it in split.val]
    assert len(out["train"]) == 40 and len(out["val"]) == 30


def test_split_offline_digits_without_data_root():
    res = run_cli("split", "--dataset", "digits", "--shots", "1", "--seed", "1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [e[1] for e in out["train"]] == list(range(10)) and out["train"][0][0].startswith("zero/")
    assert len(out["val"]) == 10
    plain = run_cli("split", "--dataset", "digits", "--shots", "1", "--seed", "1")
    assert plain.returncode == 0 and "10 train, 10 val" in plain.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["split", "--dataset", "mnist", "--shots", "1", "--seed", "1", "--data-root", "{root}"],
            "unknown dataset 'mnist': choose one of imagenet, caltech101",
        ),
        (["check", "--data-root", "{root}", "mnist"], "unknown dataset 'mnist'"),
        (["split", "--dataset", "eurosat", "--shots", "1", "--seed", "1"], "no data root given.*PROMPTSWEEP_DATA"),
        (["check", "eurosat"], "no data root given"),
        (["check", "--data-root", "{root}/nowhere", "eurosat"], "data root .*/nowhere does not exist"),
        (
            ["split", "--dataset", "dtd", "--shots", "1", "--seed", "1", "--data-root", "{root}"],
            "image folder .*dtd/images .* is missing",
        ),
        (
            ["split", "--dataset", "eurosat", "--shots", "1", "--seed", "1", "--data-root", "{bad}"],
            "split_zhou_EuroSAT.json: 'val' entry 4 has label 12",
        ),
        (["split", "--dataset", "eurosat", "--shots", "two", "--seed", "1"], "argument --shots: invalid int value"),
        (["split", "--shots", "1", "--seed", "1"], "required: --dataset"),
        ([], "required: command"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exit_2_one_line(data_root, tmp_path, args, message):
    import re

    bad = tmp_path / "bad"
    write_eurosat(bad, bad_label=True)
    res = run_cli(*[a.format(root=data_root, bad=bad) for a in args])
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
