"""What a rerun with a changed spec may do to a sweep that has already run: continue it, grown, or refuse.

A spec that only *adds* — seeds, datasets, shots, methods, protocols, backbones (after the first), Optuna
proposals — continues the sweep in the same output directory: the new plan has more work, the searcher counts
every finished trial from its row (``orchestrator.searcher``), so nothing that finished runs again. A change that alters what a finished
trial means is refused, naming each affected cell and the key:

* settings that every trial computes with (``backbone``, the first of ``backbones``; ``device``) — the whole
  sweep (a further backbone's cells have ids of their own, ``...@<backbone>``: dropping one that has finished
  trials drops its cells, which is refused as below);
* per cell with finished trials: its training / method overrides, its transfer targets, its search space,
  search seeds, metric, sampler or pruner; fewer proposals than it has run; a final seed dropped; the cell
  itself dropped; more proposals for a cell whose final runs have run (their parameters are the best of the
  proposals so far, which more proposals could change).

Keys that change no trial (``name``, ``output``, ``tracking``, ``resources``, ``max_retries``, ``data_root``,
``count_tolerance``, ``report``) may change freely. Cells without a finished trial may change in any way.
A refusal names the two ways on: ``--fresh`` (the whole sweep) or ``--restart-cells`` (just those cells).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Iterable

from fewshot.errors import ConfigError

#: keys whose change leaves every trial's result as it is
FREE_KEYS = {"name", "output", "tracking", "resources", "max_retries", "data_root", "count_tolerance", "report"}
#: keys compared cell by cell (through the two plans)
CELL_KEYS = {
    "protocol",
    "methods",
    "datasets",
    "shots",
    "by_protocol",
    "seeds",
    "targets",
    "train",
    "search",
    "backbones",
}


@dataclass
class Growth:
    """The outcome of comparing the spec a sweep ran with and the new one."""

    new_cells: list[str] = field(default_factory=list)  #: cells the old plan did not have
    grown_cells: list[str] = field(default_factory=list)  #: cells with more seeds or proposals than before
    refused: list[str] = field(default_factory=list)  #: one line per change that alters a finished trial

    @property
    def grows(self) -> bool:
        return bool(self.new_cells or self.grown_cells)


def _cell_meaning(cell) -> dict:
    """What a cell's finished trials computed with (besides the backbone and device)."""
    s = cell.search
    return {
        "overrides": cell.overrides,
        "targets": list(cell.targets),
        "search.space": {k: v.model_dump(mode="json") for k, v in s.space.items()} if cell.n_trials else {},
        "search.seeds": list(cell.search_seeds),
        "search.metric": s.metric if cell.n_trials else None,
        "search.sampler": s.sampler.model_dump(mode="json") if cell.n_trials else None,
        "search.pruner": s.pruner.model_dump(mode="json") if cell.n_trials else None,
    }


def _show(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def compare(old_spec: dict, new_spec, rows: Iterable[dict]) -> Growth:
    """Compare the normalized spec a sweep ran with (``sweep.json``) and ``new_spec`` given the sweep's finished
    rows; ``Growth.refused`` lists what cannot continue."""
    from orchestrator.planner import plan
    from orchestrator.spec import SweepSpec, parse_spec

    out = Growth()
    new_norm = new_spec.normalized()
    for key in sorted(set(old_spec) | set(new_norm)):
        if key in FREE_KEYS or key in CELL_KEYS:
            continue
        if old_spec.get(key, new_norm.get(key)) != new_norm.get(key):
            out.refused.append(
                f"{key}: {_show(old_spec.get(key))} -> {_show(new_norm.get(key))} changes every trial of the sweep"
            )
    try:
        old_plan = plan(parse_spec({k: v for k, v in old_spec.items() if k in SweepSpec.model_fields}))
    except ConfigError as exc:  # written by a version whose specs this one no longer reads
        out.refused.append(f"the spec the sweep ran with no longer loads ({exc})")
        return out
    new_plan = plan(new_spec)
    done: dict[str, list[dict]] = {}
    for r in rows:
        done.setdefault(r["cell_id"], []).append(r)
    new_cells = {c.cell_id: c for c in new_plan.cells}
    old_ids = {c.cell_id for c in old_plan.cells}
    out.new_cells = [cid for cid in new_cells if cid not in old_ids]
    for old in old_plan.cells:
        finished = done.get(old.cell_id, [])
        new = new_cells.get(old.cell_id)
        if new is None:
            if finished:
                out.refused.append(
                    f"cell {old.cell_id}: has {len(finished)} finished trial(s) but is not in the new "
                    "spec (a sweep only grows)"
                )
            continue
        if new.n_trials > old.n_trials or set(new.final_seeds) - set(old.final_seeds):
            out.grown_cells.append(old.cell_id)
        if not finished:
            continue
        before, after = _cell_meaning(old), _cell_meaning(new)
        for key in before:
            if before[key] != after[key]:
                out.refused.append(
                    f"cell {old.cell_id}: {key} {_show(before[key])} -> {_show(after[key])} "
                    f"({len(finished)} finished trial(s) ran with the first)"
                )
        if new.n_trials < old.n_trials:
            out.refused.append(
                f"cell {old.cell_id}: search n_trials {old.n_trials} -> {new.n_trials} (fewer "
                "proposals than it has run)"
            )
        dropped = sorted(set(old.final_seeds) - set(new.final_seeds))
        if dropped:
            out.refused.append(f"cell {old.cell_id}: final seed(s) {dropped} dropped (a sweep only grows)")
        if new.n_trials > old.n_trials and any(r["stage"] == "final" for r in finished):
            out.refused.append(
                f"cell {old.cell_id}: search n_trials {old.n_trials} -> {new.n_trials} after its final "
                "runs used the best of the first proposals (more could change the best)"
            )
    return out


def refusal(growth: Growth, sweep: str, out_dir) -> ConfigError:
    cells = sorted({line.split(":")[0][len("cell ") :] for line in growth.refused if line.startswith("cell ")})
    shown = "; ".join(growth.refused[:5]) + (f"; and {len(growth.refused) - 5} more" if len(growth.refused) > 5 else "")
    ways = "rerun with --fresh to start the whole sweep over"
    if cells:
        ways += f", or --restart-cells {','.join(cells)} to rerun just those cells"
    return ConfigError(
        f"the spec changed since sweep '{sweep}' started in {out_dir} in a way that alters finished "
        f"trials ({shown}); {ways}, or restore the old spec"
    )


def matching_cells(patterns: str, cell_ids: Iterable[str]) -> list[str]:
    """The cell ids matching any of the comma-separated shell patterns (``fewshot.coop.*``); ConfigError for a
    pattern that matches none."""
    ids = list(cell_ids)
    out: list[str] = []
    for pat in [p.strip() for p in patterns.split(",") if p.strip()]:
        hit = [c for c in ids if fnmatch.fnmatchcase(c, pat)]
        if not hit:
            raise ConfigError(
                f"--restart-cells: '{pat}' matches no cell of the sweep (cells look like "
                f"{ids[0] if ids else 'fewshot.coop.digits.16shot'})"
            )
        out += [c for c in hit if c not in out]
    return out


def delete_studies(journal, cells: list[str]) -> None:
    """Delete the Optuna studies of ``cells`` (restarted cells search from scratch)."""
    from pathlib import Path

    import optuna

    from orchestrator.searcher import _journal

    if not Path(journal).is_file():
        return
    storage = _journal(str(journal))
    names = {s.study_name for s in storage.get_all_studies()}
    for cid in cells:
        if cid in names:
            optuna.delete_study(study_name=cid, storage=storage)
