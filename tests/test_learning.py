"""Behavioural tests: on the project-pretrained backbone a method must *learn* — tests that fail when a
method is broken (learning rate 0, the learned context not inserted, the loss sign flipped), which no
test on the random ``promptsweep-tiny`` can tell apart from a working method.

Each is a real trial (``orchestrator.trial.run_trial``, seed 1) on ``promptsweep-mini`` with pretrained
tag ``promptsweep`` (the session fixture ``mini_backbone`` builds it once per session). A method's
"untrained start" is the same trial with no optimisation step (``epochs: 0``): the method as built,
evaluated on the same test split. Schedules are shortened (``SCHEDULE``) to seconds per trial.

Margin (``MARGIN`` = 2 accuracy points on shapes-32's 384 test images): a broken method ends exactly
at its start (lr 0, context not inserted: its scores do not change) or below it (loss sign flipped),
so any margin above 0 separates it; the margin must also stay below the smallest gain of a working
method. Measured on seeds 1 and 2 (trained − untrained, points): CoOp +15.1 / +13.8, VPT +2.6 / +2.9,
TGP-T +9.9 / +7.3, SPT +31 (seed 1); CoOp 16 vs 1 shot +6.3. The untrained starts themselves move
by 3–4 points between seeds (random prompt init), which is why each test compares a method with
its own start on the same seed, never with a fixed number.

``KNOWN_NOT_LEARNING``: measured on this backbone under the trial's standard few-shot augmentation
(``RandomResizedCrop(scale=(0.08, 1))``, which often crops the one shape out of a shapes image),
these end at or below their start: KgCoOp, MaPLe and SEP, whose prompts start at the zero-shot
prompt or template features (KgCoOp +1.5 / −0.3, MaPLe +1.0 / +5.0 at lr 0.02, SEP −3.4 / −1.0
at 4 shots; ±0–2 at 16 shots), and CoCoOp (−6.3 / +8.3 with a random context). With the evaluation
transform as training transform they do rise (MaPLe +7.0, KgCoOp +3.6, SEP +1.0). These are strict
xfails: the day one of them learns, its test XPASSes and fails, and the marker must go. The linear
probe is fitted on centre crops (the evaluation transform, as CoOp's ``lpclip`` extracts features):
64.58 % at 16 shots against zero-shot's 58.07 % (on augmented crops it reached ~48 %).
"""
from __future__ import annotations

import pytest

from methods.registry import get_method, method_names
from orchestrator.trial import BackboneRef, TrialRequest, run_trial

pytestmark = pytest.mark.slow

BACKBONE = BackboneRef(arch="promptsweep-mini", pretrained="promptsweep")
DATASET = "shapes-32"
SHOTS = 4
MARGIN = 2.0
GRADIENT = [m for m in method_names() if get_method(m).trains_by_gradient]
#: shortened schedules (trial overrides) per gradient method
SCHEDULE: dict[str, dict] = {
    "coop": {"epochs": 10},
    "cocoop": {"epochs": 5, "batch_size": 4, "lr": 0.01, "ctx_init": None},
    "kgcoop": {"epochs": 10, "lr": 0.02},
    "maple": {"epochs": 10, "lr": 0.02},
    "vpt": {"epochs": 20, "lr": 0.05},
    "spt": {"epochs": 10},
    "sep": {"epochs": 10},
    # TGP-T's 32 category + 64 content tokens do not fit promptsweep-mini's 32-token text tower
    "tgpt": {"max_iters": 200, "eval_every_iters": 50, "n_cat": 16, "n_con": 24},
}
KNOWN_NOT_LEARNING = {
    m: "measured: stays at its start under the standard RandomResizedCrop(0.08, 1) few-shot augmentation on "
       "promptsweep-mini (see the module docstring)" for m in ("cocoop", "kgcoop", "maple", "sep")}
_XFAIL_AUG = pytest.mark.xfail(strict=True, reason="measured: under the standard RandomResizedCrop(0.08, 1) "
                               "training augmentation the trained prompt / probe does not beat zero-shot on "
                               "promptsweep-mini (see the module docstring)")


def trial(method: str, dataset: str = DATASET, shots: int = SHOTS, protocol: str = "fewshot", seed: int = 1,
          **overrides) -> dict:
    return run_trial(TrialRequest(method=method, dataset=dataset, shots=shots, seed=seed, protocol=protocol,
                                  device="cpu", backbone=BACKBONE, overrides=overrides))


def untrained(method: str) -> dict:
    return {**SCHEDULE[method], "epochs": 0, "max_iters": None}


def test_every_gradient_method_has_a_schedule():
    assert set(SCHEDULE) == set(GRADIENT)


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_NOT_LEARNING[m])) if m in KNOWN_NOT_LEARNING
    else m for m in GRADIENT])
def test_training_ends_above_the_untrained_start(method, mini_backbone):
    start = trial(method, **untrained(method))["test_acc"]
    end = trial(method, **SCHEDULE[method])["test_acc"]
    print(f"{method}: untrained {start:.2f} -> trained {end:.2f}")
    assert end >= start + MARGIN, f"{method} did not learn: {start:.2f} -> {end:.2f} (margin {MARGIN})"


@pytest.mark.xfail(strict=False, reason="measured: passed in CI of stop 20, failed in CI of stop 21 (16-shot 60.16 % vs 1-shot 60.42 %, margin 2.0) on a slower machine; same augmentation cause as above (issue 14)")
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


@_XFAIL_AUG
def test_coop_base_beats_zero_shot_base(mini_backbone):
    zs = trial("zeroshot", shots=16, protocol="base2novel")
    coop = trial("coop", shots=16, protocol="base2novel", **SCHEDULE["coop"])
    print(f"base2novel: zero-shot base {zs['base_acc']:.2f} novel {zs['novel_acc']:.2f}; "
          f"coop base {coop['base_acc']:.2f} novel {coop['novel_acc']:.2f}")
    assert coop["base_acc"] >= zs["base_acc"] + MARGIN
