"""One trial end to end on digits with the tiny backbone: metrics, resume, protocols, errors, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fewshot.errors import CheckpointError, ConfigError, TrainingError
from methods.base import TrainConfig
from orchestrator import training
from orchestrator.trial import TrialRequest, run_trial

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _req(**kw):
    base = dict(
        method="coop",
        dataset="digits",
        shots=2,
        seed=1,
        device="cpu",
        overrides={"epochs": 3, "n_ctx": 4, "batch_size": 8, "lr": 0.05},
    )
    base.update(kw)
    return TrialRequest(**base)


def test_resume_from_an_epoch_checkpoint_matches_uninterrupted(tiny_backbone, tmp_path):
    saved, reports = {}, []

    def report(metrics, checkpoint_dir=None):
        reports.append(dict(metrics))
        if metrics.get("epoch") == 1 and checkpoint_dir is not None:
            saved["dir"] = shutil.copytree(checkpoint_dir, tmp_path / "kept")

    full = run_trial(_req(), output_dir=tmp_path / "a", report=report)
    assert [r["epoch"] for r in reports[:-1]] == [1, 2, 3] and all("val_acc" in r for r in reports[:-1])
    assert reports[-1] == full and full["epochs_run"] == 3
    resumed_reports = []
    resumed = run_trial(
        _req(), output_dir=tmp_path / "b", resume_from=saved["dir"], report=lambda m, d=None: resumed_reports.append(m)
    )
    assert [r["epoch"] for r in resumed_reports[:-1]] == [2, 3]
    for a, b in zip(reports[1:3], resumed_reports[:2]):
        assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]
    for key in ("val_acc", "test_acc", "epochs_run", "test_images_read"):
        assert resumed[key] == full[key], key
    # only the newest checkpoint is kept on disk
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["epoch_0003"]


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        run_trial(_req(), resume_from=tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        run_trial(_req(), resume_from=tmp_path / "missing")


def test_base2novel_reports_base_novel_and_hm(tiny_backbone):
    out = run_trial(_req(protocol="base2novel", overrides={"epochs": 1, "batch_size": 8}))
    b, n = out["base_acc"], out["novel_acc"]
    assert out["hm"] == pytest.approx(2 * b * n / (b + n))
    assert "test_acc" not in out and out["test_images_read"] > 0


@pytest.mark.parametrize("feature_cache", [False, True])
def test_search_stage_reads_no_test_images(tiny_backbone, monkeypatch, feature_cache):
    from fewshot import images
    from orchestrator import feature_cache as fc

    splits = []  # every split a dataset (images, or cached features) was built for
    orig_img, orig_feat = images.ImageDataset.__init__, fc.FeatureDataset.__init__

    def spy_img(self, items, transform=None, split="train"):
        splits.append(split)
        orig_img(self, items, transform, split)

    def spy_feat(self, views, labels, split, items=None):
        splits.append(split)
        orig_feat(self, views, labels, split, items)

    monkeypatch.setattr(images.ImageDataset, "__init__", spy_img)
    monkeypatch.setattr(fc.FeatureDataset, "__init__", spy_feat)
    over = {"epochs": 1, "n_ctx": 2, "feature_cache": feature_cache}
    out = run_trial(_req(stage="search", overrides=over))
    assert "test" not in splits and out["test_images_read"] == 0 and "test_acc" not in out
    assert out["val_acc"] is not None
    final = run_trial(_req(stage="final", overrides=over))
    assert "test" in splits and final["test_images_read"] == 540  # every digits test image once
    assert final["val_acc"] == out["val_acc"]  # same seed, same training


def test_zero_shot_runs_without_epochs(tiny_backbone):
    out = run_trial(_req(method="zeroshot", overrides={}))
    assert out["epochs_run"] == 0 and 0 <= out["test_acc"] <= 100


def test_training_throughput_counts_the_examples_stepped(tiny_backbone):
    # digits 2-shot: 20 training images; batch 8 with drop_last -> 16 per epoch, 3 epochs
    out = run_trial(_req())
    assert out["train_images"] == 3 * 16 and out["train_images_per_s"] > 0
    # the trial's cost in images: those stepped, and the 20 validation images after each epoch plus the test split
    assert out["images_trained"] == 3 * 16 and out["images_evaluated"] == 3 * 20 + out["test_images_read"] == 600
    zs = run_trial(_req(method="zeroshot", overrides={}))
    assert "train_images" not in zs  # nothing trained by gradient
    assert zs["images_trained"] == 0 and zs["images_evaluated"] == 20 + 540
    lp = run_trial(_req(method="linear_probe", overrides={}, stage="search"))  # a closed-form fit reads the split once
    assert lp["images_trained"] == 20 and lp["images_evaluated"] == 20 and lp["test_images_read"] == 0


def test_nan_loss_stops_with_nan_loss_error(tiny_backbone, monkeypatch):
    from methods.coop import CoOp

    def bad_loss(self, images, labels, indices=None):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(CoOp, "training_loss", bad_loss)
    with pytest.raises(TrainingError) as err:
        run_trial(_req())
    assert err.value.error_class == "nan_loss"


def test_best_val_selection_evaluates_the_best_state(tiny_backbone):
    reports = []
    out = run_trial(
        _req(overrides={"epochs": 3, "n_ctx": 2, "lr": 0.5, "selection": "best_val"}),
        report=lambda m, d=None: reports.append(m),
    )
    assert out["val_acc"] == max(r["val_acc"] for r in reports[:-1])


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="unknown setting 'bogus'.*n_ctx"):
        run_trial(_req(overrides={"bogus": 1}))
    with pytest.raises(ConfigError, match="optimizer"):
        run_trial(_req(overrides={"optimizer": "lion"}))
    with pytest.raises(ConfigError, match="targets"):
        run_trial(_req(protocol="cross_dataset"))


def test_schedule_constant_warmup_then_cosine():
    cfg = TrainConfig(lr=0.002, epochs=4, warmup_epochs=1, warmup_lr=1e-5, warmup_type="constant")
    f = [training.lr_factor(s, cfg, steps_per_epoch=5) for s in range(20)]
    assert f[:5] == [pytest.approx(1e-5 / 0.002)] * 5
    assert f[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 20)))
    assert all(a >= b for a, b in zip(f[5:], f[6:]))
    lin = TrainConfig(lr=0.01, epochs=2, warmup_iters=4, warmup_lr=0.0, warmup_type="linear", scheduler="constant")
    assert [training.lr_factor(s, lin, 10) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_train_loader_drops_last_only_when_full():
    data = list(range(5))
    g = torch.Generator().manual_seed(0)
    assert training.train_loader(data, TrainConfig(batch_size=8), g).drop_last is False
    assert training.train_loader(data, TrainConfig(batch_size=2), g).drop_last is True


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.trial", *args, "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def test_cli_prints_final_metrics_json():
    r = _cli(
        "--method",
        "coop",
        "--dataset",
        "digits",
        "--shots",
        "1",
        "--seed",
        "2",
        "--set",
        "epochs=1",
        "--set",
        "n_ctx=2",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["epochs_run"] == 1 and {"val_acc", "test_acc", "wall_time_s", "test_images_read"} <= set(out)


@pytest.mark.slow
def test_cli_user_errors_exit_2_with_one_message(tmp_path):
    bad_ckpt = tmp_path / "file.pt"
    bad_ckpt.write_bytes(b"garbage")
    bad_split = tmp_path / "root" / "eurosat"
    bad_split.mkdir(parents=True)
    (bad_split / "split_zhou_EuroSAT.json").write_text("{not json")
    cases = [
        (["--method", "nope", "--dataset", "digits"], "unknown method 'nope'.*coop"),
        (["--method", "coop", "--dataset", "nope"], "unknown dataset 'nope'.*digits"),
        (
            ["--method", "coop", "--dataset", "eurosat", "--data-root", str(tmp_path / "absent")],
            str(tmp_path / "absent"),
        ),
        (["--method", "coop", "--dataset", "eurosat", "--data-root", str(tmp_path / "root")], "eurosat|EuroSAT"),
        (["--method", "coop", "--dataset", "digits", "--pretrained", str(bad_ckpt)], "could not load checkpoint"),
        (["--method", "coop", "--dataset", "digits", "--pretrained", "/bad/file.pt"], "not found: /bad/file.pt"),
        (["--method", "coop", "--dataset", "digits", "--set", "colour=red"], "unknown setting 'colour'"),
        (["--method", "coop", "--dataset", "digits", "--set", "n_ctx=-3"], "n_ctx"),
        (["--method", "coop", "--dataset", "digits", "--resume", str(bad_ckpt)], "unreadable"),
    ]
    import re

    for args, pattern in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert re.search(pattern, lines[0]), (args, lines[0])


def test_cross_dataset_evaluates_each_target_with_its_classes(tiny_backbone, tmp_path):
    out = run_trial(
        _req(protocol="cross_dataset", targets=["shapes"], overrides={"epochs": 1, "n_ctx": 2}), output_dir=tmp_path
    )
    assert out["target_avg"] == out["acc_shapes"] and 0 <= out["test_acc"] <= 100
    # a checkpoint of another configuration does not fit: one clear CheckpointError
    with pytest.raises(CheckpointError, match="does not fit"):
        run_trial(_req(overrides={"epochs": 2, "n_ctx": 4}), resume_from=tmp_path / "checkpoints" / "epoch_0001")


def test_max_iters_schedule_stops_mid_epoch(tiny_backbone):
    reports = []
    out = run_trial(
        _req(
            overrides={
                "max_iters": 3,
                "batch_size": 8,
                "n_ctx": 2,
                "optimizer": "adamw",
                "warmup_iters": 1,
                "warmup_type": "linear",
            }
        ),
        report=lambda m, d=None: reports.append(m),
    )
    # 2 shots x 10 classes = 20 images -> 2 full batches per epoch: 3 steps end inside epoch 2
    assert [r["step"] for r in reports[:-1]] == [2, 3] and out["epochs_run"] == 2
