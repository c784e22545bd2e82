"""The sweep's Ray Tune ``Searcher``: one Optuna study per cell, search stage then final stage.

For every cell it asks Optuna for proposals (define-by-run over the cell's space, TPE
multivariate + grouped for conditional parameters, the method defaults enqueued first when they
lie in the space), emits one Tune trial per (proposal, search seed), tells Optuna the mean
validation metric over the search seeds, and once every proposal is told emits the final stage:
the best proposal's parameters (or the defaults when nothing was searched) on every final seed.
Cells are served round-robin so the cluster stays busy. Studies live in a JournalStorage file in
the sweep's output directory (open it with ``optuna-dashboard <file>``); ``save``/``restore``
pickle the bookkeeping so ``Tuner.restore`` continues where the sweep stopped.

A killed driver leaves the journal and ``trials.arrow`` ahead of the bookkeeping Tune saved last
(its experiment snapshot is periodic). A restored searcher therefore reconciles with both: a study
trial the journal holds but the bookkeeping never saw (asked just before the kill) is adopted as
the next proposal instead of asking a new one (so the enqueued method defaults are not lost);
telling a trial the journal already closed is skipped; the defaults are enqueued once per study;
and, given the rows earlier drivers wrote (``set_ledger``), a (cell, stage, seed[, proposal]) that
already has a row is counted as done from that row instead of being emitted again.

The saved bookkeeping and Tune's saved trial list are uploaded separately, so either may be the
newer one: the bookkeeping can hold a trial Tune's list lacks (it then never runs) or count work
whose row was never written. Before it says it is finished or waits with nothing running, the
searcher therefore accounts for every planned unit of work (each told proposal on each search seed,
each final seed): an earlier driver's row (``set_ledger``), or a trial of this driver that runs or
ran it (suggested here, or restored by Tune to run again: ``note_live``; this driver writes the row of
each); a trial the bookkeeping waits for that has a row is counted from it, and work with neither is
emitted again.

Each study carries its cell as user attributes (protocol, method, dataset, shots, search seeds, backbone)
and, once the MLflow tracker has created the cell's run, ``mlflow_run_id`` (``record_mlflow_runs``, which
the tracker calls through its own handle on the journal).

The searcher is plain Python driven by Tune's callbacks, so tests drive it with a fake objective.
"""
from __future__ import annotations

import pickle
import warnings
import statistics
from pathlib import Path
from typing import Any, Optional

import optuna
from ray.tune.search import Searcher

from orchestrator.planner import Cell
from orchestrator.results import ERROR_STATUS
from orchestrator.spec import ParamSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def sample_space(trial: optuna.trial.BaseTrial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Define-by-run sampling; a conditional parameter is sampled only when its ``when`` holds."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.when and any(parent not in out or out[parent] not in allowed for parent, allowed in p.when.items()):
            continue
        if p.type == "int":
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        elif p.type == "float":
            out[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
        else:
            out[name] = trial.suggest_categorical(name, p.choices)
    return out


def _journal(storage_file: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(storage_file))


def record_mlflow_runs(storage_file: str, runs: dict[str, Optional[str]]) -> None:
    """Set the user attribute ``mlflow_run_id`` of each cell's study (``{cell id: run id}``) where it differs.
    A cell without a study (nothing to search) is left out. Its own storage handle on the journal file (whose
    appends are locked across handles), so it may be called from the tracker's sender thread."""
    runs = {cid: rid for cid, rid in runs.items() if rid}
    if not runs or not Path(storage_file).is_file():
        return
    storage = _journal(storage_file)
    names = {s.study_name for s in storage.get_all_studies()}
    for cid, rid in runs.items():
        if cid in names:
            study = optuna.load_study(study_name=cid, storage=storage)
            if study.user_attrs.get("mlflow_run_id") != rid:
                study.set_user_attr("mlflow_run_id", rid)


def _new_cell_state() -> dict:
    return {"stage": "search", "initialized": False, "asked": [], "optuna_ids": {}, "params": {},
            "queue": [], "current": None, "values": {}, "failed": set(), "pruned": set(), "told": set(),
            "final_emitted": 0, "final_done": 0, "best_params": None, "best_number": None, "best_value": None,
            "best_source": None}


class CellSearcher(Searcher):
    """Round-robin, per-cell Optuna search followed by per-cell final runs."""

    def __init__(self, cells: list[Cell], request_base: dict[str, Any], storage_file: str,
                 metric: str = "val_acc", mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.cells = list(cells)
        self.request_base = dict(request_base)
        self.storage_file = str(storage_file)
        self.state: dict[str, dict] = {c.cell_id: _new_cell_state() for c in self.cells}
        self.trials: dict[str, dict] = {}      # tune trial id -> what it runs
        self._rr = 0
        self._studies: dict[str, optuna.Study] = {}
        self._ledger: dict[tuple, list[dict]] = {}  # rows earlier drivers wrote (set_ledger); never pickled
        self._live: set[str] = set()         # trials this driver will see finish; never pickled
        self._finished_here: set[tuple] = set()  # work keys of trials that finished in this driver; never pickled
        self._handles: dict[tuple, optuna.trial.Trial] = {}  # (cell id, number) -> the open trial asked here; never pickled

    # --- pickling: studies are reopened from the journal file -------------------------------
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_studies"] = {}
        for k in ("_ledger", "_live", "_finished_here", "_handles"):
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._studies = {}
        self.__dict__.setdefault("_ledger", {})  # restore() into a live searcher keeps its ledger
        self.__dict__.setdefault("_live", set())
        self.__dict__.setdefault("_finished_here", set())
        self.__dict__.setdefault("_handles", {})

    def save(self, checkpoint_path: str) -> None:
        from fewshot.paths import atomic_open

        with atomic_open(checkpoint_path, "wb") as f:  # Tune renames it into place; fsynced first
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    # --- the ledger: rows of trials.arrow written by earlier drivers of this sweep ----------
    @staticmethod
    def _work_key(cell_id: str, stage: str, seed: int, number: Optional[int]) -> tuple:
        return (cell_id, stage, int(seed), number if stage == "search" else None)

    @classmethod
    def _key_of(cls, work: dict) -> tuple:
        """The work key of a config or of a ``trials`` entry (both carry cell_id, stage, seed, optuna_number)."""
        return cls._work_key(work["cell_id"], work["stage"], work["seed"], work["optuna_number"])

    def set_ledger(self, rows) -> None:
        """Rows (``trials.arrow`` dicts) of trials finished before this driver started; see the module docstring."""
        self._ledger = {}
        for r in rows:
            key = self._work_key(r["cell_id"], r["stage"], r["seed"], r.get("optuna_trial_number"))
            self._ledger.setdefault(key, []).append(r)

    def note_live(self, trial_id: str) -> None:
        """Tune restored ``trial_id`` to run again in this driver."""
        self._live.add(trial_id)

    def ledger_result(self, row: dict) -> dict:
        """What ``on_trial_complete`` gets for a trial known only from its row."""
        res = {"ledger_status": row.get("status")}
        if row.get(self.metric) is not None:
            res[self.metric] = row[self.metric]
        if row.get("status") == ERROR_STATUS:
            res["trial_failed"] = 1
        return res

    def _done_earlier(self, cfg: dict) -> Optional[dict]:
        """A ledger row of a trial that already did what ``cfg`` describes (and that this searcher does not track)."""
        for r in self._ledger.get(self._key_of(cfg), []):
            if r["tune_trial_id"] not in self.trials:
                return r
        return None

    # --- studies --------------------------------------------------------------------------
    def study(self, cell: Cell) -> optuna.Study:
        st = self._studies.get(cell.cell_id)
        if st is None:
            storage = _journal(self.storage_file)
            idx = [c.cell_id for c in self.cells].index(cell.cell_id)
            try:  # a reopened study (restored sweep) must not replay the same random draws
                done = len(optuna.load_study(study_name=cell.cell_id, storage=storage).trials)
            except KeyError:
                done = 0
            st = optuna.create_study(study_name=cell.cell_id, storage=storage, direction="maximize",
                                     sampler=self._sampler(cell, idx * 100_003 + done),
                                     pruner=self._pruner(cell), load_if_exists=True)
            self._describe(st, cell)
            state = self.state[cell.cell_id]
            if not state["initialized"]:
                defaults = cell.defaults_in_space()
                enqueued = any(t.user_attrs.get("source") == "method defaults" for t in st.get_trials(deepcopy=False))
                if defaults is not None and not enqueued:  # once per study, also when a killed driver enqueued them
                    st.enqueue_trial(defaults, user_attrs={"source": "method defaults"})
                state["initialized"] = True
            self._studies[cell.cell_id] = st
        return st

    @staticmethod
    def _sampler(cell: Cell, offset: int) -> optuna.samplers.BaseSampler:
        s = cell.search.sampler
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=s.seed + offset)
        with warnings.catch_warnings():  # group=True is "experimental" in Optuna 5
            warnings.simplefilter("ignore")
            return optuna.samplers.TPESampler(seed=s.seed + offset, n_startup_trials=s.n_startup_trials,
                                              multivariate=True, group=True, constant_liar=True)

    @staticmethod
    def _pruner(cell: Cell) -> optuna.pruners.BasePruner:
        p = cell.search.pruner
        if p.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
        return optuna.pruners.NopPruner()

    # --- Tune Searcher API ----------------------------------------------------------------
    def suggest(self, trial_id: str) -> Optional[dict]:
        n = len(self.cells)
        cfg = None
        for i in range(n):
            idx = (self._rr + i) % n
            cfg = self._next_new(self.cells[idx])
            if cfg is not None:
                self._rr = idx + 1
                break
        if cfg is None:
            cfg = self._unaccounted_work()
        if cfg is not None:
            self.trials[trial_id] = {k: cfg[k] for k in ("cell_id", "stage", "seed", "optuna_number")} | {"done": False}
            self._live.add(trial_id)
            return cfg
        if all(self.state[c.cell_id]["final_emitted"] >= c.n_final_runs for c in self.cells):
            return Searcher.FINISHED
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        was_live = trial_id in self._live
        self._live.discard(trial_id)
        info = self.trials.get(trial_id)
        if info is None or info["done"]:
            return
        info["done"] = True
        if was_live:  # its row is written by this driver's results callback
            self._finished_here.add(self._key_of(info))
        cell = self._cell(info["cell_id"])
        st = self.state[cell.cell_id]
        if info["stage"] == "final":
            st["final_done"] += 1
            return
        num = info["optuna_number"]
        if result and result.get("ledger_status") == "PRUNED":
            st["pruned"].add(num)  # pruned by a driver that died before its bookkeeping was saved
        value = None if (error or not result) else result.get(self.metric)
        if value is None or result.get("trial_failed"):
            st["failed"].add((num, info["seed"]))
            why = (result or {}).get("error_class") or ("the trial errored" if error else f"no {self.metric} reported")
            message = (result or {}).get("error_message")
            st.setdefault("fail_reasons", {}).setdefault(
                num, f"seed {info['seed']}: {why}" + (f": {message}"[:500] if message else ""))
        else:
            st["values"].setdefault(num, {})[info["seed"]] = float(value)
        got = len(st["values"].get(num, {})) + sum(1 for (n_, _s) in st["failed"] if n_ == num)
        if got >= len(cell.search_seeds) and num not in st["told"]:
            if num in st["pruned"]:
                self._tell(cell, num, state=optuna.trial.TrialState.PRUNED)
            elif any(n_ == num for (n_, _s) in st["failed"]):
                self._tell(cell, num, state=optuna.trial.TrialState.FAIL)
            else:
                self._tell(cell, num, statistics.fmean(st["values"][num].values()))
            st["told"].add(num)
        self._maybe_enter_final(cell)

    # --- pruning (consulted by orchestrator.tune_runner's scheduler) ----------------------
    def should_prune(self, trial_id: str, result: dict) -> bool:
        """Report a search trial's per-epoch value to its own cell's study; True when the pruner says stop."""
        info = self.trials.get(trial_id)
        if info is None or info["stage"] != "search":
            return False
        cell = self._cell(info["cell_id"])
        if cell.search.pruner.name == "none" or info["seed"] != cell.search_seeds[0]:
            return False
        step, value = result.get("epoch"), result.get(self.metric)
        if step is None or value is None or result.get("test_images_read") is not None:
            return False
        st = self.state[cell.cell_id]
        study = self.study(cell)
        if self._finished(study, info["optuna_number"]):
            return False  # told already (a trial re-run after its driver died): nothing left to prune
        trial = optuna.trial.Trial(study, st["optuna_ids"][info["optuna_number"]])
        trial.report(float(value), int(step))
        if trial.should_prune():
            st["pruned"].add(info["optuna_number"])
            return True
        return False

    # --- queries -----------------------------------------------------------------------------
    def best(self, cell_id: str) -> tuple[Optional[float], Optional[dict]]:
        """Best mean validation value told so far in a cell, and its parameters."""
        st = self.state[cell_id]
        scored = {n: statistics.fmean(v.values()) for n, v in st["values"].items()
                  if n in st["told"] and n not in st["pruned"] and not any(n_ == n for (n_, _s) in st["failed"])}
        if not scored:
            return None, None
        n = max(scored, key=lambda k: (scored[k], -k))
        return scored[n], st["params"][n]

    def cell_done(self, cell_id: str) -> bool:
        c = self._cell(cell_id)
        return self.state[cell_id]["final_done"] >= c.n_final_runs

    # --- internals ---------------------------------------------------------------------------
    @staticmethod
    def _frozen(study: optuna.Study, number: int) -> Optional[optuna.trial.FrozenTrial]:
        trials = study.get_trials(deepcopy=False)
        if number < len(trials) and trials[number].number == number:
            return trials[number]
        return next((t for t in trials if t.number == number), None)

    def _finished(self, study: optuna.Study, number: int) -> bool:
        t = self._frozen(study, number)
        return t is not None and t.state.is_finished()

    def _describe(self, study: optuna.Study, cell: Cell) -> None:
        """What optuna-dashboard shows about a study: the metric's name and the cell it searches (written once)."""
        if study.metric_names != [cell.search.metric]:
            study.set_metric_names([cell.search.metric])
        backbone = self.request_base.get("backbone") or {}
        attrs = {"protocol": cell.protocol, "method": cell.method, "dataset": cell.dataset, "shots": cell.shots,
                 "search_seeds": list(cell.search_seeds),
                 "backbone": f"{backbone.get('arch')}/{backbone.get('pretrained') or 'random init'}"}
        known = study.user_attrs
        for key, value in attrs.items():
            if known.get(key) != value:
                study.set_user_attr(key, value)

    def _tell(self, cell: Cell, number: int, value: Optional[float] = None, state=None) -> None:
        """``study.tell`` unless the journal has the trial closed already (told by a driver that was killed); a
        failed proposal first gets its reason as the user attribute ``fail_reason`` (when this driver asked it)."""
        study = self.study(cell)
        if self._finished(study, number):
            return
        reason = self.state[cell.cell_id].get("fail_reasons", {}).get(number)
        handle = self._handles.get((cell.cell_id, number))
        if state == optuna.trial.TrialState.FAIL and reason and handle is not None:
            handle.set_user_attr("fail_reason", reason)
        study.tell(number, value, state=state)

    def _orphan(self, cell: Cell):
        """The oldest study trial that was asked (journal) but is unknown to this bookkeeping, as a trial to sample."""
        st = self.state[cell.cell_id]
        study = self.study(cell)
        asked = set(st["asked"])
        for t in study.get_trials(deepcopy=False):
            if t.number in asked or t.state == optuna.trial.TrialState.WAITING:
                continue
            return optuna.trial.Trial(study, t._trial_id) if t.state == optuna.trial.TrialState.RUNNING else t
        return None

    def _next_new(self, cell: Cell) -> Optional[dict]:
        """The cell's next config that still has to run (work an earlier driver finished is taken from the ledger)."""
        while True:
            cfg = self._next_for(cell)
            if cfg is None:
                return None
            row = self._done_earlier(cfg)
            if row is None:
                return cfg
            tid = row["tune_trial_id"]
            self.trials[tid] = {k: cfg[k] for k in ("cell_id", "stage", "seed", "optuna_number")} | {"done": False}
            self.on_trial_complete(tid, self.ledger_result(row), error=row.get("status") == ERROR_STATUS)
            print(f"resume: {cfg['cell_id']} {cfg['stage']} seed {cfg['seed']} was finished by trial {tid}, which "
                  "Tune's saved state does not know; counted from its row, not run again", flush=True)

    def _unaccounted_work(self) -> Optional[dict]:
        """The config of planned work that has no row and no trial of this driver running it (see the
        module docstring), or None; a waited-for trial that has a row is counted from it on the way."""
        for tid, info in list(self.trials.items()):
            if info["done"] or tid in self._live:
                continue
            rows = self._ledger.get(self._key_of(info))
            if rows:
                row = rows[-1]
                self.on_trial_complete(tid, self.ledger_result(row), error=row.get("status") == ERROR_STATUS)
                print(f"resume: trial {tid} ({info['cell_id']} {info['stage']} seed {info['seed']}) has its row; "
                      "counted from it", flush=True)
                continue
            del self.trials[tid]
            return self._rerun(self._cell(info["cell_id"]), info["stage"], info["seed"], info["optuna_number"],
                               f"trial {tid}, which Tune's saved state does not hold")
        accounted = self._finished_here | {self._key_of(i) for t, i in self.trials.items() if t in self._live}
        for cell in self.cells:
            st = self.state[cell.cell_id]
            if st["stage"] != "final" or st["final_emitted"] < cell.n_final_runs:
                continue
            work = [("search", seed, num) for num in st["asked"] for seed in cell.search_seeds]
            work += [("final", seed, None) for seed in cell.final_seeds]
            for stage, seed, num in work:
                key = self._work_key(cell.cell_id, stage, seed, num)
                if key not in self._ledger and key not in accounted:
                    return self._rerun(cell, stage, seed, num, "a trial whose row was never written")
        return None

    def _rerun(self, cell: Cell, stage: str, seed: int, number: Optional[int], why: str) -> dict:
        st = self.state[cell.cell_id]
        print(f"resume: {cell.cell_id} {stage} seed {seed} was emitted as {why}; it runs again", flush=True)
        if stage == "search":
            return self._config(cell, "search", seed, number, st["params"][number])
        return self._config(cell, "final", seed, st["best_number"], st["best_params"] or {})

    def _cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.cell_id == cell_id:
                return c
        raise KeyError(cell_id)

    def _maybe_enter_final(self, cell: Cell) -> None:
        st = self.state[cell.cell_id]
        if st["stage"] != "search" or len(st["asked"]) < cell.n_trials or len(st["told"]) < len(st["asked"]):
            return
        value, params = self.best(cell.cell_id)
        if params is not None:
            st["best_value"], st["best_params"], st["best_source"] = value, params, "search"
            st["best_number"] = next(n for n, p in st["params"].items() if p is params)
        else:
            st["best_params"] = cell.defaults_in_space() or {} if cell.space else {}
            st["best_source"] = "defaults"
        st["stage"] = "final"

    def _config(self, cell: Cell, stage: str, seed: int, number: Optional[int], params: dict) -> dict:
        overrides = dict(cell.overrides)
        overrides.update(params)
        request = dict(self.request_base, method=cell.method, dataset=cell.dataset, shots=cell.shots, seed=seed,
                       protocol=cell.protocol, stage=stage, overrides=overrides)
        if cell.targets:
            request["targets"] = list(cell.targets)
        return {"cell_id": cell.cell_id, "stage": stage, "seed": seed, "optuna_number": number,
                "params": dict(params), "request": request}

    def _next_for(self, cell: Cell) -> Optional[dict]:
        st = self.state[cell.cell_id]
        if st["stage"] == "search":
            if st["current"] is not None and st["queue"]:
                seed = st["queue"].pop(0)
                return self._config(cell, "search", seed, st["current"], st["params"][st["current"]])
            if len(st["asked"]) < cell.n_trials:
                trial = self._orphan(cell)
                if trial is not None:
                    print(f"resume: {cell.cell_id} proposal {trial.number} was asked after Tune's last snapshot; "
                          "it is taken up again instead of asking a new one", flush=True)
                trial = trial or self.study(cell).ask()
                if isinstance(trial, optuna.trial.Trial):  # asked here: its attributes can still be set
                    self._handles[(cell.cell_id, trial.number)] = trial
                params = sample_space(trial, cell.space)
                st["asked"].append(trial.number)
                st["optuna_ids"][trial.number] = trial._trial_id
                st["params"][trial.number] = params
                st["current"], st["queue"] = trial.number, list(cell.search_seeds)
                seed = st["queue"].pop(0)
                return self._config(cell, "search", seed, trial.number, params)
            self._maybe_enter_final(cell)
        if st["stage"] == "final" and st["final_emitted"] < cell.n_final_runs:
            seed = cell.final_seeds[st["final_emitted"]]
            st["final_emitted"] += 1
            return self._config(cell, "final", seed, st["best_number"], st["best_params"] or {})
        return None
