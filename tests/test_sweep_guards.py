"""Guards of the sweep driver around its output directory: one sweep per output directory at a time (a
second command, a real process, is refused naming the holder), and a lock that a dead driver leaves does
not block the next run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from orchestrator.sweep import LOCK_FILE, _lock_output

ROOT = Path(__file__).resolve().parents[1]
SPEC = "name: locked\nmethods: [zeroshot]\ndatasets: [digits]\nshots: [1]\nseeds: [1]\n"


def _sweep(spec: Path, out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(spec), "--output", str(out),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_second_sweep_on_a_locked_output_is_refused_naming_the_holder(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out_dir = tmp_path / "out" / "locked"
    out_dir.mkdir(parents=True)
    held = _lock_output(out_dir)  # this test process plays the running sweep
    try:
        proc = _sweep(spec, tmp_path / "out", tmp_path)
    finally:
        held.close()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error: sweep output ") and "in use by a running sweep" in lines[-1], proc.stderr
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [LOCK_FILE]  # nothing of the second command


def test_a_lock_left_by_a_dead_driver_does_not_block(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = ("import sys, time; from pathlib import Path; from orchestrator.sweep import _lock_output; "
            "_lock_output(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()  # SIGKILL: no cleanup runs, the file stays, the kernel drops the lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (out_dir / LOCK_FILE).read_text().startswith(f"pid {holder.pid} ")
    _lock_output(out_dir).close()
