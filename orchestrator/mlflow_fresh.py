"""What ``--fresh`` does to the MLflow runs of the sweep run it discards.

``--fresh`` deletes a sweep's result files and starts it over. Its earlier MLflow runs — the sweep run, its
cell runs and their trial runs — would otherwise stay in the experiment beside the new ones, so the UI would
show two sweeps of one name with no sign of which one the files belong to. ``retire_runs`` moves them to
MLflow's deleted runs (``MlflowClient.delete_run``: a soft delete). MLflow keeps a deleted run until
``mlflow gc`` purges it, and ``mlflow runs restore --run-id <id>`` brings one back.

The runs are found from the sweep run recorded in the discarded ``sweep.json``: one paged search of the
experiment for runs tagged with the sweep's name, then the ``mlflow.parentRunId`` links from that run down.
Runs of other sweeps, and runs another ``--fresh`` already deleted, are left alone. Best effort: a store
that cannot be read or written leaves the old runs as they are, with one warning line, and the new sweep
goes on.
"""

from __future__ import annotations

from typing import Optional

from orchestrator.mlflow_sender import PARENT_TAG, warn
from orchestrator.mlflow_uri import driver_http_env, error_reason, make_client, mask_uri


def nested_runs(client, root_id: str) -> list[str]:
    """``root_id`` and every active run nested under it, parents before their children."""
    from mlflow.entities import ViewType

    root = client.get_run(root_id)
    if root.info.lifecycle_stage != "active":
        return []
    name = root.data.tags.get("sweep")
    children: dict[str, list[str]] = {}
    if name is not None:  # a sweep name matches spec.NAME_PATTERN: no quote to escape in the filter
        token = None
        while True:
            page = client.search_runs(
                [root.info.experiment_id],
                filter_string=f"tags.sweep = '{name}'",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                page_token=token,
            )
            for run in page:
                parent = run.data.tags.get(PARENT_TAG)
                if parent:
                    children.setdefault(parent, []).append(run.info.run_id)
            token = page.token
            if not token:
                break
    order, todo = [], [root_id]
    while todo:
        run_id = todo.pop()
        order.append(run_id)
        todo.extend(children.get(run_id, []))
    return order


def retire_runs(tracking_uri: str, root_id: Optional[str]) -> int:
    """Soft-delete the discarded sweep run ``root_id`` and its nested runs (module docstring); the count deleted."""
    if not root_id:
        return 0
    driver_http_env(tracking_uri)  # a server that is down costs seconds here, not MLflow's minutes of retries
    client = make_client(tracking_uri)
    try:
        runs = nested_runs(client, root_id)
        for run_id in runs:
            client.delete_run(run_id)
    except Exception as e:  # noqa: BLE001 - the old runs are a courtesy; the new sweep must not depend on them
        warn(
            f"warning: --fresh could not move the earlier sweep run {root_id} and its runs to MLflow's deleted runs "
            f"at {mask_uri(tracking_uri)} ({error_reason(e)}); they stay as they are"
        )
        return 0
    if runs:
        print(
            f"--fresh: the earlier sweep run {root_id} and its {len(runs) - 1} cell and trial runs are now MLflow "
            f"deleted runs (mlflow runs restore --run-id {root_id} brings one back)"
        )
    return len(runs)
