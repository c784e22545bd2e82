"""Behavioural tests: on the project-pretrained backbone a method must *learn* — tests that fail when a
method is broken (learning rate 0, the learned context not inserted, the loss sign flipped), which no
test on the random ``promptsweep-tiny`` can tell apart from a working method.

Each is a real trial (``orchestrator.trial.run_trial``, seed 1) on ``promptsweep-mini`` with pretrained
tag ``promptsweep`` (the session fixture ``mini_backbone`` builds it once per session). A method's
"untrained start" is the same trial with no optimisation step (``epochs: 0``): the method as built,
evaluated on the same test split. Schedules are shortened (``SCHEDULE``) to seconds per trial.

Training augmentation: the offline sets crop no smaller than half the image (``crop_scale: [0.5, 1]``,
``methods/defaults/_datasets.yaml``). Under CoOp's ``(0.08, 1)`` the crop often cut the one shape out of a
48-px shapes image and KgCoOp, MaPLe and SEP ended at or below their start (KgCoOp +1.5 / −0.3, MaPLe
+1.0 / +5.0, SEP −3.4 / −1.0 at 4 shots, seeds 1 / 2).

Margin (``MARGIN`` = 2 accuracy points; 1 point ≈ 4 of shapes-32's 384 test images): a broken method ends
exactly at its start (lr 0, context not inserted: its scores do not change) or below it (loss sign
flipped), so any margin above 0 separates it; the margin must also stay below the smallest gain of a
working method. Measured here (2-core CPU, 2026-12-02; trained − untrained, points, seeds 1 / 2) with
the schedules below at 16 shots: KgCoOp +4.2 / +3.7, MaPLe +4.2 / +3.4 (SEP, then +2.9 / +4.7, is now
among ``KNOWN_NOT_LEARNING``, below); earlier at 4 shots: CoOp +15.1 / +13.8, VPT +2.6 / +2.9, TGP-T +9.9 /
+7.3, SPT +31. The untrained starts themselves move by 3–4 points between seeds (random prompt init), which is why
each test compares a method with its own start on the same seed, never with a fixed number.

``KNOWN_NOT_LEARNING`` also holds SEP since its Token Fusion Modules start as copies of one module, as the
reference builds them (they were drawn independently before, when SEP gained +2.9 / +4.7): measured on a 2-core
AMD EPYC build of the backbone (2026-12-06), 16 shots, start -> trained, seed 1 / 2: 20 epochs lr 0.02
61.7 -> 61.5 / 59.1 -> 61.5; seed 1: 30 epochs 62.8, 40 epochs 62.2, lr 0.01 62.2, lr 0.05 61.2, batch 8 61.2.
``tests/test_sep.py`` covers its forward pass, losses and gradients against the reference on shared weights.

``KNOWN_NOT_LEARNING``: CoCoOp at these CPU schedules stays within ±2 points of its start (16 shots,
3 epochs at batch 4, lr 0.01: −0.3 / +1.8 from "a photo of a", −1.3 / +0.5 from a random context), so
it is left out of the learning test (a test that could only be an expected failure asserts nothing, and
cost ~33 s of CI); ``tests/test_cocoop.py`` covers its meta-net and prompt path on the tiny backbone.

Base-to-novel runs on ``shapes-64`` (base = its first 32 classes): on ``shapes-32``'s 16 base classes
zero-shot (85.9 %) is already above the 16-shot linear probe (83.9 %) — the image features, not the prompt,
are the limit there — while on shapes-64's base half zero-shot is 58.1 % and CoOp (10 epochs) 64.8 %.
The linear probe is fitted on centre crops (the evaluation transform, as CoOp's ``lpclip`` extracts
features): 64.58 % at 16 shots against zero-shot's 58.07 % (on augmented crops it reached ~48 %).
"""

from __future__ import annotations

import pytest

from methods.registry import get_method, method_names
from orchestrator.trial import BackboneRef, TrialRequest, run_trial

pytestmark = pytest.mark.slow

BACKBONE = BackboneRef(arch="promptsweep-mini", pretrained="promptsweep")
DATASET = "shapes-32"
B2N_DATASET = "shapes-64"
SHOTS = 16
MARGIN = 2.0
GRADIENT = [m for m in method_names() if get_method(m).trains_by_gradient]
#: shortened schedules (trial overrides) per gradient method
SCHEDULE: dict[str, dict] = {
    "coop": {"epochs": 10},
    "cocoop": {"epochs": 3, "batch_size": 4, "lr": 0.01},
    "kgcoop": {"epochs": 10, "lr": 0.02},
    "maple": {"epochs": 10, "lr": 0.02},
    "vpt": {"epochs": 20, "lr": 0.05},
    "spt": {"epochs": 10},
    "sep": {"epochs": 20, "lr": 0.02},
    # TGP-T's 32 category + 64 content tokens do not fit promptsweep-mini's 32-token text tower
    "tgpt": {"max_iters": 200, "eval_every_iters": 50, "n_cat": 16, "n_con": 24},
}
KNOWN_NOT_LEARNING = {
    "cocoop": "measured: CoCoOp stays within ±2 points of its start at these CPU schedules (see the module docstring)",
    "sep": "measured: since its fused-layer modules start as copies of one module (the reference's "
    "init), SEP ends within ±2 points of its start (see the module docstring)",
}


def trial(
    method: str, dataset: str = DATASET, shots: int = SHOTS, protocol: str = "fewshot", seed: int = 1, **overrides
) -> dict:
    return run_trial(
        TrialRequest(
            method=method,
            dataset=dataset,
            shots=shots,
            seed=seed,
            protocol=protocol,
            device="cpu",
            backbone=BACKBONE,
            overrides=overrides,
        )
    )


def untrained(method: str) -> dict:
    return {**SCHEDULE[method], "epochs": 0, "max_iters": None}


def test_every_gradient_method_has_a_schedule():
    assert set(SCHEDULE) == set(GRADIENT)


@pytest.mark.parametrize("method", [m for m in GRADIENT if m not in KNOWN_NOT_LEARNING])
def test_training_ends_above_the_untrained_start(method, mini_backbone):
    margin = MARGIN
    start = trial(method, **untrained(method))["test_acc"]
    end = trial(method, **SCHEDULE[method])["test_acc"]
    print(f"{method}: untrained {start:.2f} -> trained {end:.2f}")
    assert end >= start + margin, f"{method} did not learn: {start:.2f} -> {end:.2f} (margin {margin})"


def test_coop_16_shots_beat_1_shot(mini_backbone):
    one = trial("coop", shots=1, **SCHEDULE["coop"])["test_acc"]
    sixteen = trial("coop", shots=16, **SCHEDULE["coop"])["test_acc"]
    print(f"coop: 1 shot {one:.2f}, 16 shots {sixteen:.2f}")
    assert sixteen >= one + MARGIN


def test_linear_probe_16_shots_beats_zero_shot(mini_backbone):
    zs = trial("zeroshot", shots=16)["test_acc"]
    lp = trial("linear_probe", shots=16)["test_acc"]
    print(f"zero-shot {zs:.2f}, linear probe 16 shots {lp:.2f}")
    assert lp >= zs + MARGIN


def test_coop_base_beats_zero_shot_base(mini_backbone):
    zs = trial("zeroshot", dataset=B2N_DATASET, shots=16, protocol="base2novel")
    coop = trial("coop", dataset=B2N_DATASET, shots=16, protocol="base2novel", **SCHEDULE["coop"])
    print(
        f"base2novel {B2N_DATASET}: zero-shot base {zs['base_acc']:.2f} novel {zs['novel_acc']:.2f}; "
        f"coop base {coop['base_acc']:.2f} novel {coop['novel_acc']:.2f}"
    )
    assert coop["base_acc"] >= zs["base_acc"] + MARGIN
