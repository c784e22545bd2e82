"""Report sections on how far the numbers can be trusted: per-cell statistics (n, mean, std, 95 % interval,
per-seed values) and the Average's interval, the paired comparison with the baseline (and the ↑ / ↓ marks
of the result tables), and the unstable seeds and cells with their MLflow runs.

Rendering only: the numbers come from cells.arrow and comparisons.arrow (``orchestrator.results``) and
``orchestrator.statistics``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from orchestrator import statistics as S
from orchestrator.report import Tables, _fmt, _ordered
from orchestrator.results import AVERAGE, OK_STATUS, reported_metrics

#: the marks of a result-table entry whose difference to the baseline has a 95 % interval above / below 0
BETTER, WORSE = "↑", "↓"
_METRIC_NAMES = {
    "test_acc": "test accuracy",
    "base_acc": "Base",
    "novel_acc": "Novel",
    "hm": "HM",
    "target_avg": "target average",
    "val_acc": "validation accuracy",
}


def metric_name(metric: str) -> str:
    return _METRIC_NAMES.get(metric) or (metric[4:] if metric.startswith("acc_") else metric)


def _interval(lo: Optional[float], hi: Optional[float]) -> str:
    return "—" if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"


def _p(p: Optional[float]) -> str:
    return "—" if p is None else ("p < 0.001" if p < 0.001 else f"p {p:.3f}")


def _seed_values(cell: dict, metric: str) -> str:
    shown = [
        f"{s}: {v:.2f}" for s, v in zip(cell.get("seeds") or [], cell.get(f"{metric}_values") or []) if v is not None
    ]
    return ", ".join(shown + [f"{s}: failed" for s in cell.get("failed_seeds") or []]) or "—"


def _by_protocol_shots(rows: list[dict]) -> dict[tuple, list[dict]]:
    """``rows`` grouped by (protocol, shots): protocols in their order, shots ascending."""
    out: dict[tuple, list[dict]] = {}
    order = _ordered(r["protocol"] for r in rows)
    for r in sorted(rows, key=lambda r: (order.index(r["protocol"]), r["shots"])):
        out.setdefault((r["protocol"], r["shots"]), []).append(r)
    return out


# --- per-cell statistics and the Average's interval --------------------------------------------------------


def average_interval(cells: list[dict], method: str, metric: str) -> tuple[Optional[float], tuple]:
    """The Average over the datasets of ``cells`` (one protocol and shots) of a method, and its bootstrap
    interval (seeds resampled within each dataset); (None, (None, None)) when a dataset lacks the method."""
    datasets = _ordered(c["dataset"] for c in cells)
    mine = {c["dataset"]: c for c in cells if c["method"] == method}
    if any(d not in mine for d in datasets):
        return None, (None, None)
    parts = ("base_acc", "novel_acc") if metric == "hm" else (metric,)
    groups = []
    for d in datasets:
        cols = [mine[d].get(f"{p}_values") or [] for p in parts]
        groups.append([vals for vals in zip(*cols) if None not in vals])
    return S.bootstrap(groups, S.hm_of_means if metric == "hm" else S.mean_of_means)


def statistics_section(cells: list[dict], tables: Tables) -> list[str]:
    """Per protocol, every cell's reported metrics (n, mean, std, 95 % interval, per-seed values), then per
    protocol and shots with several datasets the Average of each method with its bootstrap interval."""
    lines = [
        "## Statistics over the seeds",
        "",
        "Per cell and metric: n finished final seeds, mean, std, the 95 % confidence interval of the mean "
        "(Student t over the seeds; HM, a function of the seed-mean Base and Novel: percentile bootstrap of the "
        f"seeds, {S.BOOTSTRAP_RESAMPLES} resamples, fixed seed) and each seed's value. The Average over datasets "
        "has a bootstrap interval (seeds resampled within each dataset). With 2-3 seeds an interval is wide: "
        "that is what the seeds say.",
        "",
    ]
    for protocol in _ordered(c["protocol"] for c in cells):
        pc = [c for c in cells if c["protocol"] == protocol]
        methods, datasets = _ordered(c["method"] for c in pc), _ordered(c["dataset"] for c in pc)
        pc.sort(key=lambda c: (c["shots"], methods.index(c["method"]), datasets.index(c["dataset"])))
        rows = [
            [
                c["dataset"],
                str(c["shots"]),
                c["method"],
                metric_name(m),
                str(c["n"]),
                _fmt(c.get(f"{m}_mean")),
                _fmt(c.get(f"{m}_std")),
                _interval(c.get(f"{m}_ci_low"), c.get(f"{m}_ci_high")),
                _seed_values(c, m),
            ]
            for c in pc
            for m in reported_metrics(c)
        ]
        if not rows:
            continue
        lines += [f"### {protocol}", ""] + tables.add(
            f"statistics_{protocol}",
            ["dataset", "shots", "method", "metric", "n", "mean", "std", "95 % CI", "per-seed values"],
            rows,
        )
        for (_, shots), sc in _by_protocol_shots(pc).items():
            if len({c["dataset"] for c in sc}) < 2:
                continue
            metrics = _ordered(m for c in sc for m in reported_metrics(c))
            avg_rows = []
            for method in _ordered(c["method"] for c in sc):
                entries = []
                for m in metrics:
                    mean, (lo, hi) = average_interval(sc, method, m)
                    entries.append("—" if mean is None else f"{mean:.2f} {_interval(lo, hi)}")
                avg_rows.append([method, *entries])
            lines += [f"Average over the datasets, {shots}-shot (95 % bootstrap interval):", ""]
            lines += tables.add(
                f"average_{protocol}_{shots}shot", ["method", *(metric_name(m) for m in metrics)], avg_rows
            )
    return lines


# --- paired comparison with the baseline ------------------------------------------------------------------


def marks(comparisons: list[dict]) -> dict[tuple, str]:
    """``{(protocol, shots, dataset or AVERAGE, method, metric): BETTER | WORSE}`` where the interval of the
    difference to the baseline excludes 0 (the Average only when every dataset was compared)."""
    out = {}
    for (protocol, shots), rows in _by_protocol_shots(comparisons).items():
        datasets = {r["dataset"] for r in rows if r["dataset"] != AVERAGE}
        for r in rows:
            whole = r["dataset"] != AVERAGE or r["n_pairs"] == len(datasets)
            if r["ci_excludes_zero"] and whole:
                out[(protocol, shots, r["dataset"], r["method"], r["metric"])] = BETTER if r["diff_mean"] > 0 else WORSE
    return out


def _diff_entry(r: Optional[dict]) -> str:
    if r is None or r["diff_mean"] is None:
        return "—"
    mark = (" " + (BETTER if r["diff_mean"] > 0 else WORSE)) if r["ci_excludes_zero"] else ""
    tests = _p(r["p_ttest"]) if r["p_wilcoxon"] is None else f"{_p(r['p_ttest'])}, W {_p(r['p_wilcoxon'])[2:]}"
    return f"{r['diff_mean']:+.2f} {_interval(r['diff_ci_low'], r['diff_ci_high'])}{mark} ({tests})"


def comparisons_section(comparisons: list[dict], baseline_note: str, tables: Tables) -> list[str]:
    """Per protocol, shots and metric: rows = datasets (+ Average, + the sign count), columns = methods; each
    entry the mean difference to the baseline, its 95 % interval, the mark and the p-values."""
    lines = ["## Paired comparison with the baseline", ""]
    if not comparisons:
        return lines + [baseline_note, ""]
    lines += [
        f"Method − baseline in accuracy points over the seeds both finished (the same seed is the same "
        "few-shot split): mean difference, 95 % interval (Student t over the per-seed differences; HM: paired "
        "bootstrap), the paired t-test p-value and, from "
        f"{S.WILCOXON_MIN_N} seeds on, the Wilcoxon signed-rank p-value (W). Average: paired bootstrap within "
        "the datasets; its tests take each dataset's difference as one unit. "
        f"{BETTER} / {WORSE}: the interval lies above / below 0 (also marked in the result tables). "
        "comparisons.arrow holds every figure.",
        "",
    ]
    for (protocol, shots), rows in _by_protocol_shots(comparisons).items():
        baseline = rows[0]["baseline"]
        methods = _ordered(r["method"] for r in rows)
        for metric in _ordered(r["metric"] for r in rows):
            mr = [r for r in rows if r["metric"] == metric]
            look = {(r["dataset"], r["method"]): r for r in mr}
            datasets = _ordered(r["dataset"] for r in mr if r["dataset"] != AVERAGE)
            body = [[d, *(_diff_entry(look.get((d, m))) for m in methods)] for d in datasets]
            avg = [look.get((AVERAGE, m)) for m in methods]
            if any(avg):  # an Average over fewer datasets than the table's is not the table's Average
                body.append(
                    [
                        "**Average**",
                        *(
                            _diff_entry(a)
                            if a is None or a["n_pairs"] == len(datasets)
                            else f"— (only {a['n_pairs']} of {len(datasets)} datasets)"
                            for a in avg
                        ),
                    ]
                )
                body.append(
                    [
                        "better / worse",
                        *(
                            "—"
                            if a is None
                            else f"better on {a['datasets_better']} of {a['n_pairs']}, worse on {a['datasets_worse']}"
                            for a in avg
                        ),
                    ]
                )
            lines += [f"### {protocol}, {shots}-shot: {metric_name(metric)} (method − {baseline})", ""]
            lines += tables.add(f"comparison_{protocol}_{shots}shot_{metric}", ["dataset", *methods], body)
    return lines


# --- unstable seeds and cells ------------------------------------------------------------------------------


def _run_ids(trials: list[dict]) -> dict[tuple, str]:
    """``{(cell id, seed): MLflow run id}`` of the finished final trials."""
    return {
        (t["cell_id"], t["seed"]): t.get("mlflow_run_id") or "—"
        for t in trials
        if t["stage"] == "final" and t["status"] == OK_STATUS
    }


def unstable_section(cells: list[dict], trials: list[dict], unstable, tables: Tables) -> list[str]:
    """Seeds far from their cell's median and cells whose std is above the threshold, with the trials' MLflow
    runs (``unstable``: the spec's ``report.unstable``)."""
    runs = _run_ids(trials)
    seed_rows, cell_rows = [], []
    for c in cells:
        for m in reported_metrics(c):
            values = {s: v for s, v in zip(c.get("seeds") or [], c.get(f"{m}_values") or []) if v is not None}
            far = S.outlier_seeds(values, unstable.mads, unstable.min_spread)
            median = float(np.median(list(values.values()))) if values else None
            seed_rows += [
                [
                    c["cell_id"],
                    metric_name(m),
                    str(s),
                    f"{values[s]:.2f}",
                    _fmt(median),
                    f"{d:.1f}",
                    runs.get((c["cell_id"], s), "—"),
                ]
                for s, d in far.items()
            ]
            if m in (c.get("high_std_metrics") or []):
                cell_rows.append(
                    [
                        c["cell_id"],
                        metric_name(m),
                        _fmt(c.get(f"{m}_std")),
                        _seed_values(c, m),
                        ", ".join(f"{s}: {runs.get((c['cell_id'], s), '—')}" for s in values),
                    ]
                )
    lines = [
        "## Unstable seeds",
        "",
        f"A seed is listed when its value lies more than {unstable.mads:g} scaled MADs from its cell's median "
        f"(scale = max(1.4826 × MAD, {unstable.min_spread:g} points); cells with 3 or more seeds: with 2 seeds "
        f"which one is off cannot be told), a cell when its std exceeds {unstable.max_std:g} points. "
        "Open the run in MLflow to see what that seed did.",
        "",
    ]
    if not any("seeds" in c for c in cells):
        return lines + [
            "These results hold no per-seed values (cells.arrow was written before it had them); rerun "
            "the sweep command to rewrite the tables.",
            "",
        ]
    if not seed_rows and not cell_rows:
        return lines + ["None: every cell's seeds agree within these limits.", ""]
    if seed_rows:
        lines += tables.add(
            "unstable_seeds",
            ["cell", "metric", "seed", "value", "cell median", "scaled MADs away", "MLflow run"],
            seed_rows,
        )
    if cell_rows:
        lines += tables.add(
            "unstable_cells", ["cell", "metric", "std", "per-seed values", "MLflow runs (seed: run)"], cell_rows
        )
    return lines
