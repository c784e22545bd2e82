"""Every script in benchmarks/ runs end to end with its smallest settings.

Only the contract is checked: exit status 0 and a last stdout line that is a JSON object with the
expected keys. No timing or memory figure is asserted (they depend on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_memory_benchmark_last_line_is_json():
    out = _run("memory.py", "--classes", "2,4", "--batch-size", "2")
    assert out["benchmark"] == "memory"
    for key in (
        "device",
        "arch",
        "torch",
        "batch_size",
        "classes",
        "measure",
        "peak_mib",
        "ratio_to_smallest_c",
        "ratio_largest_to_smallest_c",
    ):
        assert key in out, key
    assert out["classes"] == [2, 4]
    assert set(out["peak_mib"]) == {"coop", "sep", "tgpt"}
    assert set(out["peak_mib"]["coop"]) == {"2", "4"}
    assert set(out["ratio_largest_to_smallest_c"]) == {"coop", "sep", "tgpt"}


@pytest.mark.slow
def test_step_time_benchmark_last_line_is_json():
    from methods.registry import get_method, method_names

    out = _run("step_time.py", "--classes", "4", "--batch-size", "2", "--warmup", "1", "--steps", "2")
    assert out["benchmark"] == "step_time"
    for key in ("device", "arch", "torch", "batch_size", "classes", "floor", "floor_ms", "median_ms", "ratio_to_floor"):
        assert key in out, key
    gradient = {m for m in method_names() if get_method(m).trains_by_gradient}
    assert set(out["median_ms"]) == gradient
    assert set(out["ratio_to_floor"]) == gradient


@pytest.mark.slow
def test_overhead_benchmark_runs_and_loads_weights_once_per_worker():
    out = _run("overhead.py", "--n", "2", "--skip", "tune_default", "--skip", "promptsweep_nocache")
    ways = out["ways"]
    assert set(ways) == {"process_loop", "promptsweep"} and out["speedup_vs"]["process_loop"] > 0
    assert ways["process_loop"]["backbone_loads_per_trial"] == 1.0
    assert ways["promptsweep"]["backbone_loads_per_worker"] == [1] * ways["promptsweep"]["worker_processes"]


@pytest.mark.slow
def test_feature_cache_benchmark_agrees_for_coop_and_tgpt():
    out = _run(
        "feature_cache.py",
        "--methods",
        "coop,tgpt",
        "--seeds",
        "1",
        "--shots",
        "1",
        "--epochs",
        "1",
        "--max-iters",
        "1",
    )
    assert set(out["methods"]) == {"coop", "tgpt"} and all(r["agree"] for r in out["methods"].values())


@pytest.mark.slow
def test_packing_benchmark_smoke_run_on_cpu():
    out = _run(
        "packing.py",
        "--device",
        "cpu",
        "--per-gpu",
        "1",
        "--methods",
        "coop",
        "--seeds",
        "2",
        "--shots",
        "1",
        "--epochs",
        "1",
    )
    assert out["benchmark"] == "packing" and out["bare"]["images_per_s"] > 0
    run = out["per_gpu"]["1"]
    assert run["trials"] == 2 and run["trials_per_hour"] > 0 and run["train_images_per_s"] > 0
    assert run["gpu_util_mean"] is None or 0 <= run["gpu_util_mean"] <= 100
    assert set(out["method_vs_bare"]) == {"coop"}


def test_imagenet_scale_benchmark_last_line_is_json(tmp_path):
    out = _run(
        "imagenet_scale.py",
        "--root",
        str(tmp_path / "tree"),
        "--classes",
        "4",
        "--per-class",
        "20",
        "--val-per-class",
        "3",
    )
    assert out["benchmark"] == "imagenet_scale"
    assert (out["train_images"], out["test_images"], out["classes"]) == (80, 12, 4)
    for key in (
        "load_cold",
        "load_again",
        "split_first",
        "split_cached",
        "split_cached_new_process",
        "check_shots",
        "preflight",
        "ratio_load_cold_to_split_cached",
    ):
        assert key in out, key


@pytest.mark.slow
def test_mini_benchmark_prints_both_tables_and_json(mini_backbone):
    out = _run(
        "mini_benchmark.py",
        "--methods",
        "zeroshot,coop",
        "--shots",
        "1,2",
        "--epochs",
        "1",
        "--b2n-shots",
        "2",
        "--threads",
        "1",
    )
    assert out["benchmark"] == "mini_benchmark"
    assert set(out["fewshot"]) == {"zeroshot", "coop"} and set(out["fewshot"]["coop"]) == {"1", "2"}
    assert set(out["base2novel"]["coop"]) == {"base", "novel", "hm"}
    assert set(out["gain_vs_zeroshot"]["coop"]) == {"1", "2"} and out["wall_s"]["coop"] > 0


@pytest.mark.slow
def test_scale_benchmark_runs_trials_that_train_and_prints_both_tenths(tmp_path):
    out = _run(
        "scale.py", "--n", "10", "--method", "coop", "--epochs", "2", "--batch-size", "8", "--work", str(tmp_path)
    )
    assert out["benchmark"] == "scale" and out["method"] == "coop" and [r["n"] for r in out["runs"]] == [10]
    run = out["runs"][0]
    for part in ("first_tenth", "last_tenth", "ratio_last_first"):
        assert set(run[part]) == {"gap_ms", "cpu_ms_per_trial", "kb_written_per_trial", "rss_mb"}, part
    assert run["trials_compute_s"] > 0 and run["wall_s"] > run["trials_compute_s"] / 2
