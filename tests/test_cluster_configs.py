"""cluster/: the launcher YAMLs pass Ray's own config validation, the KubeRay manifests carry the fields
KubeRay needs, cluster/local.sh rejects bad usage, and orchestrator.cluster_checks refuses node-local
sweep output on a multi-node cluster. No cloud calls, no Ray started."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from fewshot.errors import ConfigError
from orchestrator.cluster_checks import SHARED_STORAGE_ENV, check_shared_storage, is_shared, is_uri

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _prepared(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(cfg))
    validate_config(out)
    return out


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_passes_ray_validation_and_has_the_layout(name):
    cfg = _prepared(_launcher(name))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no trial on the head
    workers = [t for k, t in types.items() if k != cfg["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 2  # autoscaling
    nc = gpu["node_config"]
    assert "g5" in str(nc.get("InstanceType", "")) or nc.get("guestAccelerators")  # a GPU instance
    setup = "\n".join(cfg["setup_commands"])
    assert "torch==" in setup and "-e ~/promptsweep" in setup  # project on every node, torch pinned
    assert "/mnt/cluster_storage" in setup and f"{SHARED_STORAGE_ENV}=/mnt/cluster_storage" in setup
    assert list(cfg["file_mounts"].values()) == ["."]
    head_start = "\n".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start
    assert "mlflow server --host 127.0.0.1" in head_start and "sqlite:////mnt/cluster_storage/" in head_start
    assert f"{SHARED_STORAGE_ENV}=/mnt/cluster_storage" in "\n".join(cfg["worker_start_ray_commands"])


def test_ray_validation_rejects_a_broken_launcher_config():
    import jsonschema

    cfg = _launcher("aws.yaml")
    cfg["available_node_types"]["head"]["resoruces"] = {"CPU": 0}  # typo'd key: schema forbids extras
    with pytest.raises(jsonschema.ValidationError):
        _prepared(cfg)
    cfg = _launcher("gcp.yaml")
    cfg["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _prepared(cfg)


def _docs(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def _check_cluster_spec(spec: dict, pvc: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    claim = pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    def mounts_shared(pod: dict, container: dict) -> bool:
        vols = {v["name"]: v for v in pod["volumes"]}
        return any(
            m["mountPath"] == "/mnt/cluster_storage" and vols[m["name"]]["persistentVolumeClaim"]["claimName"] == claim
            for m in container.get("volumeMounts", [])
        )

    hpod = head["template"]["spec"]
    assert hpod["containers"][0]["image"] and mounts_shared(hpod, hpod["containers"][0])
    mlflow = [c for c in hpod["containers"] if c["name"] == "mlflow"]
    assert mlflow and "--host 127.0.0.1" in " ".join(mlflow[0]["args"])
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert {"groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"} <= set(g)
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 2
        pod = g["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"] and mounts_shared(pod, c)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_kuberay_rayjob_manifest():
    docs = _docs("kuberay-rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m orchestrator.sweep ")
    assert "--output /mnt/cluster_storage/" in spec["entrypoint"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env[SHARED_STORAGE_ENV] == "/mnt/cluster_storage"
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"], docs["PersistentVolumeClaim"])


def test_kuberay_raycluster_manifest():
    docs = _docs("kuberay-raycluster.yaml")
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(rc["spec"], docs["PersistentVolumeClaim"])
    env = {e["name"]: e["value"] for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[SHARED_STORAGE_ENV] == "/mnt/cluster_storage"


def test_readme_covers_each_path():
    text = (CLUSTER / "README.md").read_text()
    for needle in [
        "ray up cluster/aws.yaml",
        "ray up cluster/gcp.yaml",
        "kubectl apply -f cluster/kuberay-rayjob.yaml",
        "kubectl apply -f cluster/kuberay-raycluster.yaml",
        "cluster/local.sh up",
        "ray job submit",
        "ssh -L",
        "kubectl port-forward",
        "ray down",
        "cluster/local.sh down",
        "--output",
        SHARED_STORAGE_ENV,
    ]:
        assert needle in text, needle


# --- cluster/local.sh usage (nothing started) --------------------------------------------------------


def _local_sh(tmp_path, *args):
    env = {"PATH": "/usr/bin:/bin", "PROMPTSWEEP_CLUSTER_DIR": str(tmp_path / "state")}
    return subprocess.run(
        ["bash", str(CLUSTER / "local.sh"), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_local_sh_usage_errors_and_status_when_down(tmp_path):
    p = _local_sh(tmp_path, "sideways")
    assert p.returncode == 2 and "usage: cluster/local.sh up|down|status" in p.stderr
    p = _local_sh(tmp_path, "up", "--workers", "0")
    assert p.returncode == 2 and "--workers must be 1..250" in p.stderr
    p = _local_sh(tmp_path, "up", "--bogus")
    assert p.returncode == 2 and "unknown option '--bogus'" in p.stderr
    p = _local_sh(tmp_path, "status")
    assert p.returncode == 3 and p.stdout.startswith("down")
    p = _local_sh(tmp_path, "down")
    assert p.returncode == 0
    assert "ray stop" not in [
        line.strip() for line in (CLUSTER / "local.sh").read_text().splitlines() if not line.lstrip().startswith("#")
    ]


def test_local_sh_down_ignores_a_recorded_pid_that_was_reused(tmp_path):
    # a pids file whose start time does not match the live process with that PID: down must not touch it
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "pids").write_text(f"{sleeper.pid} 1 head\n")
        p = _local_sh(tmp_path, "down")
        assert p.returncode == 0
        assert sleeper.poll() is None  # still running: not ours
        assert not (state / "pids").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --- orchestrator.cluster_checks ------------------------------------------------------------------------


def _nodes(*ips, dead=()):
    return [{"NodeManagerAddress": ip, "Alive": True} for ip in ips] + [
        {"NodeManagerAddress": ip, "Alive": False} for ip in dead
    ]


def test_single_node_accepts_a_local_output(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    check_shared_storage(tmp_path / "results", _nodes("127.0.0.2"))
    check_shared_storage(tmp_path / "results", _nodes("127.0.0.2", dead=["127.0.0.3"]))  # dead nodes don't count


def test_multi_node_refuses_a_local_output_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        check_shared_storage(tmp_path / "results", _nodes("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    msg = str(e.value)
    assert str(tmp_path / "results") in msg and "3 nodes" in msg and "127.0.0.3" in msg
    assert "--output" in msg and "s3://" in msg and SHARED_STORAGE_ENV in msg
    with pytest.raises(ConfigError):  # node addresses as plain strings work too
        check_shared_storage(f"file://{tmp_path}/results", ["10.0.0.1", "10.0.0.2"])


def test_multi_node_accepts_uris_and_declared_mounts(tmp_path, monkeypatch):
    nodes = _nodes("127.0.0.2", "127.0.0.3")
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    for uri in ["s3://bucket/sweeps", "gs://bucket/sweeps", "abfs://c@acct/sweeps"]:
        check_shared_storage(uri, nodes)
    shared = tmp_path / "shared"
    other = tmp_path / "elsewhere"
    monkeypatch.setenv(SHARED_STORAGE_ENV, f"{other}:{shared}")
    check_shared_storage(shared / "results" / "x", nodes)
    check_shared_storage(shared, nodes)
    with pytest.raises(ConfigError):  # a sibling with the same prefix is not under the mount
        check_shared_storage(tmp_path / "shared2" / "results", nodes)
    monkeypatch.delenv(SHARED_STORAGE_ENV)
    check_shared_storage(shared / "r", nodes, extra_roots=[shared])  # roots from the spec


def test_uri_detection():
    assert is_uri("s3://b/k") and is_uri("gs://b") and not is_uri("file:///tmp/x") and not is_uri("/tmp/a://b")
    assert not is_shared("relative/results")
