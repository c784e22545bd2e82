"""What mattered in the search: hyperparameter importances of each cell's Optuna study, and their summary
per method.

Each cell that searched has a study named by its cell id in the sweep's journal (``optuna.journal``). Its
importances come from ``optuna.importance.get_param_importances`` with the fANOVA evaluator (a random forest
fitted to the completed trials, ``seed=0`` so the same study gives the same numbers); they sum to 1 over
the parameters sampled in every completed trial (a conditional parameter that some trials lack is left
out, as Optuna does). A study is not evaluated, and ``note`` says why, when it has fewer than
``MIN_TRIALS`` completed trials (a forest on a handful of points measures noise), when all its completed
trials scored the same (nothing to attribute), or when it searched one parameter (it explains everything
by definition: importance 1). Per method, ``summarize`` averages each parameter's importance over the
cells where it was evaluated and lists the best value (the study's best trial) of each cell, so a reader
sees whether one setting serves every dataset.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

MIN_TRIALS = 5


@dataclass
class CellImportance:
    """One cell's study: its completed trials, importances (empty when ``note`` says why) and best parameters."""

    cell: dict  # the cells.arrow row
    completed: int = 0
    importances: dict[str, float] = field(default_factory=dict)
    best_params: dict[str, Any] = field(default_factory=dict)
    note: Optional[str] = None


@dataclass
class ParamSummary:
    """One parameter of one method over the cells that searched it."""

    importance_mean: Optional[float]
    importance_min: Optional[float]
    importance_max: Optional[float]
    evaluated: int  # cells whose importances were computed
    best: list[tuple[dict, Any]]  # (cell row, best value) for every cell whose study has a best trial


def _evaluate(study) -> CellImportance:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    out = CellImportance(cell={}, completed=len(done))
    if done:
        out.best_params = dict(study.best_trial.params)
    searched = sorted({p for t in done for p in t.params})
    if len(done) < MIN_TRIALS:
        out.note = f"{len(done)} completed trial(s), fewer than {MIN_TRIALS}: not evaluated"
    elif len(searched) == 1:
        out.importances, out.note = {searched[0]: 1.0}, "one searched parameter: importance 1 by definition"
    elif len({t.value for t in done}) == 1:
        out.note = "every completed trial scored the same: nothing to attribute"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
            out.importances = {k: float(v) for k, v in raw.items()}
        except Exception as exc:  # noqa: BLE001 - the report says why, the rest of it is written
            out.note = f"not evaluated ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return out


def cell_importances(journal: Path, cells: list[dict]) -> list[CellImportance]:
    """One entry per cell of ``cells`` (cells.arrow rows) that ran search trials, read from ``journal``."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    searched = [c for c in cells if c.get("search_trials")]
    if not searched or not Path(journal).is_file():
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    out = []
    for c in searched:
        try:
            study = optuna.load_study(study_name=c["cell_id"], storage=storage)
        except KeyError:
            out.append(CellImportance(cell=c, note="no study of this cell in the journal"))
            continue
        result = _evaluate(study)
        result.cell = c
        out.append(result)
    return out


def summarize(results: list[CellImportance]) -> dict[str, dict[str, ParamSummary]]:
    """``{method: {parameter: ParamSummary}}``, parameters by decreasing mean importance (never evaluated last)."""
    out: dict[str, dict[str, ParamSummary]] = {}
    for method in dict.fromkeys(r.cell["method"] for r in results):
        mine = [r for r in results if r.cell["method"] == method]
        names = sorted({p for r in mine for p in (*r.best_params, *r.importances)})
        params = {}
        for p in names:
            imp = [r.importances[p] for r in mine if p in r.importances]
            params[p] = ParamSummary(
                statistics.fmean(imp) if imp else None,
                min(imp, default=None),
                max(imp, default=None),
                len(imp),
                [(r.cell, r.best_params[p]) for r in mine if p in r.best_params],
            )
        out[method] = dict(
            sorted(
                params.items(), key=lambda kv: -(kv[1].importance_mean if kv[1].importance_mean is not None else -1.0)
            )
        )
    return out
