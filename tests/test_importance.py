"""What mattered in the search: importances from a real small search (the sweep's CellSearcher writing its
Optuna journal, a known objective instead of training), the studies that cannot be evaluated, and the report."""

from __future__ import annotations

import math

import pytest
from ray.tune.search import Searcher

from orchestrator import report as Rep
from orchestrator import results as R
from orchestrator.importance import MIN_TRIALS, cell_importances, summarize
from orchestrator.planner import plan
from orchestrator.searcher import CellSearcher
from orchestrator.spec import parse_spec

LR = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
N_CTX = {"type": "int", "low": 2, "high": 8}
BEST_LOG_LR = {"digits": -2.0, "shapes": -3.0}  # each dataset's best learning rate: 1e-2 and 1e-3


def _search(method: str, n_trials: int, space: dict) -> dict:
    return {"n_trials": n_trials, "seeds": [1], "space": space, "sampler": {"name": "random", "seed": 0}}


def _objective(cfg) -> float:
    """Validation accuracy: the learning rate matters (a peak per dataset), n_ctx barely; cocoop scores 50 always."""
    if cfg["request"]["method"] == "cocoop":
        return 50.0
    p = cfg["params"]
    return 80 - 10 * abs(math.log10(p["lr"]) - BEST_LOG_LR[cfg["request"]["dataset"]]) + 0.01 * p.get("n_ctx", 0)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """coop: lr + n_ctx, 12 proposals; kgcoop: lr only; maple: 3 proposals (too few); cocoop: a flat objective."""
    out = tmp_path_factory.mktemp("searched")
    spec = parse_spec(
        {
            "name": "t",
            "methods": ["coop", "kgcoop", "maple", "cocoop"],
            "datasets": ["digits", "shapes"],
            "shots": [2],
            "seeds": [1],
            "search": {
                "coop": _search("coop", 12, {"lr": LR, "n_ctx": N_CTX}),
                "kgcoop": _search("kgcoop", 6, {"lr": LR}),
                "maple": _search("maple", MIN_TRIALS - 2, {"lr": LR, "n_ctx": N_CTX}),
                "cocoop": _search("cocoop", 6, {"lr": LR, "n_ctx": N_CTX}),
            },
        }
    )
    p = plan(spec)
    searcher = CellSearcher(p.cells, {"backbone": {"arch": "promptsweep-tiny"}}, str(out / "optuna.journal"))
    rows, i = [], 0
    while (cfg := searcher.suggest(f"t{i}")) is not Searcher.FINISHED:
        result = {"val_acc": _objective(cfg), "test_acc": 60.0 if cfg["stage"] == "final" else None}
        searcher.on_trial_complete(f"t{i}", result)
        rows.append(R.trial_row(cfg, result, status="FINISHED", tune_trial_id=f"t{i}"))
        i += 1
    R.write_results(out, rows, {"sweep": "t"}, [c.cell_id for c in p.cells])
    cells = R.read_table(out / R.CELLS_FILE).to_pylist()
    return out, cells, {r.cell["cell_id"]: r for r in cell_importances(out / "optuna.journal", cells)}


def test_importances_find_the_parameter_that_matters(searched):
    _, _, by_cell = searched
    for ds in ("digits", "shapes"):
        coop = by_cell[f"fewshot.coop.{ds}.2shot"]
        assert coop.completed == 12 and coop.note is None
        assert set(coop.importances) == {"lr", "n_ctx"} and sum(coop.importances.values()) == pytest.approx(1.0)
        assert coop.importances["lr"] > 0.5 > coop.importances["n_ctx"]
        best = math.log10(coop.best_params["lr"])  # the best trial's lr lies nearer this dataset's own peak
        other = BEST_LOG_LR["shapes" if ds == "digits" else "digits"]
        assert abs(best - BEST_LOG_LR[ds]) < abs(best - other)
    summary = summarize(list(by_cell.values()))["coop"]
    assert list(summary) == ["lr", "n_ctx"] and summary["lr"].evaluated == 2
    assert summary["lr"].importance_mean == pytest.approx(
        (
            by_cell["fewshot.coop.digits.2shot"].importances["lr"]
            + by_cell["fewshot.coop.shapes.2shot"].importances["lr"]
        )
        / 2
    )


def test_studies_that_cannot_be_evaluated_say_why(searched):
    out, cells, by_cell = searched
    kg = by_cell["fewshot.kgcoop.digits.2shot"]
    assert kg.importances == {"lr": 1.0} and "one searched parameter" in kg.note
    maple = by_cell["fewshot.maple.digits.2shot"]
    assert maple.completed == MIN_TRIALS - 2 and maple.importances == {} and f"fewer than {MIN_TRIALS}" in maple.note
    assert maple.best_params  # still has a best trial to show
    flat = by_cell["fewshot.cocoop.digits.2shot"]
    assert flat.importances == {} and "scored the same" in flat.note
    assert cell_importances(out / "absent.journal", cells) == []
    renamed = [dict(c, cell_id="fewshot.coop.elsewhere.2shot") if c["method"] == "coop" else c for c in cells]
    missing = {r.cell["cell_id"]: r for r in cell_importances(out / "optuna.journal", renamed)}
    assert missing["fewshot.coop.elsewhere.2shot"].note == "no study of this cell in the journal"


def test_the_report_shows_what_mattered(searched):
    out, _, by_cell = searched
    md = Rep.write_report(out).read_text()
    section = md[md.index("## What mattered in the search") : md.index("## Statistics over the seeds")]
    mean_lr = summarize(list(by_cell.values()))["coop"]["lr"].importance_mean
    assert f"| lr | {mean_lr:.2f} |" in section and "| 2 of 2 |" in section
    assert "| dataset | lr | n_ctx |" in section  # the best value of each parameter per dataset
    assert "- fewshot.maple.digits.2shot: 3 completed trial(s), fewer than 5: not evaluated" in section
    assert "scored the same" in section and "one searched parameter" in section
    assert (out / "importances.png").stat().st_size > 1000 and "![importances](importances.png)" in md
    assert (out / "tables" / "importance_coop.tex").is_file()
