"""Private Ray / Tune names live in ``orchestrator/ray_internals.py`` only, and are checked at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: a private module or attribute of Ray (ray._private, ray.*._internal, obj._name on Tune objects we reach into)
PRIVATE = re.compile(
    r"ray\._private|ray\.[\w.]*\._internal|_local_tuner|_tune_config|_checkpoint_manager|"
    r"_should_force_sync_up|_TrainingResult|current_checkpoint_index|get_live_trials"
)


def test_no_private_ray_name_outside_the_one_module():
    offenders = []
    for path in [
        *ROOT.glob("orchestrator/*.py"),
        *ROOT.glob("methods/*.py"),
        *ROOT.glob("fewshot/*.py"),
        *ROOT.glob("benchmarks/*.py"),
    ]:
        if path.name == "ray_internals.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_installed_ray_has_what_the_module_uses():
    from orchestrator import ray_internals

    assert ray_internals._problems() == []
    ray_internals.check()


def test_a_missing_internal_is_one_line_naming_both_versions(monkeypatch):
    import ray

    from fewshot.errors import ConfigError
    from orchestrator import ray_internals

    monkeypatch.setattr(ray_internals, "_checked", False)
    monkeypatch.setattr(ray_internals, "_problems", lambda: ["TuneController._checkpoint_manager"])
    with pytest.raises(ConfigError) as err:
        ray_internals.check()
    msg = str(err.value)
    assert "\n" not in msg and f"ray {ray.__version__} is installed" in msg and ray_internals.TESTED_RAY in msg
    assert "TuneController._checkpoint_manager" in msg


def test_pyproject_declares_the_tested_ray():
    from orchestrator.ray_internals import TESTED_RAY

    text = (ROOT / "pyproject.toml").read_text()
    major, minor = TESTED_RAY.split(".")
    assert f'"ray[tune,default]>={TESTED_RAY},<{major}.{int(minor) + 1}"' in text
