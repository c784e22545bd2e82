"""Live progress of a sweep, replacing Tune's verbose tables (the Tuner runs with ``verbose=0``).

The state is one line: ``cells 3/8 done | trials 2 running, 17/40 finished, 1 failed | 4m10s elapsed,
ETA 6m | best val: fewshot.coop.digits.1shot 61.2, ...`` (cell ids in full, so cells of two protocols
never print the same name; the ETA is the remaining trials at the rate this driver has finished them).

* On a terminal, a ``tqdm`` bar over the planned trials carries that state and updates in place.
* Elsewhere (CI logs, ``ray job`` logs, pipes), plain lines: one whenever the finished / failed counts
  change, at most one per ``PLAIN_INTERVAL_S`` (the latest state is printed when the sweep ends).

``already`` (trials a resumed sweep finds recorded) starts the counts and is left out of the rate.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from ray.tune import Callback

from orchestrator.planner import Plan
from orchestrator.results import OK_STATUS, PRUNED_STATUS

PLAIN_INTERVAL_S = 10.0  # the fewest seconds between two plain lines


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Tally:
    """The counts behind the summary line, kept up to date one finished trial at a time (``sync(rows, tid)``:
    O(1) per trial; a whole recount only when ``rows`` changed in another way, e.g. a retried row replaced)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.n_final = {c.cell_id: c.n_final_runs for c in plan.cells}
        self.rebuild({})

    def rebuild(self, rows: dict[str, dict]) -> None:
        self.counted: dict[str, dict] = {}
        self.failed = 0
        self.finals: dict[str, int] = {}
        self.best: dict[str, float] = {}
        self.done_cells = 0
        for tid, r in rows.items():
            self._add(tid, r)

    def _add(self, tid: str, r: dict) -> None:
        self.counted[tid] = r
        self.failed += r["status"] not in (OK_STATUS, PRUNED_STATUS)
        cid = r["cell_id"]
        if r["stage"] == "final" and cid in self.n_final:
            self.finals[cid] = self.finals.get(cid, 0) + 1
            self.done_cells += self.finals[cid] == self.n_final[cid]
        if r["stage"] == "search" and r.get("val_acc") is not None and cid in self.n_final:
            self.best[cid] = max(self.best.get(cid, r["val_acc"]), r["val_acc"])

    def sync(self, rows: dict[str, dict], tid: Optional[str] = None) -> None:
        """Count the row of trial ``tid`` (just finished); recount when ``rows`` holds anything else new."""
        if tid is not None and tid in rows and tid not in self.counted:
            retried = rows[tid].get("retry_of_trial")
            if retried in self.counted and retried not in rows:  # the new attempt replaced a failed row
                self.rebuild(rows)
                return
            self._add(tid, rows[tid])
        if len(self.counted) != len(rows):
            self.rebuild(rows)

    def line(
        self, running: int, elapsed: Optional[float] = None, eta: Optional[float] = None, max_best: int = 4
    ) -> str:
        line = (
            f"cells {self.done_cells}/{len(self.plan.cells)} done | trials {running} running, "
            f"{len(self.counted)}/{self.plan.n_trials} finished, {self.failed} failed"
        )
        if elapsed is not None:
            line += f" | {_duration(elapsed)} elapsed" + (f", ETA {_duration(eta)}" if eta is not None else "")
        if self.best:
            shown = sorted(self.best.items())[:max_best]
            more = f" (+{len(self.best) - max_best} cells)" if len(self.best) > max_best else ""
            line += " | best val: " + ", ".join(f"{k} {v:.1f}" for k, v in shown) + more
        return line


def summary_line(
    plan: Plan,
    rows: dict[str, dict],
    running: int,
    elapsed: Optional[float] = None,
    eta: Optional[float] = None,
    max_best: int = 4,
) -> str:
    """The progress line for ``rows`` (Tune trial id -> trials.arrow row)."""
    tally = Tally(plan)
    tally.rebuild(rows)
    return tally.line(running, elapsed, eta, max_best)


class ProgressPrinter(Callback):
    """Shows ``summary_line`` (see the module docstring); rows come from the results callback (``.rows``)."""

    def __init__(
        self,
        plan: Plan,
        results_callback,
        stream=None,
        already: int = 0,
        clock=time.monotonic,
        interactive: Optional[bool] = None,
    ):
        self.plan = plan
        self.results_callback = results_callback
        self.running: set[str] = set()
        self.already = already
        self._clock = clock
        self._start = clock()
        self._stream = stream
        self._interactive = interactive
        self._bar = None
        self._last_key: Optional[tuple] = None
        self._last_print = float("-inf")
        self._pending: Optional[str] = None
        self.tally = Tally(plan)

    # --- the state -----------------------------------------------------------------------------
    def _eta(self, finished: int, elapsed: float) -> Optional[float]:
        here = finished - self.already
        if here <= 0:
            return None
        return max(0.0, (self.plan.n_trials - finished) * elapsed / here)

    def line(self, tid: Optional[str] = None) -> str:
        rows = self.results_callback.rows
        self.tally.sync(rows, tid)
        elapsed = self._clock() - self._start
        return self.tally.line(len(self.running), elapsed, self._eta(len(rows), elapsed))

    # --- output ---------------------------------------------------------------------------------
    def _out(self):
        return self._stream or sys.stdout

    def _is_interactive(self) -> bool:
        if self._interactive is None:
            isatty = getattr(self._out(), "isatty", None)
            self._interactive = bool(isatty and isatty())
        return self._interactive

    def _emit(self, tid: Optional[str] = None) -> None:
        rows = self.results_callback.rows
        line = self.line(tid)
        if self._is_interactive():
            from tqdm import tqdm

            if self._bar is None:
                self._bar = tqdm(
                    total=self.plan.n_trials,
                    initial=self.already,
                    file=self._out(),
                    unit="trial",
                    dynamic_ncols=True,
                    bar_format="{n_fmt}/{total_fmt} {bar:20} {desc}",
                )
            self._bar.n = len(rows)
            self._bar.set_description_str(line)  # refreshes the bar
            return
        key = (len(rows), self.tally.failed)
        if key == self._last_key:
            return
        now = self._clock()
        if now - self._last_print < PLAIN_INTERVAL_S:
            self._pending = line  # printed by the next allowed update or by close()
            return
        self._print(line, key, now)

    def _print(self, line: str, key: tuple, now: float) -> None:
        print(line, file=self._out(), flush=True)
        self._last_key, self._last_print, self._pending = key, now, None

    def close(self) -> None:
        """End the display: the bar stays with its last state; a plain line held back by the rate is printed."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._pending is not None:
            rows = self.results_callback.rows
            self._print(self.line(), (len(rows), None), self._clock())

    # --- Tune's hooks ---------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._emit()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._emit(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self._emit(trial.trial_id)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_stream"] = d["_bar"] = None
        d["_clock"] = time.monotonic
        return d
