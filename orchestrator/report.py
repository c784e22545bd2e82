"""Paper-style report from the Arrow results alone: ``report.md``, plots (300 dpi PNG + PDF) and every
table as LaTeX (``tables/<name>.tex``, booktabs).

The report opens with its provenance (sweep, backbone, git commit, spec hash, date, package versions,
from cells.arrow); the result tables are followed by each cell's chosen hyperparameters.
Tables: rows = datasets plus an Average row, columns = methods (mean ± std over final seeds), the best
of each row in bold.
Base-to-novel gets Base, Novel and HM tables where the Average HM is the HM of the averaged Base
and Novel (as in the CoCoOp/MaPLe papers), not the mean of per-dataset HMs. Cross-dataset and
domain generalization: rows = methods, columns = source and each target (in the spec's order, which
travels in cells.arrow's schema metadata; else the catalogue's, the papers' order) plus the target
average.
Plots (matplotlib Agg): few-shot accuracy vs shots per dataset and averaged (± std bands, shared y-axis,
legend outside); Base/Novel/HM bars.
The failure ledger lists every failed trial (from ``trials.arrow``), every trial whose transfer
target failed (error class ``target_failed``, its other targets kept) and every cell with fewer
successful final runs than planned (the plan's counts travel in cells.arrow's schema metadata).
Between the hyperparameters and the ledger come the sections a reviewer asks for, rendered by
``report_stats`` (paired comparison with the baseline from comparisons.arrow, whose significant
differences this module marks ↑ / ↓ in the result tables; unstable seeds; per-cell statistics),
``report_cost`` (cost, accuracy vs GPU-hours) and ``report_search`` (importances from optuna.journal).

``python -m orchestrator.report <results dir>`` regenerates everything from ``cells.arrow`` (and the other
tables and the Optuna journal beside it).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional

from fewshot.errors import UserError
from fewshot.protocols import TRANSFER_PROTOCOLS
from orchestrator.results import (
    CELLS_FILE,
    COMPARISONS_FILE,
    ERROR_STATUS,
    TRIALS_FILE,
    harmonic_mean,
    read_meta,
    read_table,
    report_settings,
)

REPORT_FILE = "report.md"
TABLES_DIR = "tables"  # one <name>.tex per report table


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


class Tables:
    """The report's result tables, kept as data so that each renders both as Markdown and as LaTeX.

    A cell string wrapped in ``**`` is the best of its row (bold in both renderings)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, list[str], list[list[str]]]] = []

    def add(self, name: str, header: list[str], rows: list[list[str]]) -> list[str]:
        self.items.append((name, header, rows))
        return _table(header, rows)

    def write_latex(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, header, rows in self.items:
            body = [" & ".join(_latex(h) for h in header) + r" \\", r"\midrule"]
            for r in rows:
                if r and r[0] == "**Average**":
                    body.append(r"\midrule")
                body.append(" & ".join(_latex(c) for c in r) + r" \\")
            tex = "\n".join(
                [
                    r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}",
                    r"\toprule",
                    *body,
                    r"\bottomrule",
                    r"\end{tabular}",
                    "",
                ]
            )
            p = folder / f"{name}.tex"
            _write_text(p, tex)
            paths.append(p)
        return paths


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"$<$",
    ">": r"$>$",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "−": r"$-$",
    "×": r"$\times$",
}


def _latex(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**") and len(text) > 4
    core = text[2:-2] if bold else text
    core = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in core).replace("±", r"$\pm$").replace("—", "--")
    return rf"\textbf{{{core}}}" if bold else core


def _bold_best(values: list[Optional[float]], texts: list[str]) -> list[str]:
    """``texts`` with the entries of the highest value (ties included) wrapped in ``**``."""
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return texts
    best = max(present)
    return [f"**{t}**" if v is not None and abs(v - best) < 1e-9 else t for v, t in zip(values, texts)]


def _write_text(path: Path, text: str) -> None:
    from fewshot.paths import atomic_open

    with atomic_open(path, "w") as fh:
        fh.write(text)


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


Marks = dict[tuple, str]  # (protocol, shots, dataset or "Average", method, metric) -> ↑ / ↓ (report_stats.marks)


def _marked(text: str, marks: Marks, key: tuple) -> str:
    mark = marks.get(key)
    return f"{text} {mark}" if mark and text != "—" else text


def _metric_table(
    cells: list[dict], metric: str, title: str, tables: Tables, name: str, marks: Optional[Marks] = None
) -> list[str]:
    methods = _ordered(c["method"] for c in cells)
    datasets = _ordered(c["dataset"] for c in cells)
    by = {(c["method"], c["dataset"]): c for c in cells}
    marks, where = marks or {}, ((cells[0]["protocol"], cells[0]["shots"]) if cells else ())
    rows = []
    for d in datasets:
        means, texts = [], []
        for m in methods:
            c = by.get((m, d)) or {}
            std = None if metric == "hm" else c.get(f"{metric}_std")
            means.append(c.get(f"{metric}_mean"))
            texts.append(_marked(_fmt(c.get(f"{metric}_mean"), std), marks, (*where, d, m, metric)))
        rows.append([d] + _bold_best(means, texts))
    avg = average_row(cells, methods, datasets, metric)
    rows.append(
        ["**Average**"]
        + _bold_best(
            [avg[m] for m in methods], [_marked(_fmt(avg[m]), marks, (*where, "Average", m, metric)) for m in methods]
        )
    )
    return [f"#### {title}", ""] + tables.add(name, ["dataset"] + methods, rows)


def _target_order(found: set[str], spec_order: list[str]) -> list[str]:
    """``found`` target names in the spec's order, then the catalogue's (the papers' order), then by name."""
    from fewshot.registry import dataset_names

    rank: dict[str, int] = {}
    for n in [*spec_order, *dataset_names()]:
        rank.setdefault(n, len(rank))
    return sorted(found, key=lambda n: (rank.get(n, len(rank)), n))


def _transfer_table(
    cells: list[dict], spec_targets: list[str], tables: Tables, name: str, marks: Optional[Marks] = None
) -> list[str]:
    found = {
        k[4:-5] for c in cells for k, v in c.items() if k.startswith("acc_") and k.endswith("_mean") and v is not None
    }
    targets = _target_order(found, spec_targets)
    header = ["method", "source (dataset)", "source acc"] + targets + ["target average"]
    keys = ["test_acc", *(f"acc_{t}" for t in targets), "target_avg"]
    marks = marks or {}
    columns = [
        _bold_best(
            [c.get(f"{k}_mean") for c in cells],
            [
                _marked(_fmt(c.get(f"{k}_mean")), marks, (c["protocol"], c["shots"], c["dataset"], c["method"], k))
                for c in cells
            ],
        )
        for k in keys
    ]
    rows = [[c["method"], c["dataset"], *(col[i] for col in columns)] for i, c in enumerate(cells)]
    return tables.add(name, header, rows)


def _hyperparameter_tables(cells: list[dict], tables: Tables) -> list[str]:
    """Per method, each cell's chosen hyperparameters (from the cell's ``params_json``)."""
    import json

    lines: list[str] = []
    for method in _ordered(c["method"] for c in cells):
        mc = [c for c in cells if c["method"] == method and c.get("params_json")]
        params = [json.loads(c["params_json"]) for c in mc]
        names = sorted({k for p in params for k in p})
        if not names:
            continue
        rows = [[c["cell_id"], *(_fmt_param(p.get(n)) for n in names)] for c, p in zip(mc, params)]
        lines += [f"#### {method}", ""] + tables.add(f"hyperparameters_{method}", ["cell", *names], rows)
    return (
        (
            [
                "## Chosen hyperparameters",
                "",
                "Per cell, the values its final runs used (searched by Optuna on "
                "the validation split, or fixed by the spec).",
                "",
            ]
            + lines
        )
        if lines
        else []
    )


def _fmt_param(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_markdown(
    cells: list[dict],
    title: str = "promptsweep results",
    targets: Optional[list[str]] = None,
    tables: Optional[Tables] = None,
    provenance: Optional[list[str]] = None,
    marks: Optional[Marks] = None,
    baselines: Optional[dict[str, str]] = None,
) -> str:
    """The result tables (``marks``: the ↑ / ↓ of entries that differ from their protocol's baseline, named
    in ``baselines``) and the chosen hyperparameters."""
    tables = tables if tables is not None else Tables()
    lines = [
        f"# {title}",
        "",
        *(provenance or []),
        "Accuracy in %, mean ± std over the final seeds (n per cell in cells.arrow); the best of each row in bold.",
        "",
    ]
    if baselines:
        named = (
            next(iter(baselines.values()))
            if len(set(baselines.values())) == 1
            else ", ".join(f"{m} ({p})" for p, m in baselines.items())
        )
        lines += [
            f"↑ / ↓: better / worse than the baseline, {named}: the 95 % interval of the paired difference "
            "excludes 0 (see the paired comparison below).",
            "",
        ]
    for protocol in _ordered(c["protocol"] for c in cells):
        pc = [c for c in cells if c["protocol"] == protocol]
        lines += [f"## {protocol}", ""]
        if protocol in TRANSFER_PROTOCOLS:
            lines += _transfer_table(pc, targets or [], tables, protocol, marks)
            continue
        for shots in sorted({c["shots"] for c in pc}):
            sc = [c for c in pc if c["shots"] == shots]
            lines += [f"### {shots}-shot", ""]
            if protocol == "base2novel":
                lines += _metric_table(sc, "base_acc", "Base", tables, f"{protocol}_{shots}shot_base", marks)
                lines += _metric_table(sc, "novel_acc", "Novel", tables, f"{protocol}_{shots}shot_novel", marks)
                lines += _metric_table(
                    sc,
                    "hm",
                    "HM (Average = HM of the averaged Base and Novel)",
                    tables,
                    f"{protocol}_{shots}shot_hm",
                    marks,
                )
            else:
                lines += _metric_table(sc, "test_acc", "Test accuracy", tables, f"{protocol}_{shots}shot", marks)
    lines += _hyperparameter_tables(cells, tables)
    return "\n".join(lines)


def provenance_lines(cells_path: Path, cells: list[dict]) -> list[str]:
    """Where the numbers come from: sweep, backbone, git commit, spec hash, date, package versions
    (from cells.arrow's schema metadata and columns)."""
    from datetime import datetime, timezone

    versions = _schema_meta(cells_path, "package_versions", {})
    backbones = ", ".join(b for b in _ordered(c.get("backbone") for c in cells) if b) or "—"
    rows = [
        ["sweep", _schema_meta(cells_path, "sweep", None) or (cells[0].get("sweep") if cells else None) or "—"],
        ["backbone", backbones],
        ["git commit", _schema_meta(cells_path, "git_commit", None) or "—"],
        ["spec hash", _schema_meta(cells_path, "spec_hash", None) or "—"],
        ["report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
        ["packages", ", ".join(f"{k} {v}" for k, v in versions.items()) or "—"],
    ]
    return _table(["", ""], rows)


#: print-ready figures: 300 dpi PNG for the report and a vector PDF beside each
PLOT_DPI = 300
_STYLES = [
    ("o", "-"),
    ("s", "--"),
    ("^", "-."),
    ("D", ":"),
    ("v", "-"),
    ("P", "--"),
    ("X", "-."),
    ("*", ":"),
    ("<", "-"),
    (">", "--"),
]


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (PNG, ``PLOT_DPI``) and its PDF twin, each atomically, and close it."""
    from fewshot.paths import atomic_open

    fig.tight_layout()
    for target, fmt in ((path, "png"), (path.with_suffix(".pdf"), "pdf")):
        with atomic_open(target, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=PLOT_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_fewshot_curves(cells: list[dict], path: Path) -> Optional[Path]:
    """Test accuracy vs shots: one panel per dataset plus the Average (shared y-axis), mean over seeds with a
    ± std band (dataset panels; the Average has no per-seed spread to show), a marker and line style per
    method, the legend outside the panels."""
    fs = [c for c in cells if c["protocol"] == "fewshot" and c.get("test_acc_mean") is not None]
    if not fs:
        return None
    plt = _pyplot()

    datasets = _ordered(c["dataset"] for c in fs)
    methods = _ordered(c["method"] for c in fs)
    shots = sorted({c["shots"] for c in fs})
    panels = datasets + ["Average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], panels):
        for i, m in enumerate(methods):
            marker, style = _STYLES[i % len(_STYLES)]
            ys, sd = [], []
            for k in shots:
                k_cells = [c for c in fs if c["shots"] == k]
                if d == "Average":
                    ys.append(average_row(k_cells, [m], datasets, "test_acc")[m])
                    sd.append(None)
                else:
                    c = next((c for c in k_cells if c["method"] == m and c["dataset"] == d), {})
                    ys.append(c.get("test_acc_mean"))
                    sd.append(c.get("test_acc_std"))
            y = [float("nan") if v is None else v for v in ys]
            (line,) = ax.plot(shots, y, marker=marker, linestyle=style, markersize=4, label=m)
            if any(s for s in sd):
                lo = [float("nan") if v is None or s is None else v - s for v, s in zip(ys, sd)]
                hi = [float("nan") if v is None or s is None else v + s for v, s in zip(ys, sd)]
                ax.fill_between(shots, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(d)
        ax.set_xlabel("shots per class")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle("Few-shot test accuracy (mean ± std over seeds)", fontsize=10)
    return _save(fig, path)


def plot_base2novel(cells: list[dict], out_dir: Path) -> list[Path]:
    bn = [c for c in cells if c["protocol"] == "base2novel" and c.get("base_acc_mean") is not None]
    if not bn:
        return []
    plt = _pyplot()

    paths = []
    for shots in sorted({c["shots"] for c in bn}):
        sc = [c for c in bn if c["shots"] == shots]
        methods, datasets = _ordered(c["method"] for c in sc), _ordered(c["dataset"] for c in sc)
        vals = {k: average_row(sc, methods, datasets, k) for k in ("base_acc", "novel_acc", "hm")}
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(methods), 3))
        w = 0.27
        for i, (k, label) in enumerate((("base_acc", "Base"), ("novel_acc", "Novel"), ("hm", "HM"))):
            ax.bar(
                [j + (i - 1) * w for j in range(len(methods))],
                [vals[k][m] or 0 for m in methods],
                w,
                label=label,
                hatch=("", "//", "..")[i],
                edgecolor="black",
                linewidth=0.5,
            )
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Base-to-novel, {shots}-shot: average over {len(datasets)} dataset(s)", fontsize=10)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        paths.append(_save(fig, out_dir / f"base2novel_{shots}shot.png"))
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
        lines += [
            f"{len(failed)} trial(s) failed, or lost a transfer target (error class target_failed: its other "
            "targets are kept; see the status / error_class / error_message columns of trials.arrow):",
            "",
        ]
        rows = [
            [
                t["cell_id"],
                t["stage"],
                str(t["seed"]),
                t["error_class"] or "—",
                " ".join((t["error_message"] or "").split())[:160].replace("|", "/"),
            ]
            for t in failed
        ]
        lines += _table(["cell", "stage", "seed", "error class", "message"], rows)
    if short_ids:
        by_id = {c["cell_id"]: c for c in cells}
        rows = []
        for cid in short_ids:
            c = by_id.get(cid, {"n": 0, "n_failed": 0})
            want = planned.get(cid)
            rows.append([cid, f"{c['n']}/{want}" if want is not None else str(c["n"]), str(c["n_failed"])])
        lines += [
            f"{len(short_ids)} cell(s) incomplete (their table entries average fewer seeds, or are missing). "
            "An interrupted sweep continues when the same command is rerun; failed trials need their cause "
            "fixed (error class above) and a rerun with --retry-failed:",
            "",
        ]
        lines += _table(["cell", "final runs ok / planned", "final runs failed"], rows)
    return "\n".join(lines)


def render_notes(trials: list[dict]) -> str:
    """What the methods recorded about their runs (``run_notes``), once per cell and note, with its seeds."""
    import json

    seen: dict[tuple[str, str, str], list[str]] = {}
    for t in trials:
        try:
            notes = json.loads(t.get("run_notes") or "{}")
        except ValueError:
            continue
        for key, text in sorted(notes.items()):
            seen.setdefault((t["cell_id"], key, str(text)), []).append(f"{t['stage']} {t['seed']}")
    if not seen:
        return ""
    rows = [
        [cid, key, " ".join(text.split())[:200].replace("|", "/"), ", ".join(sorted(set(runs)))]
        for (cid, key, text), runs in sorted(seen.items())
    ]
    return "\n".join(
        [
            "## Run notes",
            "",
            "What the methods recorded about their runs (`run_notes` in trials.arrow, "
            "`note.*` tags of the MLflow trial runs):",
            "",
            *_table(["cell", "note", "value", "trials"], rows),
        ]
    )


def _schema_meta(cells_path: Path, key: str, default):
    """One JSON value of cells.arrow's schema metadata (``default`` when absent)."""
    value = read_meta(cells_path).get(key)
    return default if value in (None, "") else value


def _rows(path: Path) -> list[dict]:
    """The rows of a results table, none when the file is absent (results written before it existed)."""
    return read_table(path).to_pylist() if path.is_file() else []


def _planned_final_runs(cells_path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in _schema_meta(cells_path, "planned_final_runs", {}).items()}


def backbones_side_by_side(cells: list[dict], trials: list[dict], comparisons: list[dict]) -> tuple[list, list, list]:
    """With more than one backbone, every row's ``method`` reads ``<backbone> · <method>`` (and a comparison's
    ``baseline`` too), so each table, plot and section shows a column, curve or line per backbone and method —
    the backbones side by side, grouped in the spec's order — instead of mixing their numbers. One backbone:
    the rows as they are."""
    if len({c.get("backbone") for c in cells}) < 2:
        return cells, trials, comparisons

    def relabel(row: dict, *keys: str) -> dict:
        return dict(row, **{k: f"{row.get('backbone')} · {row[k]}" for k in keys if row.get(k) is not None})

    return (
        [relabel(c, "method") for c in cells],
        [relabel(t, "method") for t in trials],
        [relabel(r, "method", "baseline") for r in comparisons],
    )


def write_report(results_dir: Path) -> Path:
    """Regenerate report.md and the plots in ``results_dir`` from its cells.arrow (and trials.arrow)."""
    results_dir = Path(results_dir)
    cells_path = results_dir / CELLS_FILE
    if not cells_path.is_file():
        raise UserError(f"{cells_path} does not exist (pass the sweep's results directory, e.g. results/demo)")
    from orchestrator import report_cost, report_search, report_stats
    from orchestrator.importance import cell_importances
    from orchestrator.sweep import OPTUNA_FILE

    cells = read_table(cells_path).to_pylist()
    sweep = _schema_meta(cells_path, "sweep", None) or results_dir.name
    settings = report_settings(read_meta(cells_path))
    trials, comparisons = (_rows(results_dir / name) for name in (TRIALS_FILE, COMPARISONS_FILE))
    cells, trials, comparisons = backbones_side_by_side(cells, trials, comparisons)
    baselines = {p: b for p in _ordered(c["protocol"] for c in cells) if (b := settings.baseline_for(p))}
    tables = Tables()
    md = render_markdown(
        cells,
        title=f"promptsweep results: {sweep}",
        targets=_schema_meta(cells_path, "targets", []),
        tables=tables,
        provenance=provenance_lines(cells_path, cells),
        marks=report_stats.marks(comparisons),
        baselines=baselines,
    )
    no_baseline = (
        "No baseline is named: add `report: {baseline: <method>}` to the spec (or one per protocol, "
        "`{fewshot: coop, base2novel: zeroshot}`) and rerun the same command: only the tables and this "
        "report are rewritten."
    )
    importances = cell_importances(results_dir / OPTUNA_FILE, cells)
    sections = [
        report_stats.comparisons_section(comparisons, no_baseline, tables),
        report_stats.unstable_section(cells, trials, settings.unstable, tables),
        report_cost.cost_section(cells, trials, tables),
        report_search.search_section(importances, tables),
        report_stats.statistics_section(cells, tables),
    ]
    md += "\n" + "\n".join(line for section in sections for line in section)
    notes = render_notes(trials)
    if notes:
        md += "\n" + notes + "\n"
    ledger = render_failures(trials, cells, _planned_final_runs(cells_path))
    if ledger:
        md += "\n" + ledger
    plots = []
    p = plot_fewshot_curves(cells, results_dir / "fewshot_curves.png")
    if p:
        plots.append(p)
    plots += plot_base2novel(cells, results_dir)
    plots += report_cost.plot_cost(cells, results_dir)
    p = report_search.plot_importances(importances, results_dir / "importances.png")
    if p:
        plots.append(p)
    if plots:
        md += (
            "\n## Plots\n\n"
            + "\n".join(f"![{q.stem}]({q.name})" for q in plots)
            + "\n\nEach plot is also a PDF beside it (same name).\n"
        )
    tables.write_latex(results_dir / TABLES_DIR)
    md += f"\nEvery table above is also LaTeX (booktabs) in `{TABLES_DIR}/`.\n"
    out = results_dir / REPORT_FILE
    _write_text(out, md)
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
