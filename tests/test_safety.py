"""Safety properties: checkpoints and weights load with ``weights_only=True`` (a pickled object in a
checkpoint is refused, not executed); no shell command is built from user strings; the servers the
project starts bind loopback by default."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from fewshot.errors import CheckpointError
from orchestrator import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for pkg in ("orchestrator", "methods", "fewshot") for p in (ROOT / pkg).rglob("*.py"))


class _Payload:
    """Unpickling this would run code (``__reduce__``)."""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_checkpoint_holding_a_pickled_object_is_refused_not_run(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"epoch": 1, "method": {}, "evil": _Payload()}, d / ckpt.STATE_FILE)
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load(d)
    assert not (tmp_path / "pwned").exists()


def test_every_torch_load_passes_weights_only_true():
    calls = 0
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "load"
                and getattr(node.func.value, "id", None) == "torch"
            ):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, (
                    f"{path.relative_to(ROOT)}:{node.lineno} calls torch.load without weights_only=True"
                )
    assert calls >= 1


def test_no_shell_commands_from_strings():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", text), path.relative_to(ROOT)
        for node in ast.walk(ast.parse(text)):  # subprocess gets argument lists, never a command string
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) in ("run", "Popen", "call", "check_output", "check_call")
                and getattr(node.func.value, "id", None) == "subprocess"
            ):
                assert isinstance(node.args[0], (ast.List, ast.Tuple)), f"{path.relative_to(ROOT)}:{node.lineno}"


def test_servers_bind_loopback_by_default():
    local = (ROOT / "cluster" / "local.sh").read_text()
    assert re.search(r"^HEAD_IP=127\.0\.0\.2$", local, re.M)
    assert 'DASH_HOST="${PROMPTSWEEP_DASHBOARD_HOST:-127.0.0.2}"' in local
    assert "0.0.0.0" not in local
    runner = (ROOT / "orchestrator" / "tune_runner.py").read_text()
    assert "_node_ip_address=LOCAL_NODE_IP" in runner
    assert "include_dashboard=dashboard is not None" in runner  # no dashboard unless --dashboard asks
    from orchestrator.sweep import _dashboard_address

    assert _dashboard_address("8265") == ("127.0.0.1", 8265)  # and then on loopback unless a host is named
    from orchestrator.tune_runner import LOCAL_NODE_IP

    assert LOCAL_NODE_IP == "127.0.0.1"  # the one node address for which Ray binds all its listeners to loopback
    # (tests/test_listeners.py checks the sockets themselves)
