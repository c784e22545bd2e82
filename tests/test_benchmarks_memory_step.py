"""benchmarks/memory.py and benchmarks/step_time.py run end to end with their smallest settings.

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
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_memory_benchmark_last_line_is_json():
    out = _run("memory.py", "--classes", "2,4", "--batch-size", "2")
    assert out["benchmark"] == "memory"
    for key in ("device", "arch", "torch", "batch_size", "classes", "measure", "peak_mib",
                "ratio_to_smallest_c", "ratio_largest_to_smallest_c"):
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
    for key in ("device", "arch", "torch", "batch_size", "classes", "floor", "floor_ms", "median_ms",
                "ratio_to_floor"):
        assert key in out, key
    gradient = {m for m in method_names() if get_method(m).trains_by_gradient}
    assert set(out["median_ms"]) == gradient
    assert set(out["ratio_to_floor"]) == gradient
