"""Trial rows the results and report tests write: a trial config as the searcher makes it, and a small
sweep whose seeds a reviewer would ask about."""

from __future__ import annotations

from orchestrator import results as R


def cfg(cell="fewshot.coop.digits.2shot", stage="final", seed=1, params=None, protocol="fewshot", number=0):
    method, dataset = cell.split(".")[1:3]
    return {
        "cell_id": cell,
        "stage": stage,
        "seed": seed,
        "optuna_number": number,
        "params": params or {},
        "request": {
            "method": method,
            "dataset": dataset,
            "shots": 2,
            "seed": seed,
            "protocol": protocol,
            "stage": stage,
            "overrides": params or {},
            "backbone": {"arch": "promptsweep-mini", "pretrained": "promptsweep"},
        },
    }


def final(method, dataset, seed, result, status="FINISHED", protocol="fewshot", **kw):
    config = cfg(cell=f"{protocol}.{method}.{dataset}.2shot", seed=seed, protocol=protocol)
    return R.trial_row(
        config,
        result,
        status=status,
        tune_trial_id=f"{protocol}{method}{dataset}{seed}",
        mlflow_run_id=f"run-{method}-{dataset}-{seed}",
        **kw,
    )


def reviewer_rows():
    """dtd: coop has CoOp's seeds 1/2/3 (12.0 / 15.2 / 63.4) and a failed seed 4; kgcoop seeds 1 and 2 (3 is
    missing); maple seed 1 only. eurosat: coop and kgcoop, 3 seeds each. Base-to-novel: coop, 2 seeds."""
    rows = [final("coop", "dtd", s, {"test_acc": v}) for s, v in ((1, 12.0), (2, 15.2), (3, 63.4))]
    rows.append(final("coop", "dtd", 4, {"error_class": "nan_loss"}, status="ERROR"))
    rows += [final("kgcoop", "dtd", s, {"test_acc": v}) for s, v in ((1, 60.0), (2, 70.0))]
    rows.append(final("maple", "dtd", 1, {"test_acc": 65.0}))
    rows += [final("coop", "eurosat", s, {"test_acc": 70.0 + s}) for s in (1, 2, 3)]
    rows += [final("kgcoop", "eurosat", s, {"test_acc": 72.0 + s}) for s in (1, 2, 3)]
    rows += [
        final("coop", "digits", s, {"base_acc": b, "novel_acc": n, "hm": R.harmonic_mean(b, n)}, protocol="base2novel")
        for s, (b, n) in ((1, (80.0, 40.0)), (2, (60.0, 80.0)))
    ]
    return rows
