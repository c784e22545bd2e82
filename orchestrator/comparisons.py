"""The paired comparisons of ``comparisons.arrow``: every method against its protocol's baseline (the spec's
``report.baseline``), per (protocol, shots), metric and dataset, over the seeds both cells finished, then the
Average over the datasets (when there are several) with the better / worse counts.

Works on cells.arrow records (their ``seeds`` and ``<metric>_values``); the numbers come from
``orchestrator.statistics``, the columns from ``orchestrator.results.COMPARISON_COLUMNS``.
"""

from __future__ import annotations

import numpy as np

from orchestrator import statistics as S
from orchestrator.results import AVERAGE, reported_metrics


def _seed_values(cell: dict, metric: str) -> dict[int, float]:
    return {s: v for s, v in zip(cell.get("seeds") or [], cell.get(f"{metric}_values") or []) if v is not None}


def _per_seed(cell: dict, metric: str) -> dict[int, tuple[float, ...]]:
    """Each seed's components of ``metric``: (Base, Novel) for hm (a function of both seed means), else (value,)."""
    if metric != "hm":
        return {s: (v,) for s, v in _seed_values(cell, metric).items()}
    base, novel = _seed_values(cell, "base_acc"), _seed_values(cell, "novel_acc")
    return {s: (base[s], novel[s]) for s in base if s in novel}


def _compare(metric: str, method: dict, baseline: dict) -> S.Paired:
    if metric == "hm":
        return S.compare_hm(method, baseline)
    return S.compare({s: v[0] for s, v in method.items()}, {s: v[0] for s, v in baseline.items()})


def _comparison_record(paired, **ids) -> dict:
    lo, hi = paired.ci
    return dict(
        ids,
        seeds=list(paired.seeds),
        method_mean=paired.method_mean,
        baseline_mean=paired.baseline_mean,
        diff_mean=paired.diff,
        diff_ci_low=lo,
        diff_ci_high=hi,
        ci_method=paired.ci_method,
        ci_excludes_zero=paired.excludes_zero if paired.diff is not None else None,
        p_ttest=paired.p_ttest,
        p_wilcoxon=paired.p_wilcoxon,
    )


def _compare_group(cells: list[dict], baseline: str) -> list[dict]:
    """Comparison records of one (protocol, shots): per method, metric and dataset, then the Average over the
    datasets (when there are several)."""
    base = {c["dataset"]: c for c in cells if c["method"] == baseline}
    out = []
    for method in dict.fromkeys(c["method"] for c in cells if c["method"] != baseline):
        mine = [(c, base[c["dataset"]]) for c in cells if c["method"] == method and c["dataset"] in base]
        metrics = dict.fromkeys(m for c, b in mine for m in reported_metrics(c) if f"{m}_mean" in b)
        for metric in metrics:
            pairs, rows = [], []
            for c, b in mine:
                mc, bc = _per_seed(c, metric), _per_seed(b, metric)
                p = _compare(metric, mc, bc)
                ids = dict(
                    dataset=c["dataset"],
                    metric=metric,
                    method=method,
                    baseline=baseline,
                    cell_id=c["cell_id"],
                    baseline_cell_id=b["cell_id"],
                    n_pairs=len(p.seeds),
                )
                out.append(_comparison_record(p, **ids))
                if p.diff is not None:  # the dataset's shared seeds: [method components, baseline components]
                    pairs.append(p)
                    rows.append(np.array([[*mc[s], *bc[s]] for s in p.seeds], dtype=float))
            if len({c["dataset"] for c in cells}) > 1 and pairs:
                avg = S.compare_average(pairs, rows, S.hm_of_means if metric == "hm" else S.mean_of_means)
                better, worse, n = S.sign_count([p.diff for p in pairs])
                out.append(
                    _comparison_record(
                        avg,
                        dataset=AVERAGE,
                        metric=metric,
                        method=method,
                        baseline=baseline,
                        n_pairs=n,
                        datasets_better=better,
                        datasets_worse=worse,
                    )
                )
    return out


def comparison_records(cells: list[dict], settings) -> list[dict]:
    """The rows of comparisons.arrow for ``cells`` (cells.arrow records) under ``settings`` (``spec.ReportSpec``);
    none for a protocol without a baseline."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for c in cells:  # a method is compared with the baseline on the same backbone
        groups.setdefault((c.get("backbone"), c["protocol"], c["shots"]), []).append(c)
    for (backbone, protocol, shots), group in groups.items():
        baseline = settings.baseline_for(protocol)
        if baseline is None:
            continue
        out += [dict(r, protocol=protocol, shots=shots, backbone=backbone) for r in _compare_group(group, baseline)]
    return out
