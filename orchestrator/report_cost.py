"""Report section on what the sweep cost: GPU-hours (CPU-hours on a CPU-only sweep) and images processed,
in total and per method, and per protocol a plot of accuracy against cost, one point per method with the
Pareto front marked.

Cost comes from the cost columns of cells.arrow (each cell's trials summed: search and final, finished,
pruned and failed) and trials.arrow; a trial's GPU-seconds are its reserved GPU share x its wall time,
its CPU-seconds its reserved CPUs x its wall time (``orchestrator.results``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from orchestrator.report import _STYLES, Tables, _ordered, _pyplot, _save
from orchestrator.results import harmonic_mean
from orchestrator.spec import TRANSFER_PROTOCOLS
from orchestrator.statistics import pareto_front

#: the accuracy a protocol's plot shows per method (averaged over its cells; base2novel: HM of the averages)
HEADLINE = {
    "fewshot": "test_acc",
    "base2novel": "hm",
    "cross_dataset": "target_avg",
    "domain_generalization": "target_avg",
}
_HEADLINE_TEXT = {
    "test_acc": "test accuracy",
    "hm": "HM of the averaged Base and Novel",
    "target_avg": "target average",
}


def _mean(values: list[Optional[float]]) -> Optional[float]:
    return None if not values or None in values else sum(values) / len(values)


def headline(cells: list[dict], protocol: str, method: str) -> Optional[float]:
    """A method's accuracy in ``protocol``: the headline metric averaged over every (dataset, shots) of the
    protocol (None when the method lacks one of them)."""
    pc = [c for c in cells if c["protocol"] == protocol]
    keys = _ordered((c["dataset"], c["shots"]) for c in pc)
    mine = {(c["dataset"], c["shots"]): c for c in pc if c["method"] == method}
    rows = [mine.get(k) or {} for k in keys]
    if HEADLINE[protocol] == "hm":
        return harmonic_mean(
            _mean([r.get("base_acc_mean") for r in rows]), _mean([r.get("novel_acc_mean") for r in rows])
        )
    return _mean([r.get(f"{HEADLINE[protocol]}_mean") for r in rows])


def _unit(cells: list[dict]) -> tuple[str, str]:
    """('gpu_seconds', 'GPU-hours'), or the CPU pair when the sweep reserved no GPU."""
    on_gpu = any((c.get("gpu_seconds") or 0) > 0 for c in cells)
    return ("gpu_seconds", "GPU-hours") if on_gpu else ("cpu_seconds", "CPU-hours")


def _hours(cells: list[dict], key: str) -> float:
    return sum(c.get(key) or 0.0 for c in cells) / 3600


def _count(cells: list[dict], key: str) -> str:
    known = [c[key] for c in cells if c.get(key) is not None]
    return f"{sum(known):,}" if known else "—"


def points(cells: list[dict], protocol: str, key: str) -> list[tuple[str, float, float, bool]]:
    """(method, cost in hours of ``key``, headline accuracy, on the Pareto front) of the methods of ``protocol``
    that have an accuracy there."""
    pc = [c for c in cells if c["protocol"] == protocol]
    out = [
        (m, _hours([c for c in pc if c["method"] == m], key), headline(cells, protocol, m))
        for m in _ordered(c["method"] for c in pc)
    ]
    out = [(m, x, y) for m, x, y in out if y is not None]
    return [(m, x, y, best) for (m, x, y), best in zip(out, pareto_front([(x, y) for _, x, y in out]))]


def cost_section(cells: list[dict], trials: list[dict], tables: Tables) -> list[str]:
    """The total cost, a table per method (trials, GPU-hours, CPU-hours, images trained / evaluated) and the
    Pareto front of each protocol."""
    if all(c.get("cpu_seconds") is None for c in cells):
        return [
            "## Cost",
            "",
            "These results record no cost (their trials were recorded before trials.arrow had cost columns).",
            "",
        ]
    key, unit = _unit(cells)
    rows = []
    for method in _ordered(c["method"] for c in cells):
        mc = [c for c in cells if c["method"] == method]
        rows.append(
            [
                method,
                str(sum(1 for t in trials if t["method"] == method)),
                f"{_hours(mc, 'gpu_seconds'):.3f}",
                f"{_hours(mc, 'cpu_seconds'):.3f}",
                _count(mc, "images_trained"),
                _count(mc, "images_evaluated"),
            ]
        )
    rows.append(
        [
            "**Total**",
            str(len(trials)),
            f"{_hours(cells, 'gpu_seconds'):.3f}",
            f"{_hours(cells, 'cpu_seconds'):.3f}",
            _count(cells, "images_trained"),
            _count(cells, "images_evaluated"),
        ]
    )
    cpu_only = "" if key == "gpu_seconds" else " The sweep reserved no GPU, so its plots show CPU-hours."
    fronts = [
        f"{p}: {', '.join(m for m, _, _, best in points(cells, p, key) if best) or '—'}"
        for p in _ordered(c["protocol"] for c in cells)
    ]
    also = f" ({_hours(cells, 'cpu_seconds'):.3f} CPU-hours)" if key == "gpu_seconds" else ""
    return (
        [
            "## Cost",
            "",
            f"The sweep took {_hours(cells, key):.3f} {unit}{also} over "
            f"{len(trials)} trials, search and final, pruned and failed ones included. GPU-hours = reserved GPU share × "
            "wall time, CPU-hours = reserved CPUs × wall time (what the trials held, not what they measured); images "
            f"processed = images trained + images evaluated.{cpu_only}",
            "",
        ]
        + tables.add("cost", ["method", "trials", "GPU-hours", "CPU-hours", "images trained", "images evaluated"], rows)
        + [
            f"Pareto front of accuracy and {unit} (no other method costs no more and scores no less, one of them strictly): "
            + "; ".join(fronts)
            + ".",
            "",
        ]
    )


def plot_cost(cells: list[dict], out_dir: Path) -> list[Path]:
    """Per protocol, accuracy against cost (one point per method, the Pareto front joined and filled)."""
    key, unit = _unit(cells)
    if all(c.get(key) is None for c in cells):
        return []
    paths = []
    for protocol in _ordered(c["protocol"] for c in cells):
        pts = points(cells, protocol, key)
        if not pts:
            continue
        import matplotlib.ticker

        fig, ax = _pyplot().subplots(figsize=(4.5, 3.2))
        for i, (m, x, y, best) in enumerate(pts):
            color = f"C{i % 10}"
            ax.scatter(
                [x],
                [y],
                marker=_STYLES[i % len(_STYLES)][0],
                s=36,
                label=m,
                edgecolors=color,
                facecolors=color if best else "none",
            )  # filled: on the Pareto front
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        on = sorted((x, y) for _, x, y, best in pts if best)
        ax.plot(
            [x for x, _ in on],
            [y for _, y in on],
            linestyle="--",
            color="grey",
            linewidth=0.8,
            label="Pareto front (filled)",
        )
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        ax.set_xlabel(unit + ("" if key == "gpu_seconds" else " (no GPU reserved)"))
        ax.set_ylabel(f"{_HEADLINE_TEXT[HEADLINE[protocol]]} (%)")
        what = "cells" if protocol in TRANSFER_PROTOCOLS else "datasets and shots"
        ax.set_title(f"{protocol}: accuracy (mean over {what}) vs cost", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
        paths.append(_save(fig, out_dir / f"cost_{protocol}.png"))
    return paths
