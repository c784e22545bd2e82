"""Paper-style report from the Arrow results alone: ``report.md`` plus PNG plots.

Tables: rows = datasets plus an Average row, columns = methods (mean ± std over final seeds).
Base-to-novel gets Base, Novel and HM tables where the Average HM is the HM of the averaged Base
and Novel (as in the CoCoOp/MaPLe papers), not the mean of per-dataset HMs. Cross-dataset and
domain generalization: rows = methods, columns = source and each target (in the spec's order, which
travels in cells.arrow's schema metadata; else the catalogue's, the papers' order) plus the target
average.
Plots (matplotlib Agg): few-shot accuracy vs shots per dataset and averaged; Base/Novel/HM bars.
The failure ledger lists every failed trial (from ``trials.arrow``), every trial whose transfer
target failed (error class ``target_failed``, its other targets kept) and every cell with fewer
successful final runs than planned (the plan's counts travel in cells.arrow's schema metadata).

``python -m orchestrator.report <results dir>`` regenerates everything from ``cells.arrow``.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional

from fewshot.errors import UserError
from orchestrator.results import CELLS_FILE, ERROR_STATUS, TRIALS_FILE, harmonic_mean, read_table

REPORT_FILE = "report.md"


def _fmt(mean: Optional[float], std: Optional[float] = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _avg(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals and len(vals) == len(values) else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _ordered(values) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def average_row(cells: list[dict], methods: list[str], datasets: list[str], metric: str) -> dict[str, Optional[float]]:
    """Per method, the mean over datasets of ``<metric>_mean`` (None if a dataset is missing);
    for ``hm`` the HM of the averaged base and novel accuracies."""
    out = {}
    for m in methods:
        if metric == "hm":
            b = average_row(cells, [m], datasets, "base_acc")[m]
            n = average_row(cells, [m], datasets, "novel_acc")[m]
            out[m] = harmonic_mean(b, n)
        else:
            look = {c["dataset"]: c.get(f"{metric}_mean") for c in cells if c["method"] == m}
            out[m] = _avg([look.get(d) for d in datasets])
    return out


def _metric_table(cells: list[dict], metric: str, title: str) -> list[str]:
    methods = _ordered(c["method"] for c in cells)
    datasets = _ordered(c["dataset"] for c in cells)
    by = {(c["method"], c["dataset"]): c for c in cells}
    rows = []
    for d in datasets:
        row = [d]
        for m in methods:
            c = by.get((m, d))
            std = None if metric == "hm" else (c or {}).get(f"{metric}_std")
            row.append(_fmt((c or {}).get(f"{metric}_mean"), std))
        rows.append(row)
    avg = average_row(cells, methods, datasets, metric)
    rows.append(["**Average**"] + [_fmt(avg[m]) for m in methods])
    return [f"#### {title}", ""] + _table(["dataset"] + methods, rows)


def _target_order(found: set[str], spec_order: list[str]) -> list[str]:
    """``found`` target names in the spec's order, then the catalogue's (the papers' order), then by name."""
    from fewshot.registry import dataset_names

    rank: dict[str, int] = {}
    for n in [*spec_order, *dataset_names()]:
        rank.setdefault(n, len(rank))
    return sorted(found, key=lambda n: (rank.get(n, len(rank)), n))


def _transfer_table(cells: list[dict], spec_targets: list[str]) -> list[str]:
    found = {k[4:-5] for c in cells for k, v in c.items() if k.startswith("acc_") and k.endswith("_mean") and v is not None}
    targets = _target_order(found, spec_targets)
    header = ["method", "source (dataset)", "source acc"] + targets + ["target average"]
    rows = []
    for c in cells:
        rows.append([c["method"], c["dataset"], _fmt(c.get("test_acc_mean"))]
                    + [_fmt(c.get(f"acc_{t}_mean")) for t in targets] + [_fmt(c.get("target_avg_mean"))])
    return _table(header, rows)


def render_markdown(cells: list[dict], title: str = "promptsweep results", targets: Optional[list[str]] = None) -> str:
    lines = [f"# {title}", "", "Accuracy in %, mean ± std over the final seeds (n per cell in cells.arrow).", ""]
    for protocol in _ordered(c["protocol"] for c in cells):
        pc = [c for c in cells if c["protocol"] == protocol]
        lines += [f"## {protocol}", ""]
        if protocol in ("cross_dataset", "domain_generalization"):
            lines += _transfer_table(pc, targets or [])
            continue
        for shots in sorted({c["shots"] for c in pc}):
            sc = [c for c in pc if c["shots"] == shots]
            lines += [f"### {shots}-shot", ""]
            if protocol == "base2novel":
                lines += _metric_table(sc, "base_acc", "Base")
                lines += _metric_table(sc, "novel_acc", "Novel")
                lines += _metric_table(sc, "hm", "HM (Average = HM of the averaged Base and Novel)")
            else:
                lines += _metric_table(sc, "test_acc", "Test accuracy")
    return "\n".join(lines)


def plot_fewshot_curves(cells: list[dict], path: Path) -> Optional[Path]:
    fs = [c for c in cells if c["protocol"] == "fewshot" and c.get("test_acc_mean") is not None]
    if not fs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = _ordered(c["dataset"] for c in fs)
    methods = _ordered(c["method"] for c in fs)
    shots = sorted({c["shots"] for c in fs})
    panels = datasets + ["Average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, d in zip(axes[0], panels):
        for m in methods:
            ys = []
            for k in shots:
                k_cells = [c for c in fs if c["shots"] == k]
                ys.append(average_row(k_cells, [m], datasets, "test_acc")[m] if d == "Average" else
                          next((c["test_acc_mean"] for c in k_cells if c["method"] == m and c["dataset"] == d), None))
            ax.plot(shots, [float("nan") if y is None else y for y in ys], marker="o", label=m)
        ax.set_title(d)
        ax.set_xlabel("shots per class")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(s) for s in shots])
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_base2novel(cells: list[dict], out_dir: Path) -> list[Path]:
    bn = [c for c in cells if c["protocol"] == "base2novel" and c.get("base_acc_mean") is not None]
    if not bn:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for shots in sorted({c["shots"] for c in bn}):
        sc = [c for c in bn if c["shots"] == shots]
        methods, datasets = _ordered(c["method"] for c in sc), _ordered(c["dataset"] for c in sc)
        vals = {k: average_row(sc, methods, datasets, k) for k in ("base_acc", "novel_acc", "hm")}
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(methods), 3))
        w = 0.27
        for i, (k, label) in enumerate((("base_acc", "Base"), ("novel_acc", "Novel"), ("hm", "HM"))):
            ax.bar([j + (i - 1) * w for j in range(len(methods))], [vals[k][m] or 0 for m in methods], w, label=label)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel("accuracy (%), average over datasets")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"base2novel_{shots}shot.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def render_failures(trials: list[dict], cells: list[dict], planned: dict[str, int]) -> str:
    """The failure ledger: every trial that did not finish, and every cell short of its final runs."""
    failed = [t for t in trials if t["status"] == ERROR_STATUS or t.get("error_class") == "target_failed"]
    short = []
    for c in cells:
        want = planned.get(c["cell_id"])
        if c["n_failed"] or (want is not None and c["n"] < want) or c["n"] == 0:
            short.append(c)
    seen = {c["cell_id"] for c in cells}
    short_ids = [c["cell_id"] for c in short] + [cid for cid in planned if cid not in seen]
    if not failed and not short_ids:
        return ""
    lines = ["## Failed trials and incomplete cells", ""]
    if failed:
        lines += [f"{len(failed)} trial(s) failed, or lost a transfer target (error class target_failed: its other "
                  "targets are kept; see the status / error_class / error_message columns of trials.arrow):", ""]
        rows = [[t["cell_id"], t["stage"], str(t["seed"]), t["error_class"] or "—",
                 " ".join((t["error_message"] or "").split())[:160].replace("|", "/")] for t in failed]
        lines += _table(["cell", "stage", "seed", "error class", "message"], rows)
    if short_ids:
        by_id = {c["cell_id"]: c for c in cells}
        rows = []
        for cid in short_ids:
            c = by_id.get(cid, {"n": 0, "n_failed": 0})
            want = planned.get(cid)
            rows.append([cid, f"{c['n']}/{want}" if want is not None else str(c["n"]), str(c["n_failed"])])
        lines += [f"{len(short_ids)} cell(s) incomplete (their table entries average fewer seeds, or are missing). "
                  "An interrupted sweep continues when the same command is rerun; failed trials need their cause "
                  "fixed (error class above) and a rerun with --fresh:", ""]
        lines += _table(["cell", "final runs ok / planned", "final runs failed"], rows)
    return "\n".join(lines)


def _schema_meta(cells_path: Path, key: str, default):
    """One JSON value of cells.arrow's schema metadata (``default`` when absent)."""
    import json

    import pyarrow.ipc as ipc
    import pyarrow as pa

    with pa.memory_map(str(cells_path)) as src:
        meta = ipc.open_file(src).schema.metadata or {}
    raw = meta.get(key.encode())
    return json.loads(raw) if raw else default


def _planned_final_runs(cells_path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in _schema_meta(cells_path, "planned_final_runs", {}).items()}


def write_report(results_dir: Path) -> Path:
    """Regenerate report.md and the plots in ``results_dir`` from its cells.arrow (and trials.arrow)."""
    results_dir = Path(results_dir)
    cells_path = results_dir / CELLS_FILE
    if not cells_path.is_file():
        raise UserError(f"{cells_path} does not exist (pass the sweep's results directory, e.g. results/demo)")
    cells = read_table(cells_path).to_pylist()
    md = render_markdown(cells, title=f"promptsweep results: {results_dir.name}",
                         targets=_schema_meta(cells_path, "targets", []))
    trials_path = results_dir / TRIALS_FILE
    trials = read_table(trials_path).to_pylist() if trials_path.is_file() else []
    ledger = render_failures(trials, cells, _planned_final_runs(cells_path))
    if ledger:
        md += "\n" + ledger
    plots = []
    p = plot_fewshot_curves(cells, results_dir / "fewshot_curves.png")
    if p:
        plots.append(p)
    plots += plot_base2novel(cells, results_dir)
    if plots:
        md += "\n## Plots\n\n" + "\n".join(f"![{q.stem}]({q.name})" for q in plots) + "\n"
    out = results_dir / REPORT_FILE
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", help="a sweep's results directory (holding cells.arrow)")
    args = ap.parse_args(argv)
    try:
        print(write_report(Path(args.results_dir)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
