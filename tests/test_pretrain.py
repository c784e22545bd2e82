"""The project-pretrained backbone ``promptsweep-mini``: corpus disjoint from every val/test image,
deterministic and concurrency-safe checkpoint building, loading through the checkpoint-path code,
and zero-shot accuracies that show it has learned (and leave prompt learning room).

The zero-shot test uses the real pretraining settings (the session fixture ``mini_backbone`` builds
the checkpoint once per session); the determinism and concurrency tests use a few steps on a small
corpus — they test the mechanism, not what is learned.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fewshot.corpus import CorpusConfig, iter_raw, shape_pairs
from methods.pretrain import MINI_ARCH, PretrainConfig, checkpoint_path, content_key, load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = PretrainConfig(steps=3, batch_size=16, warmup_steps=1, corpus=CorpusConfig(shape_images=64, digit_views=1))


def _digest(img) -> str:
    return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


@pytest.mark.slow
def test_corpus_holds_no_val_or_test_image():
    from PIL import Image

    from fewshot.registry import load_dataset

    held_out = set()
    for name in ("shapes-64", "digits"):
        ds = load_dataset(name)
        held_out |= {_digest(Image.open(it.impath)) for it in [*ds.val, *ds.test]}
    cfg = load_config(MINI_ARCH).corpus
    seen = {_digest(img) for img, _cap, _kind, _aug in iter_raw(cfg)}
    assert len(seen) > 0.95 * (cfg.shape_images + 898 * cfg.digit_views)
    assert not (seen & held_out), f"{len(seen & held_out)} corpus images are val/test images"


def test_corpus_is_the_same_rendered_by_two_processes():
    """``workers`` only spreads the rendering: the corpus (images after the transforms, captions) is the same."""
    import torch

    from fewshot.corpus import build_corpus

    cfg = CorpusConfig(shape_images=1100, digit_views=1)  # three chunks of shapes, crops included
    one, two = build_corpus(cfg, 32, workers=1), build_corpus(cfg, 32, workers=2)
    assert one.captions == two.captions and one.kinds == two.kinds
    assert torch.equal(one.images, two.images)


def test_corpus_never_pairs_the_novel_classes():
    cfg = CorpusConfig(shape_images=400, digit_views=0)
    pairs = {f"{c} {s}" for c, s in shape_pairs(cfg)}
    assert not pairs & set(cfg.held_out_pairs) and len(cfg.held_out_pairs) == 16
    words = [set(cap.replace(".", " ").replace("-", " ").split()) for _img, cap, _kind, _aug in iter_raw(cfg)]
    for pair in cfg.held_out_pairs:
        colour, shape = pair.split()
        assert not [w for w in words if colour in w and shape in w], pair
    # ... while every colour and every shape word occurs
    from fewshot.offline import COLOURS, SHAPES

    assert all(any(w in ws for ws in words) for w in [*COLOURS, *SHAPES])


def test_content_key_changes_with_the_settings():
    base = content_key(MINI_ARCH, SMALL)
    assert content_key(MINI_ARCH, SMALL.model_copy(update={"steps": 4})) != base
    assert content_key(MINI_ARCH, SMALL.model_copy(update={"corpus": CorpusConfig(shape_images=65)})) != base
    assert checkpoint_path(MINI_ARCH, SMALL).name == f"{MINI_ARCH}-{base}.pt"


_BUILD = """
import sys
from methods.pretrain import PretrainConfig, pretrained_checkpoint
cfg = PretrainConfig.model_validate_json(sys.argv[1])
print(pretrained_checkpoint("promptsweep-mini", cfg))
"""


def _build_in(folder: Path, n: int = 1) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PROMPTSWEEP_MODEL_CACHE": str(folder)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD, SMALL.model_dump_json()],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        assert p.returncode == 0, stderr[-2000:]
    return out


def test_pretraining_is_deterministic_and_concurrent_creators_build_once(tmp_path):
    a = _build_in(tmp_path / "a", n=2)  # two concurrent creators of one entry
    assert sum("pretraining backbone" in r.stderr for r in a) == 1, [r.stderr[-300:] for r in a]
    path_a = Path(a[0].stdout.strip().splitlines()[-1])
    assert [Path(r.stdout.strip().splitlines()[-1]) for r in a] == [path_a, path_a]
    assert sorted(p.name for p in path_a.parent.iterdir() if not p.name.startswith(".")) == [path_a.name]
    (b,) = _build_in(tmp_path / "b")  # a rerun elsewhere: the same bytes
    path_b = Path(b.stdout.strip().splitlines()[-1])
    assert hashlib.sha256(path_a.read_bytes()).hexdigest() == hashlib.sha256(path_b.read_bytes()).hexdigest()


def test_tag_loads_through_the_checkpoint_path(tmp_path, monkeypatch):
    import torch

    from methods import backbone
    from methods.pretrain import pretrained_checkpoint

    monkeypatch.setenv("PROMPTSWEEP_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr("methods.pretrain.load_config", lambda arch=MINI_ARCH: SMALL)
    path = pretrained_checkpoint(MINI_ARCH, verbose=False)
    bb = backbone.load_backbone(MINI_ARCH, "promptsweep")
    assert bb.pretrained == str(path)  # the tag became the file: the same path a user's checkpoint takes
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in bb.model.state_dict().items())
    random_init = backbone.load_backbone(MINI_ARCH, None)
    assert not torch.equal(random_init.model.token_embedding.weight, bb.model.token_embedding.weight)


@pytest.mark.slow
def test_pretrained_backbone_has_learned_and_leaves_room(mini_backbone):
    from methods.zeroshot_eval import zero_shot_report

    report = zero_shot_report(mini_backbone)
    print("zero-shot:", report)
    for name, r in report.items():
        assert r["acc"] >= 3 * r["chance"], (name, r)
    assert report["shapes-64"]["acc"] >= 40.0, report["shapes-64"]
    # not at the ceiling; shapes-64:base holds the classes of the demo (shapes-32 few-shot, shapes-64 base-to-novel)
    for name in ("digits", "shapes", "shapes-32:base", "shapes-64:base"):
        assert report[name]["acc"] <= 95.0, (name, report[name])
    assert Path(mini_backbone.pretrained).stat().st_size <= 20 * 2**20
