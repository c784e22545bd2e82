"""Test helpers that start and stop servers on loopback by PID: the multi-node Ray cluster of
``cluster/local.sh`` and an ``mlflow server`` with a SQLite backend. Nothing here sends traffic to a
non-loopback address, runs ``ray stop`` or kills a process it did not start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
VENV_BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (on ``host``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start_time(pid: int) -> Optional[str]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(") ", 1)[1].split()[19]


def process_tree(pids) -> dict[int, Optional[str]]:
    """The given PIDs and all their live descendants, each with its kernel start time."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [int(p) for p in pids]
    while todo:
        p = todo.pop()
        st = _start_time(p)
        if st is not None and p not in out:
            out[p] = st
            todo.extend(children.get(p, []))
    return out


def still_running(tree: dict[int, Optional[str]]) -> list[int]:
    """PIDs of ``tree`` that are still the same processes (start time unchanged)."""
    return [p for p, st in tree.items() if st is not None and _start_time(p) == st]


def signal_tree(tree: dict[int, Optional[str]], sig: int) -> None:
    """Send ``sig`` to every process of ``tree`` that is still the one recorded (by start time)."""
    for pid in still_running(tree):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(tree: dict[int, Optional[str]], timeout: float, poll: float = 0.1) -> list[int]:
    """Wait until no process of ``tree`` runs (at most ``timeout`` s); the PIDs still alive."""
    deadline = time.monotonic() + timeout
    while still_running(tree) and time.monotonic() < deadline:
        time.sleep(poll)
    return still_running(tree)


def env_with_venv(**extra: str) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


class LocalCluster:
    """``cluster/local.sh up`` on free ports with its own state dir; ``down()`` stops it and reports leftovers."""

    def __init__(self, state_dir: Path, workers: int = 2, cpus: int = 1, gpus: int = 0):
        self.state_dir = Path(state_dir)
        self.workers, self.cpus, self.gpus = workers, cpus, gpus
        self.gcs_port = free_port("127.0.0.2")
        self.dashboard_port = free_port("127.0.0.2")
        self.env = env_with_venv(
            PROMPTSWEEP_CLUSTER_DIR=str(self.state_dir),
            PROMPTSWEEP_RAY_PORT=str(self.gcs_port),
            PROMPTSWEEP_DASHBOARD_PORT=str(self.dashboard_port),
            PROMPTSWEEP_RAY_CLIENT_PORT=str(free_port()),
            PROMPTSWEEP_AGENT_PORT_BASE=str(self._agent_base()),
        )
        self.address: Optional[str] = None
        self.dashboard: Optional[str] = None
        self.output = ""

    def _agent_base(self) -> int:
        # workers+1 consecutive free ports for the nodes' dashboard agents
        for _ in range(50):
            base = free_port()
            if base + self.workers < 65000 and all(self._free(base + i) for i in range(self.workers + 1)):
                return base
        raise RuntimeError("no run of free ports for the dashboard agents")

    @staticmethod
    def _free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL_SH), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def up(self) -> "LocalCluster":
        p = self.run("up", "--workers", str(self.workers), "--cpus", str(self.cpus), "--gpus", str(self.gpus))
        self.output = p.stdout + p.stderr
        if p.returncode != 0:
            raise RuntimeError(f"cluster/local.sh up failed ({p.returncode}):\n{self.output}")
        kv = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
        self.address, self.dashboard = kv["RAY_ADDRESS"], kv["RAY_DASHBOARD"]
        return self

    def recorded_pids(self) -> list[int]:
        f = self.state_dir / "pids"
        return [int(line.split()[0]) for line in f.read_text().splitlines()] if f.exists() else []

    def tree(self) -> dict[int, Optional[str]]:
        return process_tree(self.recorded_pids())

    def down(self) -> subprocess.CompletedProcess:
        return self.run("down", timeout=120)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:<free port> with a SQLite store under ``root``; stopped by its PID."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.root / "mlflow-server.log"

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env_with_venv(), start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout}s")

    def stop(self, timeout: float = 20) -> list[int]:
        """SIGTERM the server and its workers, SIGKILL after ``timeout``; returns PIDs that survived (none)."""
        if self.proc is None:
            return []
        tree = process_tree([self.proc.pid])
        signal_tree(tree, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while still_running(tree) and time.monotonic() < deadline:
            self.proc.poll()
            time.sleep(0.2)
        signal_tree(tree, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.2)
        return still_running(tree)


def kill_server(server: MlflowServer) -> list[int]:
    """SIGKILL ``server`` and its workers at once (a crash, not a shutdown); returns PIDs still alive (none).

    ``server.start()`` afterwards brings it back on the same port with the same backend store."""
    if server.proc is None:
        return []
    tree = process_tree([server.proc.pid])
    signal_tree(tree, signal.SIGKILL)
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return wait_gone(tree, 10)


def kill_cluster_node(
    cluster: LocalCluster, role: str, timeout: float = 20
) -> tuple[dict[int, Optional[str]], list[int]]:
    """SIGKILL one node of ``cluster`` at once — its ``ray start --block`` process as ``local.sh`` recorded it under
    ``role`` (``worker1``, ``worker2``, ...) and every process below it (raylet, agents, Ray workers): a node crash.

    Returns the processes killed (PID -> start time) and those still alive after ``timeout`` (none)."""
    lines = [line.split() for line in (cluster.state_dir / "pids").read_text().splitlines()]
    pid, started = next((int(p), st) for p, st, r in lines if r == role)
    if _start_time(pid) != started:
        raise RuntimeError(f"{role} (pid {pid}) is not running any more")
    tree = process_tree([pid])
    signal_tree(tree, signal.SIGKILL)
    return tree, wait_gone(tree, timeout)
