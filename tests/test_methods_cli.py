"""``python -m methods list|info`` through a subprocess: registered methods, ViT-B-16 counts, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "methods", *args], capture_output=True, text=True, env=ENV, timeout=300
    )


def test_list_prints_methods_with_protocols_and_the_family_matrix():
    r = _run("list")
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("\n\n")[0].splitlines()
    header, rows = table[0].split(), {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert header == ["method", "protocols", "clip-vit", "siglip", "eva", "resnet", "convnext"]
    assert rows["coop"] == ["fewshot,base2novel,cross_dataset,domain_generalization", "yes", "yes", "yes", "yes", "yes"]
    assert rows["vpt"][1:] == rows["tgpt"][1:] == ["yes", "yes", "yes", "-", "-"]
    assert set(rows) == {"cocoop", "coop", "kgcoop", "linear_probe", "maple", "sep", "spt", "tgpt", "vpt", "zeroshot"}
    assert "siglip    SigLIP / SigLIP 2" in r.stdout


def test_families_lists_configs_and_refusals():
    r = _run("families", "--all")
    assert r.returncode == 0, r.stderr
    assert "resnet (10): RN101, RN101-quickgelu, RN50," in r.stdout and "eva (7): EVA01-g-14" in r.stdout
    assert "refused (58):" in r.stdout and "  ViT-L-14-CLIPA: its ViT pools with pool_type 'avg'" in r.stdout


def test_info_counts_coop_on_vit_b16():
    r = _run("info", "--method", "coop", "--arch", "ViT-B-16", "--classes", "10", "--set", "n_ctx=4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["trainable_params"] == 2048 and out["breakdown"] == {"ctx": 2048}
    assert out["frozen_params"] > 100_000_000
    r = _run(
        "info",
        "--method",
        "coop",
        "--arch",
        "ViT-B-16",
        "--classes",
        "10",
        "--set",
        "n_ctx=4",
        "--set",
        "csc=true",
        "--json",
    )
    assert json.loads(r.stdout.strip().splitlines()[-1])["trainable_params"] == 10 * 2048


def test_info_user_errors_exit_2():
    for args, text in [
        (["--method", "nope", "--arch", "ViT-B-16"], "unknown method 'nope'"),
        (["--method", "coop", "--arch", "NoSuchArch"], "unknown backbone arch 'NoSuchArch'"),
        (["--method", "coop", "--arch", "promptsweep-tiny", "--set", "wings=2"], "unknown coop option"),
    ]:
        r = _run("info", *args, "--classes", "3", "--json")
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {text}"), r.stderr
