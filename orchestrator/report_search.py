"""Report section on what mattered in the search: per method, each searched parameter's fANOVA importance
averaged over the cells that searched (a table and a bar plot), and the best value of each parameter per
dataset, so a reader sees whether one setting serves every dataset. The numbers come from
``orchestrator.importance``; a study it could not evaluate is listed with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from orchestrator.importance import MIN_TRIALS, CellImportance, ParamSummary, summarize
from orchestrator.report import Tables, _fmt, _fmt_param, _ordered, _pyplot, _save


def _spread(best: list[tuple[dict, Any]]) -> str:
    """How a parameter's best values differ across cells: one value, a numeric range, or value counts."""
    values = [v for _, v in best]
    if not values:
        return "—"
    if len(set(map(repr, values))) == 1:
        return f"{_fmt_param(values[0])} everywhere"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return f"{_fmt_param(min(values))} to {_fmt_param(max(values))}"
    counts: dict[str, int] = {}
    for v in values:
        counts[_fmt_param(v)] = counts.get(_fmt_param(v), 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in counts.items())


def _importance(s: ParamSummary) -> tuple[str, str]:
    if s.importance_mean is None:
        return "—", "—"
    return _fmt(s.importance_mean), f"{s.importance_min:.2f} to {s.importance_max:.2f}"


def _best_by_dataset(method_results: list[CellImportance], params: list[str]) -> list[list[str]]:
    """Rows = datasets, columns = parameters; a dataset searched at several shots lists ``<shots>: value``."""
    rows = []
    for d in _ordered(r.cell["dataset"] for r in method_results):
        mine = sorted((r for r in method_results if r.cell["dataset"] == d), key=lambda r: r.cell["shots"])
        several = len(mine) > 1
        entries = []
        for p in params:
            got = [(r.cell["shots"], r.best_params[p]) for r in mine if p in r.best_params]
            entries.append("; ".join(f"{k}-shot: {_fmt_param(v)}" if several else _fmt_param(v) for k, v in got) or "—")
        rows.append([d, *entries])
    return rows


def search_section(results: list[CellImportance], tables: Tables) -> list[str]:
    """Per method: importances (mean, range, cells evaluated) and how the best value varies, the best values
    per dataset, and the cells whose study was not evaluated (with why)."""
    if not results:
        return []
    lines = [
        "## What mattered in the search",
        "",
        "Hyperparameter importance per searched cell: Optuna's fANOVA evaluator (optuna.importance."
        "get_param_importances, seed 0) on the cell's study in optuna.journal; it sums to 1 over the parameters "
        "every completed trial sampled. Averaged here over the cells where it was evaluated (a study needs "
        f"{MIN_TRIALS} completed trials). Best value = the study's best trial.",
        "",
    ]
    for method, params in summarize(results).items():
        mine = [r for r in results if r.cell["method"] == method]
        rows = [[p, *_importance(s), f"{s.evaluated} of {len(mine)}", _spread(s.best)] for p, s in params.items()]
        lines += [f"### {method}", ""] + tables.add(
            f"importance_{method}",
            ["parameter", "importance (mean)", "range over cells", "cells evaluated", "best value across cells"],
            rows,
        )
        lines += ["Best value per dataset:", ""] + tables.add(
            f"best_values_{method}", ["dataset", *params], _best_by_dataset(mine, list(params))
        )
        notes = [f"- {r.cell['cell_id']}: {r.note}" for r in mine if r.note]
        if notes:
            lines += ["Studies without computed importances:", "", *notes, ""]
    return lines


def plot_importances(results: list[CellImportance], path: Path) -> Optional[Path]:
    """One panel per method: each parameter's mean importance (bars) and its range over the cells (whiskers)."""
    summary = {
        m: {p: s for p, s in ps.items() if s.importance_mean is not None} for m, ps in summarize(results).items()
    }
    summary = {m: ps for m, ps in summary.items() if ps}
    if not summary:
        return None
    fig, axes = _pyplot().subplots(
        1, len(summary), figsize=(3.4 * len(summary), 0.4 + 0.45 * max(map(len, summary.values())) + 1.2), squeeze=False
    )
    for ax, (method, params) in zip(axes[0], summary.items()):
        names = list(params)[::-1]  # the most important on top
        means = [params[p].importance_mean for p in names]
        err = [
            [m - params[p].importance_min for p, m in zip(names, means)],
            [params[p].importance_max - m for p, m in zip(names, means)],
        ]
        ax.barh(names, means, xerr=err, color="C0", edgecolor="black", linewidth=0.5, capsize=3)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fANOVA importance")
        ax.set_title(method, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("What mattered in the search (mean over cells, range as whiskers)", fontsize=9)
    return _save(fig, path)
