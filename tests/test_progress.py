"""The sweep's progress display: the true number of running trials, elapsed time and ETA, full cell ids
(two protocols never print the same name), plain lines at a bounded rate where the output is not a
terminal (with the last state printed at the end), a tqdm bar on a terminal, and a resumed sweep's
recorded trials counted but left out of the rate."""

from __future__ import annotations

import io

from orchestrator.planner import plan as make_plan
from orchestrator.progress import PLAIN_INTERVAL_S, ProgressPrinter, summary_line
from orchestrator.spec import parse_spec


class _Trial:
    def __init__(self, tid):
        self.trial_id = tid


class _Rows:
    def __init__(self):
        self.rows = {}


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _plan():
    spec = parse_spec(
        {
            "name": "p",
            "protocol": ["fewshot", "base2novel"],
            "methods": ["coop"],
            "datasets": ["digits"],
            "shots": [1],
            "seeds": [1, 2, 3],
            "search": {
                "coop": {"n_trials": 1, "seeds": [1], "space": {"lr": {"type": "float", "low": 0.001, "high": 0.1}}}
            },
        }
    )
    return make_plan(spec)


def _row(cell, stage="final", status="FINISHED", val=None):
    return {"cell_id": cell, "stage": stage, "status": status, "val_acc": val}


def test_summary_names_cells_in_full_and_counts_running_elapsed_and_eta():
    p = _plan()
    ids = [c.cell_id for c in p.cells]
    rows = {"a": _row(ids[0], "search", val=40.0), "b": _row(ids[1], "search", val=55.0)}
    line = summary_line(p, rows, running=2, elapsed=125.0, eta=3725.0)
    assert line.startswith(
        f"cells 0/2 done | trials 2 running, 2/{p.n_trials} finished, 0 failed | 2m05s elapsed, ETA 1h02m | best val: "
    )
    assert "base2novel.coop.digits.1shot 55.0" in line and "fewshot.coop.digits.1shot 40.0" in line


def test_plain_lines_are_rate_limited_and_the_last_state_is_printed_at_close():
    p, results, clock, out = _plan(), _Rows(), _Clock(), io.StringIO()
    printer = ProgressPrinter(p, results, stream=out, clock=clock, interactive=False)
    cell = p.cells[0].cell_id
    printer.on_trial_start(0, [], _Trial("t1"))
    printer.on_trial_start(0, [], _Trial("t2"))
    started = out.getvalue().splitlines()  # the first start prints at once; the second changes no count
    assert len(started) == 1 and "trials 1 running, 0/" in started[0] and "ETA" not in started[0]
    clock.t = 30.0
    results.rows["t1"] = _row(cell, "search", val=50.0)
    printer.on_trial_complete(0, [], _Trial("t1"))
    first = out.getvalue().splitlines()[1:]
    assert len(first) == 1 and "trials 1 running, 1/" in first[0] and "30s elapsed" in first[0]
    assert f"ETA {_fmt((p.n_trials - 1) * 30)}" in first[0]  # 1 trial in 30 s: the rest at that rate
    clock.t = 31.0  # within PLAIN_INTERVAL_S: held back
    results.rows["t2"] = _row(cell, "search", status="ERROR")
    printer.on_trial_complete(0, [], _Trial("t2"))
    assert len(out.getvalue().splitlines()) == 2
    clock.t = 31.0 + PLAIN_INTERVAL_S
    results.rows["t3"] = _row(cell)
    printer.on_trial_complete(0, [], _Trial("t3"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "3/" in lines[2] and "1 failed" in lines[2]
    results.rows["t4"] = _row(cell)
    clock.t += 1
    printer.on_trial_complete(0, [], _Trial("t4"))
    printer.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "4/" in lines[3] and "0 running" in lines[3]


def test_a_resumed_sweep_counts_recorded_trials_but_leaves_them_out_of_the_rate():
    p, results, clock, out = _plan(), _Rows(), _Clock(), io.StringIO()
    cell = p.cells[0].cell_id
    results.rows = {f"old{i}": _row(cell) for i in range(4)}
    printer = ProgressPrinter(p, results, stream=out, clock=clock, interactive=False, already=4)
    clock.t = 10.0
    results.rows["new"] = _row(cell)
    printer.on_trial_complete(0, [], _Trial("new"))
    line = out.getvalue().strip()
    assert f"5/{p.n_trials} finished" in line and f"ETA {_fmt((p.n_trials - 5) * 10)}" in line


def _fmt(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def test_on_a_terminal_a_bar_updates_in_place():
    class _Tty(io.StringIO):
        def isatty(self):
            return True

    p, results, out = _plan(), _Rows(), _Tty()
    printer = ProgressPrinter(p, results, stream=out)
    printer.on_trial_start(0, [], _Trial("t1"))
    results.rows["t1"] = _row(p.cells[0].cell_id)
    printer.on_trial_complete(0, [], _Trial("t1"))
    printer.close()
    text = out.getvalue()
    assert "\r" in text and f"1/{p.n_trials}" in text and "cells 0/2 done" in text
