"""Behavioural tests: on the project-pretrained backbone, every method *learns* — tests that fail when a
method is broken (learning rate 0, the learned context not inserted, the loss sign flipped), which
no test on the random ``promptsweep-tiny`` can tell apart from a working method.

Each is a real trial (``orchestrator.trial.run_trial``, seeds fixed) on ``promptsweep-mini`` with
pretrained tag ``promptsweep`` (the session fixture ``mini_backbone`` builds it once per session).
The "untrained start" of a method is the same trial with no optimisation step (``epochs: 0``): the
method as built, evaluated on the same test split. Schedules are shortened (``SCHEDULE``) so the
whole module takes a few minutes on 2 CPU cores; margins are justified in ``MARGIN``'s comment.
"""
from __future__ import annotations

import pytest

from methods.registry import get_method, method_names
from orchestrator.trial import BackboneRef, TrialRequest, run_trial

pytestmark = pytest.mark.slow

BACKBONE = BackboneRef(arch="promptsweep-mini", pretrained="promptsweep")
DATASET = "shapes-32"
SHOTS = 4
GRADIENT = [m for m in method_names() if get_method(m).trains_by_gradient]
#: shortened schedules (trial overrides) per method
SCHEDULE: dict[str, dict] = {
    "coop": {"epochs": 10},
    "cocoop": {"epochs": 5, "batch_size": 4},
    "kgcoop": {"epochs": 10},
    "maple": {"epochs": 10},
    "vpt": {"epochs": 10},
    "spt": {"epochs": 10},
    "sep": {"epochs": 10},
    "tgpt": {"max_iters": 200, "eval_every_iters": 50},
}
#: accuracy points a trained method must gain over its untrained start (MARGIN_NOTE)
MARGIN = 3.0


def trial(method: str, dataset: str = DATASET, shots: int = SHOTS, protocol: str = "fewshot", seed: int = 1,
          **overrides) -> dict:
    return run_trial(TrialRequest(method=method, dataset=dataset, shots=shots, seed=seed, protocol=protocol,
                                  device="cpu", backbone=BACKBONE, overrides=overrides))


def untrained(method: str) -> dict:
    return {**SCHEDULE.get(method, {}), "epochs": 0, "max_iters": None}


@pytest.mark.parametrize("method", GRADIENT)
def test_training_ends_above_the_untrained_start(method, mini_backbone):
    start = trial(method, **untrained(method))["test_acc"]
    end = trial(method, **SCHEDULE[method])["test_acc"]
    print(f"{method}: untrained {start:.2f} -> trained {end:.2f}")
    assert end >= start + MARGIN, f"{method} did not learn: {start:.2f} -> {end:.2f} (margin {MARGIN})"


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
    zs = trial("zeroshot", shots=16, protocol="base2novel")
    coop = trial("coop", shots=16, protocol="base2novel", **SCHEDULE["coop"])
    print(f"base2novel: zero-shot base {zs['base_acc']:.2f} novel {zs['novel_acc']:.2f}; "
          f"coop base {coop['base_acc']:.2f} novel {coop['novel_acc']:.2f}")
    assert coop["base_acc"] >= zs["base_acc"] + MARGIN
