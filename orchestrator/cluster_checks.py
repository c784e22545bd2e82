"""Checks the sweep driver runs once it is connected to Ray, before any trial starts: on a cluster of
more than one node, the sweep output (Tune's ``storage_path``) must be storage every node can reach.

Since Ray 2.7 Tune no longer syncs trial directories to the head node, so a node-local output path
on a multi-node cluster fails only when a remote trial first reports a checkpoint. Shared means a
URI (``s3://``, ``gs://``, ...) or a path under a mount the user declared shared: the roots listed
in ``$PROMPTSWEEP_SHARED_STORAGE`` (``os.pathsep``-separated, e.g. ``/mnt/cluster_storage``) or
passed in ``shared_roots`` (e.g. from the spec).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from fewshot.errors import ConfigError

SHARED_STORAGE_ENV = "PROMPTSWEEP_SHARED_STORAGE"


def is_uri(path: Union[str, Path]) -> bool:
    """``s3://bucket/x``, ``gs://...``: remote storage every node reaches (``file://`` is a local path)."""
    s = str(path)
    scheme, sep, _ = s.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def shared_roots(extra: Iterable[Union[str, Path]] = ()) -> list[Path]:
    """The declared shared mounts: ``$PROMPTSWEEP_SHARED_STORAGE`` plus ``extra``, absolute and resolved."""
    env = [p for p in os.environ.get(SHARED_STORAGE_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(p.strip()).expanduser().resolve() for p in [*env, *map(str, extra)]]


def _local_path(path: Union[str, Path]) -> Path:
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://") :]
    return Path(s).expanduser().resolve()


def is_shared(path: Union[str, Path], extra_roots: Iterable[Union[str, Path]] = ()) -> bool:
    """True for a URI or a path at or under a declared shared root."""
    if is_uri(path):
        return True
    p = _local_path(path)
    return any(p == r or r in p.parents for r in shared_roots(extra_roots))


def _node_name(node) -> str:
    if isinstance(node, dict):
        return str(node.get("NodeManagerAddress") or node.get("node_ip") or node.get("NodeID", "?"))
    return str(node)


def _is_alive(node) -> bool:
    return bool(node.get("Alive", node.get("alive", True))) if isinstance(node, dict) else True


def check_shared_storage(
    output: Union[str, Path], nodes: Iterable, extra_roots: Iterable[Union[str, Path]] = ()
) -> None:
    """Refuse a node-local ``output`` when more than one node is alive.

    ``nodes`` is ``ray.nodes()`` (dicts; dead ones are ignored) or a list of node addresses.
    Raises ``ConfigError`` naming the path, the nodes and the two ways to fix it.
    """
    alive = [n for n in nodes if _is_alive(n)]
    if len(alive) <= 1 or is_shared(output, extra_roots):
        return
    names = sorted({_node_name(n) for n in alive})
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    raise ConfigError(
        f"sweep output {output} is not shared storage, but the Ray cluster has {len(alive)} nodes ({shown}): "
        "trials on other nodes could not write their results and checkpoints there; "
        "pass --output with an s3:// or gs:// URI or a path on a mount every node shares (EFS, Filestore, NFS, "
        f"/mnt/cluster_storage) and declare that mount with {SHARED_STORAGE_ENV}=<mount> (see cluster/README.md)"
    )


def alive_nodes() -> list[dict]:
    """The alive nodes of the connected Ray cluster (``ray.nodes()`` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_cluster_storage(output: Union[str, Path], extra_roots: Optional[Iterable[Union[str, Path]]] = None) -> None:
    """``check_shared_storage`` against the connected Ray cluster (call after ``ray.init``)."""
    check_shared_storage(output, alive_nodes(), extra_roots or ())


#: how long the driver waits for a TCP answer from a Ray address before calling it unreachable
ADDRESS_TIMEOUT_S = 5.0


def check_ray_address(address: str, flag: str = "--address") -> None:
    """Before ``ray.init`` connects: ``address`` must be ``auto``, ``host:port`` or ``ray://host:port`` with a
    port in 1..65535, and a host:port must accept a TCP connection within ``ADDRESS_TIMEOUT_S`` (Ray itself
    waits minutes for a GCS that is not there); ``auto`` must find a cluster running on this machine.
    ConfigError naming ``flag`` otherwise."""
    import socket

    addr = address.strip()
    if addr == "auto":
        addr = _running_local_cluster(flag)
    hostport = addr[len("ray://") :] if addr.startswith("ray://") else addr
    host, sep, port_text = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(
            f"{flag}: '{address}' is not a Ray address; use HOST:PORT of the head's GCS (e.g. "
            "10.0.0.5:6379), ray://HOST:10001 for Ray Client, or auto for the cluster this machine "
            "runs"
        )
    try:
        with socket.create_connection((host, int(port_text)), timeout=ADDRESS_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{flag}: no Ray cluster answers at {hostport} within {ADDRESS_TIMEOUT_S:g} s "
            f"({exc.strerror or type(exc).__name__}); start it (ray start --head) or fix the address"
        ) from None


def _running_local_cluster(flag: str) -> str:
    """The GCS address ``auto`` stands for: the cluster ``ray start`` last started on this machine, else any
    running GCS found among the local processes (as ``ray.init(address="auto")`` looks for it; $RAY_ADDRESS
    is not consulted here, the caller passes it as the address itself)."""
    from orchestrator.ray_internals import local_cluster_address

    found = local_cluster_address()
    if not found:
        raise ConfigError(
            f"{flag}: auto finds no Ray cluster running on this machine; start one (ray start "
            "--head) or pass its address as HOST:PORT (or leave the flag out for a local Ray)"
        )
    return found
