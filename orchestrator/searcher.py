"""The sweep's Ray Tune searcher: one Optuna study per cell, search stage then final stage.

For every cell it asks Optuna for proposals (define-by-run over the cell's space, TPE
multivariate + grouped for conditional parameters, the method defaults enqueued first when they
lie in the space), emits one Tune trial per (proposal, search seed), tells Optuna the mean
validation metric over the search seeds, and once every proposal is told emits the final stage:
the best proposal's parameters (or the defaults when nothing was searched) on every final seed.
Cells are served round-robin so the cluster stays busy, at most ``max_concurrent`` trials at a time.
Studies live in a JournalStorage file in the sweep's output directory (open it with
``optuna-dashboard <file>``).

**Nothing of it is saved between drivers.** Each driver builds a fresh searcher from three records
that are always on disk: the plan (this run's spec), the rows of finished trials (``set_ledger``:
``trials.arrow``) and the Optuna journal. A planned unit of work (cell, stage, seed, proposal) that
has a row is counted from it and never run again; a proposal the journal holds (asked by an earlier
driver, told or not) is taken up again with its own parameters instead of asking a new one; a trial
Tune restores to run again (from its checkpoint) is adopted (``adopt``) so its work is not emitted
twice; everything else is emitted. So a resumed sweep, a sweep grown by a changed spec (more seeds,
datasets, shots, methods or proposals: the new plan simply has more work) and a retry of failed trials
(``set_ledger(..., retry_failed=True)``: rows with status ERROR do not count, and the new attempt
names the one it retries in ``retry_of``) are the same code path. Tune's own saved copy of the
searcher is never read (``SweepSearch``).

A cell whose final runs have rows keeps the proposal they ran with (the proposal number on those
rows), so finals added later (more seeds) use the same parameters.

Each study carries its cell as user attributes (protocol, method, dataset, shots, search seeds, backbone)
and, once the MLflow tracker has created the cell's run, ``mlflow_run_id`` (``record_mlflow_runs``, which
the tracker calls through its own handle on the journal).

The searcher is plain Python driven by Tune's callbacks, so tests drive it with a fake objective.
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from ray.tune.search import Searcher, SearchGenerator

from orchestrator.ledger import open_starts, work_key
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
    return {
        "stage": "search",
        "initialized": False,
        "asked": [],
        "params": {},
        "queue": [],
        "current": None,
        "values": {},
        "failed": set(),
        "pruned": set(),
        "told": set(),
        "final_emitted": 0,
        "final_done": 0,
        "best_params": None,
        "best_number": None,
        "best_value": None,
        "best_source": None,
    }


class SweepSearch(SearchGenerator):
    """Tune's wrapper of the sweep's ``CellSearcher``. Tune saves and restores the wrapper's own small state
    (the experiment it creates trials for, its trial counter), but never the searcher, which each driver
    rebuilds from the plan, the ledger and the journal (see the module docstring): a stale copy from Tune's
    last snapshot is never loaded over it, and a restored "finished" flag is dropped, so that a grown sweep
    asks for its new work."""

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._finished = False  # the searcher says when it is finished, from this driver's plan

    def is_finished(self) -> bool:
        return self._finished  # a sweep asks for unlimited samples: only the searcher ends it


class CellSearcher(Searcher):
    """Round-robin, per-cell Optuna search followed by per-cell final runs."""

    def __init__(
        self,
        cells: list[Cell],
        request_base: dict[str, Any],
        storage_file: str,
        metric: str = "val_acc",
        mode: str = "max",
        max_concurrent: int = 0,
    ):
        super().__init__(metric=metric, mode=mode)
        self.cells = list(cells)
        self.request_base = dict(request_base)
        self.storage_file = str(storage_file)
        self.max_concurrent = int(max_concurrent)  # 0: no limit
        self.state: dict[str, dict] = {c.cell_id: _new_cell_state() for c in self.cells}
        self.trials: dict[str, dict] = {}  # tune trial id -> the work it runs (suggested here or adopted)
        self._running = 0  # trials entries not done
        self._rr = 0
        self._studies: dict[str, optuna.Study] = {}
        self._ledger: dict[tuple, dict] = {}  # work key -> the row that finished it (set_ledger)
        self._retry_of: dict[tuple, dict] = {}  # work key -> its failed row, when failed work runs again
        self._starts: dict[tuple, dict] = {}  # work key -> start entry of an unfinished trial (set_ledger)
        self._live: dict[tuple, str] = {}  # work key -> the trial running it now
        self._done_here: set[tuple] = set()  # work keys of trials that completed in this driver
        self._handles: dict[tuple, optuna.trial.Trial] = {}  # (cell id, number) -> the trial asked here

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Nothing: the searcher is rebuilt from the records on disk (``SweepSearch``)."""

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        """Nothing: a saved copy (also one an earlier version pickled) is never loaded over this driver's."""

    # --- what earlier drivers did -------------------------------------------------------------
    @staticmethod
    def _work_key(cell_id: str, stage: str, seed: int, number: Optional[int]) -> tuple:
        return work_key(cell_id, stage, seed, number)

    @classmethod
    def _key_of(cls, work: dict) -> tuple:
        """The work key of a config or of a ``trials`` entry (both carry cell_id, stage, seed, optuna_number)."""
        return cls._work_key(work["cell_id"], work["stage"], work["seed"], work["optuna_number"])

    def set_ledger(self, rows, retry_failed: bool = False, starts: Optional[dict] = None) -> None:
        """Rows (``trials.arrow`` dicts) of trials finished before this driver started. With ``retry_failed``
        a row with status ERROR does not count: its work runs again (and names that row in ``retry_of``).
        ``starts`` (Tune trial id -> ledger ``start`` entry) are trials an earlier driver started that never
        finished: one Tune does not restore (it started after Tune's last snapshot) is work emitted again, and
        the new trial names the old one in ``continues`` (the MLflow tracker continues its run)."""
        self._ledger, self._retry_of = {}, {}
        self._starts = open_starts((starts or {}).values())
        for r in rows:
            key = self._work_key(r["cell_id"], r["stage"], r["seed"], r.get("optuna_trial_number"))
            if retry_failed and r.get("status") == ERROR_STATUS:
                self._retry_of[key] = r
            elif key not in self._ledger or self._ledger[key].get("status") == ERROR_STATUS:
                self._ledger[key] = r
        for key in self._ledger:
            self._retry_of.pop(key, None)  # a later attempt of the same work finished

    def adopt(self, trial_id: str, config: dict) -> None:
        """Tune restored ``trial_id`` (from an earlier driver) to run again: its work is not emitted twice."""
        info = {k: config[k] for k in ("cell_id", "stage", "seed", "optuna_number")}
        if info["cell_id"] not in self.state:
            return  # a cell the plan no longer has (cannot happen for a resumed spec; checked by the driver)
        self._register(trial_id, info)
        self._live[self._key_of(info)] = trial_id

    @staticmethod
    def ledger_result(row: dict) -> dict:
        """What ``on_trial_complete`` gets for work known only from its row."""
        res = {"ledger_status": row.get("status")}
        if row.get("val_acc") is not None:
            res["val_acc"] = row["val_acc"]
        if row.get("status") == ERROR_STATUS:
            res["trial_failed"] = 1
        return res

    # --- studies --------------------------------------------------------------------------
    def study(self, cell: Cell) -> optuna.Study:
        st = self._studies.get(cell.cell_id)
        if st is None:
            storage = _journal(self.storage_file)
            idx = [c.cell_id for c in self.cells].index(cell.cell_id)
            try:  # a reopened study (resumed or grown sweep) must not replay the same random draws
                done = len(optuna.load_study(study_name=cell.cell_id, storage=storage).trials)
            except KeyError:
                done = 0
            st = optuna.create_study(
                study_name=cell.cell_id,
                storage=storage,
                direction="maximize",
                sampler=self._sampler(cell, idx * 100_003 + done),
                pruner=self._pruner(cell),
                load_if_exists=True,
            )
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
            return optuna.samplers.TPESampler(
                seed=s.seed + offset,
                n_startup_trials=s.n_startup_trials,
                multivariate=True,
                group=True,
                constant_liar=True,
            )

    @staticmethod
    def _pruner(cell: Cell) -> optuna.pruners.BasePruner:
        p = cell.search.pruner
        if p.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
        return optuna.pruners.NopPruner()

    # --- Tune Searcher API ----------------------------------------------------------------
    def _register(self, trial_id: str, info: dict) -> None:
        """``trials[trial_id]`` = the work it runs, not done yet (``_running`` counts those: O(1) per suggest)."""
        old = self.trials.get(trial_id)
        if old is not None and not old["done"]:
            self._running -= 1
        self.trials[trial_id] = info | {"done": False}
        self._running += 1

    def running(self) -> int:
        return self._running

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.max_concurrent and self.running() >= self.max_concurrent:
            return None
        n = len(self.cells)
        cfg = None
        for i in range(n):
            idx = (self._rr + i) % n
            cfg = self._next_new(self.cells[idx])
            if cfg is not None:
                self._rr = idx + 1
                break
        if cfg is not None:
            self._register(trial_id, {k: cfg[k] for k in ("cell_id", "stage", "seed", "optuna_number")})
            key = self._key_of(cfg)
            self._live[key] = trial_id
            started = self._starts.pop(key, None)
            if started and started["tune_trial_id"] not in self.trials and "retry_of" not in cfg:
                cfg["continues"] = {
                    "tune_trial_id": started["tune_trial_id"],
                    "mlflow_run_id": started["mlflow_run_id"],
                }
            return cfg
        if self.running() == 0 and all(self.state[c.cell_id]["final_emitted"] >= c.n_final_runs for c in self.cells):
            return Searcher.FINISHED
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        info = self.trials.get(trial_id)
        if info is None or info["done"]:
            return
        info["done"] = True
        self._running -= 1
        key = self._key_of(info)
        self._done_here.add(key)
        if self._live.get(key) == trial_id:
            del self._live[key]
        cell = self._cell(info["cell_id"])
        st = self.state[cell.cell_id]
        if info["stage"] == "final":
            st["final_done"] += 1
            return
        num = info["optuna_number"]
        if result and result.get("ledger_status") == "PRUNED":
            st["pruned"].add(num)  # pruned by an earlier driver
        value = None if (error or not result) else result.get(self.metric)
        if value is None or result.get("trial_failed"):
            st["failed"].add((num, info["seed"]))
            why = (result or {}).get("error_class") or ("the trial errored" if error else f"no {self.metric} reported")
            message = (result or {}).get("error_message")
            st.setdefault("fail_reasons", {}).setdefault(
                num, f"seed {info['seed']}: {why}" + (f": {message}"[:500] if message else "")
            )
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
        """Report a search trial's per-epoch value to its own cell's study; True when the pruner says stop. Only
        proposals asked by this driver are pruned (a proposal taken up from the journal has no live handle)."""
        info = self.trials.get(trial_id)
        if info is None or info["stage"] != "search":
            return False
        cell = self._cell(info["cell_id"])
        if cell.search.pruner.name == "none" or info["seed"] != cell.search_seeds[0]:
            return False
        step, value = result.get("epoch"), result.get(self.metric)
        if step is None or value is None or result.get("test_images_read") is not None:
            return False
        handle = self._handles.get((cell.cell_id, info["optuna_number"]))
        if handle is None or self._finished(self.study(cell), info["optuna_number"]):
            return False
        handle.report(float(value), int(step))
        if handle.should_prune():
            self.state[cell.cell_id]["pruned"].add(info["optuna_number"])
            return True
        return False

    # --- queries -----------------------------------------------------------------------------
    def best(self, cell_id: str) -> tuple[Optional[float], Optional[dict]]:
        """Best mean validation value told so far in a cell, and its parameters."""
        st = self.state[cell_id]
        scored = {
            n: statistics.fmean(v.values())
            for n, v in st["values"].items()
            if n in st["told"] and n not in st["pruned"] and not any(n_ == n for (n_, _s) in st["failed"])
        }
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
        backbone = self._backbone(cell)
        attrs = {
            "protocol": cell.protocol,
            "method": cell.method,
            "dataset": cell.dataset,
            "shots": cell.shots,
            "search_seeds": list(cell.search_seeds),
            "backbone": f"{backbone.get('arch')}/{backbone.get('pretrained') or 'random init'}",
        }
        known = study.user_attrs
        for key, value in attrs.items():
            if known.get(key) != value:
                study.set_user_attr(key, value)

    def _tell(self, cell: Cell, number: int, value: Optional[float] = None, state=None) -> None:
        """``study.tell`` unless the journal has the trial closed already (told by an earlier driver); a failed
        proposal first gets its reason as the user attribute ``fail_reason`` (when this driver asked it). A
        proposal the journal holds as failed whose retried seeds now all succeeded is added to the study as a
        completed copy (user attribute ``retry_of``: the failed trial's number)."""
        study = self.study(cell)
        frozen = self._frozen(study, number)
        if frozen is not None and frozen.state.is_finished():
            copied = any(t.user_attrs.get("retry_of") == number for t in study.get_trials(deepcopy=False))
            if frozen.state == optuna.trial.TrialState.FAIL and value is not None and not copied:
                study.add_trial(
                    optuna.trial.create_trial(
                        params=frozen.params,
                        distributions=frozen.distributions,
                        value=value,
                        user_attrs={"retry_of": number},
                    )
                )
            return
        reason = self.state[cell.cell_id].get("fail_reasons", {}).get(number)
        handle = self._handles.get((cell.cell_id, number))
        if state == optuna.trial.TrialState.FAIL and reason and handle is not None:
            handle.set_user_attr("fail_reason", reason)
        study.tell(number, value, state=state)

    def _orphan(self, cell: Cell) -> Optional[optuna.trial.FrozenTrial]:
        """The oldest proposal the journal holds (asked by an earlier driver, told or not) that this searcher has
        not taken up yet; its parameters are read back from it (``sample_space`` on the frozen trial)."""
        st = self.state[cell.cell_id]
        asked = set(st["asked"])
        for t in self.study(cell).get_trials(deepcopy=False):
            if t.number in asked or t.state == optuna.trial.TrialState.WAITING or "retry_of" in t.user_attrs:
                continue
            return t
        return None

    def _next_new(self, cell: Cell) -> Optional[dict]:
        """The cell's next config that still has to run: work with a row is counted from it, work a live trial
        runs is waited for."""
        while True:
            cfg = self._next_for(cell)
            if cfg is None:
                return None
            key = self._key_of(cfg)
            row = self._ledger.get(key)
            if row is not None:
                tid = row["tune_trial_id"]
                self._register(tid, {k: cfg[k] for k in ("cell_id", "stage", "seed", "optuna_number")})
                self.on_trial_complete(tid, self.ledger_result(row), error=row.get("status") == ERROR_STATUS)
                continue
            if key in self._live or key in self._done_here:
                continue  # adopted (Tune runs it again from its checkpoint), or an adopted trial that finished
            failed = self._retry_of.get(key)
            if failed is not None:
                cfg["retry_of"] = {
                    "tune_trial_id": failed.get("tune_trial_id"),
                    "mlflow_run_id": failed.get("mlflow_run_id"),
                }
                print(
                    f"retry: {cfg['cell_id']} {cfg['stage']} seed {cfg['seed']} failed in trial "
                    f"{failed.get('tune_trial_id')} ({failed.get('error_class')}); it runs again",
                    flush=True,
                )
            return cfg

    def _cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.cell_id == cell_id:
                return c
        raise KeyError(cell_id)

    def _pinned_final(self, cell: Cell) -> Optional[int]:
        """The proposal number the cell's recorded final runs ran with, if any (finals added later use it too)."""
        for key, row in [*self._ledger.items(), *self._retry_of.items()]:
            if key[:2] == (cell.cell_id, "final") and row.get("optuna_trial_number") is not None:
                return int(row["optuna_trial_number"])
        return None

    def _maybe_enter_final(self, cell: Cell) -> None:
        st = self.state[cell.cell_id]
        if st["stage"] != "search" or len(st["asked"]) < cell.n_trials or len(st["told"]) < len(st["asked"]):
            return
        pinned = self._pinned_final(cell)
        value, params = self.best(cell.cell_id)
        if pinned is not None and pinned in st["params"]:
            st["best_number"], st["best_params"], st["best_source"] = pinned, st["params"][pinned], "search"
            st["best_value"] = statistics.fmean(st["values"][pinned].values()) if st["values"].get(pinned) else None
        elif params is not None:
            st["best_value"], st["best_params"], st["best_source"] = value, params, "search"
            st["best_number"] = next(n for n, p in st["params"].items() if p is params)
        else:
            st["best_params"] = cell.defaults_in_space() or {} if cell.space else {}
            st["best_source"] = "defaults"
        st["stage"] = "final"

    def _backbone(self, cell: Cell) -> dict:
        """The cell's backbone as a request's ``{arch, pretrained}`` (the request base's for a cell without one)."""
        if cell.backbone is not None:
            return {"arch": cell.backbone.arch, "pretrained": cell.backbone.pretrained}
        return dict(self.request_base.get("backbone") or {})

    def _config(self, cell: Cell, stage: str, seed: int, number: Optional[int], params: dict) -> dict:
        overrides = dict(cell.overrides)
        overrides.update(params)
        request = dict(
            self.request_base,
            method=cell.method,
            dataset=cell.dataset,
            shots=cell.shots,
            seed=seed,
            protocol=cell.protocol,
            stage=stage,
            overrides=overrides,
            backbone=self._backbone(cell),
        )
        if cell.targets:
            request["targets"] = list(cell.targets)
        return {
            "cell_id": cell.cell_id,
            "stage": stage,
            "seed": seed,
            "optuna_number": number,
            "params": dict(params),
            "request": request,
        }

    def _next_for(self, cell: Cell) -> Optional[dict]:
        st = self.state[cell.cell_id]
        if st["stage"] == "search":
            if st["current"] is not None and st["queue"]:
                seed = st["queue"].pop(0)
                return self._config(cell, "search", seed, st["current"], st["params"][st["current"]])
            if len(st["asked"]) < cell.n_trials:
                trial = self._orphan(cell)
                if trial is None:
                    trial = self.study(cell).ask()
                    self._handles[(cell.cell_id, trial.number)] = trial  # asked here: report / prune / attributes
                params = sample_space(trial, cell.space)
                st["asked"].append(trial.number)
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
