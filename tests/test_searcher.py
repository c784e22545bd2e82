"""CellSearcher driven by a fake objective, without Ray: round-robin, stages, best selection, pruning, and a new
driver's searcher rebuilt from the rows, the Optuna journal and the trials Tune restores (nothing saved)."""

from __future__ import annotations

import optuna
from ray.tune.search import Searcher

from orchestrator.planner import plan
from orchestrator.searcher import CellSearcher
from orchestrator.spec import parse_spec

SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "csc": {"type": "categorical", "choices": [False, True]},
    "n_ctx": {"type": "int", "low": 1, "high": 8, "when": {"csc": [True]}},
}


def _searcher(
    tmp_path,
    n_trials=4,
    search_seeds=(1, 2),
    final_seeds=(1, 2, 3),
    defaults=None,
    pruner="none",
    methods=("zeroshot", "coop"),
):
    spec = parse_spec(
        {
            "name": "t",
            "methods": list(methods),
            "datasets": ["digits", "shapes"],
            "shots": [2],
            "seeds": list(final_seeds),
            "train": {"methods": {"coop": defaults or {}}},
            "search": {
                "coop": {
                    "n_trials": n_trials,
                    "seeds": list(search_seeds),
                    "space": SPACE,
                    "sampler": {"name": "tpe", "n_startup_trials": 2},
                    "pruner": {"name": pruner, "n_startup_trials": 1, "n_warmup_steps": 0},
                }
            },
        }
    )
    p = plan(spec)
    return p, CellSearcher(p.cells, {"backbone": {"arch": "promptsweep-tiny"}}, str(tmp_path / "optuna.journal"))


def objective(cfg):
    """Higher lr is better; seed adds a small offset so the mean over seeds matters."""
    return 50 + 10 * cfg["params"].get("lr", 0.0) + cfg["seed"]


def drain(s, max_steps=1000):
    """Run the searcher to completion: suggest everything possible, complete oldest first."""
    emitted, running, i = [], [], 0
    while i < max_steps:
        i += 1
        cfg = s.suggest(f"t{i}")
        if cfg is Searcher.FINISHED and not running:
            break
        if isinstance(cfg, dict):
            emitted.append(cfg)
            running.append((f"t{i}", cfg))
            continue
        tid, c = running.pop(0)
        s.on_trial_complete(tid, {"val_acc": objective(c)})
    return emitted


def run_one_at_a_time(s, outcome) -> dict[str, dict]:
    """Suggest until finished, completing each trial at once with ``outcome(cfg) = (result, errored)``."""
    emitted, i = {}, 0
    while True:
        i += 1
        cfg = s.suggest(f"t{i}")
        if cfg is Searcher.FINISHED:
            return emitted
        assert cfg is not None
        emitted[f"t{i}"] = cfg
        result, error = outcome(cfg)
        s.on_trial_complete(f"t{i}", result, error=error)


def test_counts_stages_and_round_robin(tmp_path):
    p, s = _searcher(tmp_path)
    emitted = drain(s)
    assert len(emitted) == p.n_trials == 2 * (4 * 2) + 4 * 3
    # first suggestions rotate over cells instead of exhausting one
    assert len({c["cell_id"] for c in emitted[:4]}) == 4
    for cell in p.cells:
        rows = [c for c in emitted if c["cell_id"] == cell.cell_id]
        search = [c for c in rows if c["stage"] == "search"]
        final = [c for c in rows if c["stage"] == "final"]
        assert len(search) == cell.n_search_runs and sorted(c["seed"] for c in final) == [1, 2, 3]
        # the final stage of a cell is emitted only after all its search trials
        if search:
            assert max(emitted.index(c) for c in search) < min(emitted.index(c) for c in final)
        assert all(c["request"]["stage"] == c["stage"] and c["request"]["seed"] == c["seed"] for c in rows)


def test_final_stage_uses_best_mean_and_optuna_values(tmp_path):
    p, s = _searcher(tmp_path)
    emitted = drain(s)
    cell = p.cell("fewshot.coop.digits.2shot")
    study = s.study(cell)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    for t in done:  # the Optuna value is the mean over search seeds 1 and 2
        assert abs(t.value - (50 + 10 * t.params["lr"] + 1.5)) < 1e-9
    best = max(done, key=lambda t: t.value)
    finals = [c for c in emitted if c["cell_id"] == cell.cell_id and c["stage"] == "final"]
    assert all(c["params"] == best.params and c["optuna_number"] == best.number for c in finals)
    assert all(c["request"]["overrides"]["lr"] == best.params["lr"] for c in finals)
    # conditional parameter only present when its parent allows it
    for t in study.trials:
        assert ("n_ctx" in t.params) == bool(t.params["csc"])


def test_defaults_are_the_first_proposal_and_empty_space_uses_defaults(tmp_path):
    p, s = _searcher(tmp_path, defaults={"lr": 0.002, "csc": False})
    emitted = drain(s)
    first = next(c for c in emitted if c["cell_id"] == "fewshot.coop.digits.2shot")
    assert first["params"]["lr"] == 0.002 and first["optuna_number"] == 0
    zs = [c for c in emitted if c["cell_id"] == "fewshot.zeroshot.digits.2shot"]
    assert [c["stage"] for c in zs] == ["final"] * 3 and all(c["params"] == {} for c in zs)


def test_failed_seed_fails_the_proposal_and_is_never_best(tmp_path):
    p, s = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1,))
    errored = lambda cfg: cfg["stage"] == "search" and cfg["optuna_number"] == 0  # noqa: E731
    cells = run_one_at_a_time(
        s,
        lambda cfg: (
            ({"val_acc": 99.0}, True)
            if errored(cfg)  # best-looking, but errored
            else ({"val_acc": objective(cfg)}, False)
        ),
    )
    cell = p.cell("fewshot.coop.digits.2shot")
    states = {t.number: t.state for t in s.study(cell).trials}
    assert states[0] == optuna.trial.TrialState.FAIL and states[1] == optuna.trial.TrialState.COMPLETE
    final = [c for c in cells.values() if c["cell_id"] == cell.cell_id and c["stage"] == "final"]
    assert final[0]["optuna_number"] == 1


def test_waits_instead_of_finishing_while_search_results_are_pending(tmp_path):
    p, s = _searcher(tmp_path, n_trials=1, search_seeds=(1,), final_seeds=(1,))
    got = [s.suggest(f"t{i}") for i in range(6)]
    # 2 coop search trials + 2 zeroshot finals, then None (waiting on coop), not FINISHED
    assert sum(isinstance(g, dict) for g in got) == 4 and got[-1] is None


def test_a_new_driver_continues_from_rows_journal_and_restored_trials_without_duplicates(tmp_path):
    p, s = _searcher(tmp_path)
    first = [s.suggest(f"a{i}") for i in range(5)]
    for i, c in enumerate(first[:3]):
        s.on_trial_complete(f"a{i}", {"val_acc": objective(c)})
    _, s2 = _searcher(tmp_path)  # the next driver: nothing of s is kept but the journal
    s2.set_ledger([_row(f"a{i}", c) for i, c in enumerate(first[:3])])  # trials.arrow of the first driver
    for i in (3, 4):
        s2.adopt(f"a{i}", first[i])  # Tune restores the two unfinished trials
    for i, c in enumerate(first[3:], start=3):
        s2.on_trial_complete(f"a{i}", {"val_acc": objective(c)})
    rest = drain(s2)
    assert len(first) + len(rest) == p.n_trials
    work = [(c["cell_id"], c["stage"], c["seed"], c["optuna_number"]) for c in first + rest]
    assert len(set(work)) == len(work)  # nothing emitted twice
    cell = p.cell("fewshot.coop.digits.2shot")
    trials = s2.study(cell).trials
    assert len(trials) == 4  # the proposals the journal held were taken up, no extra one asked
    assert len({t.params["lr"] for t in trials}) == 4  # the reopened sampler does not replay earlier draws


def test_the_searcher_is_never_saved_or_restored_by_tune(tmp_path):
    """Tune's copy of the searcher would be stale after a kill (and say finished for a grown sweep): Tune keeps
    only its wrapper's state, and a restored wrapper is not finished."""
    from orchestrator.searcher import SweepSearch

    _, s = _searcher(tmp_path)
    first = s.suggest("a0")
    wrapped = SweepSearch(s)
    wrapped.set_finished()
    wrapped.save_to_dir(str(tmp_path), "x")
    assert [p.name for p in tmp_path.iterdir() if p.name != "optuna.journal"] == ["search_gen_state-x.json"]
    _, fresh = _searcher(tmp_path)
    again = SweepSearch(fresh)
    again.restore_from_dir(str(tmp_path))
    assert not again.is_finished() and fresh.trials == {}  # nothing of s came back
    assert again.searcher.suggest("b0")["optuna_number"] == first["optuna_number"]  # taken up from the journal


def test_median_pruner_compares_only_within_a_cell(tmp_path):
    p, s = _searcher(tmp_path, n_trials=3, search_seeds=(1,), final_seeds=(1,), pruner="median", methods=("coop",))
    a = s.suggest("a")  # coop digits proposal 0
    assert a["cell_id"] == "fewshot.coop.digits.2shot"
    for ep in range(3):
        assert not s.should_prune("a", {"epoch": ep, "val_acc": 90.0})
    s.on_trial_complete("a", {"val_acc": 90.0})
    b = s.suggest("b")  # other cell (coop shapes): its first trial has nothing to compare with
    assert b["cell_id"] == "fewshot.coop.shapes.2shot"
    assert not s.should_prune("b", {"epoch": 0, "val_acc": 1.0})
    c = s.suggest("c")  # coop digits proposal 1: far below proposal 0 in its own cell -> pruned
    assert c["cell_id"] == "fewshot.coop.digits.2shot"
    assert s.should_prune("c", {"epoch": 1, "val_acc": 1.0})
    s.on_trial_complete("c", {"val_acc": 1.0})
    states = {t.number: t.state for t in s.study(p.cell(c["cell_id"])).trials}
    assert states[c["optuna_number"]] == optuna.trial.TrialState.PRUNED


def _row(tid, cfg, status="FINISHED"):
    """The fields of a ``trials.arrow`` row the searcher reads."""
    return {
        "tune_trial_id": tid,
        "cell_id": cfg["cell_id"],
        "stage": cfg["stage"],
        "seed": cfg["seed"],
        "optuna_trial_number": cfg["optuna_number"],
        "status": status,
        "val_acc": objective(cfg),
    }


def _run_all_but(s, lost_if):
    """Drain ``s``; the trials ``lost_if(cfg)`` picks never report (their driver died); returns (rows, lost)."""
    rows, lost, i = [], [], 0
    while True:
        i += 1
        cfg = s.suggest(f"t{i}")
        if cfg is Searcher.FINISHED or cfg is None:
            break
        if lost_if(cfg) and not lost:
            lost.append((f"t{i}", cfg))
            continue
        s.on_trial_complete(f"t{i}", {"val_acc": objective(cfg)})
        rows.append(_row(f"t{i}", cfg))
    return rows, lost


def _restored(tmp_path, s, rows, live=()):
    """The next driver's searcher: the rows on file and the trials Tune restores (``live``: (id, config))."""
    p, s2 = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1, 2))
    s2.set_ledger(rows)
    for tid, cfg in live:
        s2.adopt(tid, cfg)
    return p, s2


def test_work_without_a_row_or_a_restored_trial_runs_again(tmp_path):
    # a final trial was emitted by the killed driver but never ran (Tune's snapshot did not hold it)
    p, s = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1, 2))
    rows, lost = _run_all_but(s, lambda c: c["stage"] == "final" and c["cell_id"].startswith("fewshot.coop"))
    _, s2 = _restored(tmp_path, s, rows)
    again = s2.suggest("r1")
    assert isinstance(again, dict)
    assert {k: again[k] for k in ("cell_id", "stage", "seed")} == {
        k: lost[0][1][k] for k in ("cell_id", "stage", "seed")
    }
    assert again["params"] == lost[0][1]["params"]
    assert s2.suggest("r2") is None  # nothing else to emit: it waits for r1
    s2.on_trial_complete("r1", {"val_acc": objective(again)})
    assert s2.suggest("r3") is Searcher.FINISHED


def test_a_search_trial_without_a_row_runs_again(tmp_path):
    p, s = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1, 2))
    rows, _ = _run_all_but(s, lambda c: False)
    assert len(rows) == p.n_trials
    gone = next(r for r in rows if r["stage"] == "search" and r["optuna_trial_number"] == 1)
    _, s2 = _restored(tmp_path, s, [r for r in rows if r is not gone])
    again = s2.suggest("r1")
    assert (again["cell_id"], again["stage"], again["seed"], again["optuna_number"]) == (
        gone["cell_id"],
        "search",
        gone["seed"],
        1,
    )
    s2.on_trial_complete("r1", {"val_acc": objective(again)})
    assert s2.suggest("r2") is Searcher.FINISHED
    assert len(s2.study(p.cell(gone["cell_id"])).trials) == 2  # no new proposal was asked


def test_a_new_driver_with_every_row_or_a_restored_trial_reruns_nothing(tmp_path):
    p, s = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1, 2))
    rows, lost = _run_all_but(s, lambda c: c["stage"] == "final")
    # the unreported trial is either restored by Tune to run again, or finished with its row on file
    _, s2 = _restored(tmp_path, s, rows, live=[lost[0]])
    assert s2.suggest("r1") is None  # waits for the restored trial
    s2.on_trial_complete(lost[0][0], {"val_acc": 1.0})
    assert s2.suggest("r2") is Searcher.FINISHED
    _, s3 = _restored(tmp_path, s, rows + [_row(*lost[0])])
    assert s3.suggest("r1") is Searcher.FINISHED


def test_retry_failed_runs_failed_work_again_naming_the_failed_trial(tmp_path):
    p, s = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1, 2))
    rows, _ = _run_all_but(s, lambda c: False)
    failed = next(r for r in rows if r["stage"] == "final" and r["cell_id"].startswith("fewshot.coop"))
    failed.update(status="ERROR", val_acc=None, mlflow_run_id="run-x", error_class="nan_loss")
    _, plain = _restored(tmp_path, s, rows)
    assert plain.suggest("r1") is Searcher.FINISHED  # a failed row stands unless asked
    _, s2 = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1, 2))
    s2.set_ledger(rows, retry_failed=True)
    again = s2.suggest("r1")
    assert (again["cell_id"], again["stage"], again["seed"]) == (failed["cell_id"], "final", failed["seed"])
    assert again["retry_of"] == {"tune_trial_id": failed["tune_trial_id"], "mlflow_run_id": "run-x"}
    best = next(r for r in rows if r["cell_id"] == failed["cell_id"] and r["stage"] == "final" and r is not failed)
    assert again["optuna_number"] == best["optuna_trial_number"]  # the proposal the cell's finals ran with
    s2.on_trial_complete("r1", {"val_acc": 1.0})
    assert s2.suggest("r2") is Searcher.FINISHED


def test_a_grown_plan_emits_only_the_new_work(tmp_path):
    """More final seeds, another dataset: the rows of the first plan are counted, the finals keep their proposal."""
    p, s = _searcher(tmp_path, n_trials=2, search_seeds=(1,), final_seeds=(1, 2))
    rows, _ = _run_all_but(s, lambda c: False)
    spec = parse_spec(
        {
            "name": "t",
            "methods": ["zeroshot", "coop"],
            "datasets": ["digits", "shapes", "shapes-16"],
            "shots": [2],
            "seeds": [1, 2, 3],
            "search": {
                "coop": {"n_trials": 2, "seeds": [1], "space": SPACE, "sampler": {"name": "tpe", "n_startup_trials": 2}}
            },
        }
    )
    grown = plan(spec)
    s2 = CellSearcher(grown.cells, {"backbone": {"arch": "promptsweep-tiny"}}, str(tmp_path / "optuna.journal"))
    s2.set_ledger(rows)
    new = drain(s2)
    assert len(new) == grown.n_trials - len(rows) == 4 + 3 + 5  # seed 3 of the 4 cells, the 2 new cells
    old = {(r["cell_id"], r["stage"], r["seed"], r["optuna_trial_number"]) for r in rows}
    assert not old & {(c["cell_id"], c["stage"], c["seed"], c["optuna_number"]) for c in new}
    for c in new:
        if c["stage"] == "final" and "shapes-16" not in c["cell_id"] and "coop" in c["cell_id"]:
            same = [r for r in rows if r["cell_id"] == c["cell_id"] and r["stage"] == "final"]
            assert c["optuna_number"] == same[0]["optuna_trial_number"]
