"""``<out_dir>/tracking_backlog.json``: the MLflow operations a sweep could not send before it ended.

What is still queued when the tracker finishes (the server was down) or was refused for good is written
there, atomically, with the tracker's whole state (one warning line names the file). The next run of
the same command loads it (``MlflowTracking(out_dir=...)`` calls ``load_backlog``; for a finished sweep
``replay_backlog`` does) and sends it; ``fill_run_ids`` then fills the ``mlflow_run_id`` cells of
trials.arrow that were empty while the server was away. A backlog for another tracking URI, or one
that cannot be read, is left as it is (one warning).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from fewshot.paths import write_text_atomic
from orchestrator.mlflow_sender import warn
from orchestrator.mlflow_uri import mask_uri, split_credentials

if TYPE_CHECKING:
    from orchestrator.tracking import MlflowTracking

BACKLOG_FILE = "tracking_backlog.json"


def fill_run_ids(out_dir: Path, trial_runs: dict[str, Optional[str]]) -> int:
    """Fill empty ``mlflow_run_id`` cells of trials.arrow from ``trial_runs``; the number filled."""
    import pyarrow as pa

    from orchestrator.results import TRIALS_FILE, read_table, write_tables

    p = Path(out_dir) / TRIALS_FILE
    if not p.exists():
        return 0
    t = read_table(p)
    old = t.column("mlflow_run_id").to_pylist()
    new = [rid or trial_runs.get(tid) for rid, tid in zip(old, t.column("tune_trial_id").to_pylist())]
    n = sum(1 for a, b in zip(old, new) if a != b)
    if n:
        i = t.schema.get_field_index("mlflow_run_id")
        write_tables(out_dir, {TRIALS_FILE: t.set_column(i, t.schema.field(i), pa.array(new, pa.string()))})
    return n


def missing(tracker: "MlflowTracking") -> list[dict]:
    """Per run with queued operations: its key, run id (None if never created) and operations, in order."""
    out: dict[str, dict] = {}
    for op in tracker.sender.pending:
        rec = out.setdefault(op.key, {"run": op.key, "run_id": tracker.run_id(op.key), "ops": []})
        rec["ops"].append(op.describe())
    return list(out.values())


def save_backlog(tracker: "MlflowTracking") -> Optional[Path]:
    """Write the tracker's backlog when operations are left (else remove an old one) and fill the run ids of
    trials.arrow; the file's path, None when nothing is left. Without ``tracker.out_dir`` one warning counts
    what is lost."""
    pending, rejected = tracker.sender.pending, tracker.sender.rejected
    where = mask_uri(tracker.tracking_uri)
    if tracker.out_dir is None:
        if pending:
            warn(f"warning: {len(pending)} MLflow operation(s) not logged to {where}")
        return None
    fill_run_ids(tracker.out_dir, tracker.state["trials"])
    p = tracker.out_dir / BACKLOG_FILE
    if not pending and not rejected:
        p.unlink(missing_ok=True)
        return None
    runs = missing(tracker)
    state = tracker.get_state()
    data = {
        "tracking_uri": tracker.tracking_uri,
        "experiment": tracker.experiment,
        "sweep": tracker.sweep_name,
        "spec_hash": tracker.spec_hash,
        "written": datetime.now(timezone.utc).isoformat(),
        "trials": sorted(m["run"].partition(":")[2] for m in runs if m["run"].startswith("trial:")),
        "missing": runs,
        "rejected": state["rejected"],
        "state": state,
    }
    write_text_atomic(p, json.dumps(data, indent=1))
    if pending:
        warn(
            f"warning: MLflow tracking server {where} did not take {len(pending)} operation(s) for {len(runs)} "
            f"run(s), listed in {p}; rerun the same command when it is back to log them"
        )
    else:
        warn(f"warning: MLflow refused {len(rejected)} operation(s), listed in {p}")
    return p


def load_backlog(path: Path, tracking_uri: str) -> Optional[dict]:
    """The tracker state saved in the backlog ``path`` when it holds operations for ``tracking_uri``; else None
    (one warning: the file is left as it is)."""
    try:
        data = json.loads(Path(path).read_text())
        if split_credentials(str(data.get("tracking_uri")))[0] == tracking_uri:
            return data["state"]
        why = f"holds operations for {mask_uri(str(data.get('tracking_uri')))}, not {mask_uri(tracking_uri)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"cannot be read ({e})"
    warn(f"warning: {path} {why}; left as it is")
    return None


def replay_backlog(out_dir: Path) -> Optional[int]:
    """Send ``<out_dir>/tracking_backlog.json`` (a finished sweep rerun); the operations left, None if no file."""
    from orchestrator.tracking import MlflowTracking

    p = Path(out_dir) / BACKLOG_FILE
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
        args = [data[k] for k in ("tracking_uri", "experiment", "sweep", "spec_hash")]
        parent = data["state"].get("parent")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warn(f"warning: {p} cannot be read ({e}); left as it is")
        return None
    tracker = MlflowTracking(*args, parent_run_id=parent, out_dir=out_dir)
    n = len(tracker.sender.pending)
    tracker.sender.flush(force=True)
    tracker.write_backlog()
    left = len(tracker.sender.pending)
    if n and not left:
        print(f"tracking: logged the {n} queued MLflow operation(s) from {p.name} to {mask_uri(tracker.tracking_uri)}")
    return left
