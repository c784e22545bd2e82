"""Every proposal a cell's search space can make, resolved through the method's own configuration before
anything starts (``--dry-run`` and the sweep's start).

A proposal is one value per active parameter: every combination of the categorical choices and of the two
ends of each numeric range (``low``, ``high``), a conditional parameter only where its ``when`` holds. Each
is resolved as a trial resolves it (the cell's defaults, the spec's overrides, then the proposal:
``orchestrator.trial.build_configs``), validated by ``TrainConfig`` and the method's ``Config``, and checked
against the backbone by the method's ``check_settings`` (a context init that is not ``n_ctx`` tokens, more
tokens than the text context or the image holds, ...) — on a random-init backbone of the sweep's arch, which
has the real tokenizer and shapes. The first proposal a method refuses is one ``ConfigError`` naming the
cell, the parameter values and the method's message. Numbers in between the range ends are not tried: the
methods' constraints are monotone in them (a token count within bounds).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator

from fewshot.errors import ConfigError
from orchestrator.spec import ParamSpec

#: proposals checked per cell at most (the shipped spaces have up to ~5,300)
MAX_PROPOSALS = 200_000


def _values(p: ParamSpec) -> list[Any]:
    if p.type == "categorical":
        return list(p.choices or [])
    ends = [p.low, p.high]
    if p.type == "int":
        ends = [int(v) for v in ends]
    return list(dict.fromkeys(ends))


def proposals(space: dict[str, ParamSpec]) -> Iterator[dict[str, Any]]:
    """Every proposal of ``space`` (see the module docstring), in a stable order."""
    names = list(space)

    def walk(i: int, chosen: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if i == len(names):
            yield dict(chosen)
            return
        name, p = names[i], space[names[i]]
        if p.when and any(parent not in chosen or chosen[parent] not in allowed for parent, allowed in p.when.items()):
            yield from walk(i + 1, chosen)  # inactive here
            return
        for v in _values(p):
            chosen[name] = v
            yield from walk(i + 1, chosen)
            del chosen[name]

    yield from walk(0, {})


def check_plan(plan, backbone=None) -> int:
    """Check every cell of ``plan`` — each proposal of a searched cell, the settings of the others; returns how
    many proposals were checked. ``backbone``: the backbone to check every cell against (default: a random-init
    one of each cell's arch, built once per arch and dropped again)."""
    if backbone is not None:
        return _check(plan.cells, backbone)
    import logging

    from methods.backbone import clear_cache, load_backbone

    by_arch: dict[str, list] = {}
    for cell in plan.cells:
        by_arch.setdefault(cell.backbone.arch if cell.backbone is not None else plan.spec.backbone.arch, []).append(
            cell
        )
    checked = 0
    for arch, cells in by_arch.items():
        logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded": random init is the point
        try:
            bb = load_backbone(arch, None, "cpu")  # the arch's tokenizer and shapes
        finally:
            logging.disable(logging.NOTSET)
        try:
            checked += _check(cells, bb)
        finally:
            clear_cache()  # the driver trains nothing: its memory goes back
    return checked


def _check(cells, backbone) -> int:
    from methods.defaults import resolve
    from methods.registry import get_method
    from orchestrator.trial import TrialRequest, build_configs

    checked, outcome = 0, {}  # (method, the cell's resolved defaults, overrides + proposal) -> refusal or None
    for cell in cells:
        cls = get_method(cell.method)
        defaults = json.dumps(
            resolve(cell.method, cell.dataset, cell.shots, cell.protocol), sort_keys=True, default=str
        )
        space = cell.space if cell.n_trials else {}  # a cell without a search: its own settings, one "proposal"
        for n, params in enumerate(itertools.islice(proposals(space), MAX_PROPOSALS + 1)):
            if n == MAX_PROPOSALS:
                raise ConfigError(
                    f"search.{cell.method}.space: more than {MAX_PROPOSALS} proposals to check in cell "
                    f"{cell.cell_id}; use fewer categorical choices"
                )
            overrides = {**cell.overrides, **params}
            key = (cell.method, defaults, json.dumps(overrides, sort_keys=True, default=str))
            if key not in outcome:
                req = TrialRequest(
                    method=cell.method,
                    dataset=cell.dataset,
                    shots=cell.shots,
                    seed=1,
                    protocol=cell.protocol,
                    overrides=overrides,
                )
                try:
                    _train, method_cfg = build_configs(req, cls)
                    cls.check_settings(method_cfg, backbone)
                    outcome[key] = None
                except ConfigError as exc:
                    outcome[key] = str(exc)
            if outcome[key] is not None:
                if not params:
                    raise ConfigError(f"cell {cell.cell_id}: {cell.method} refuses its settings: {outcome[key]}")
                raise ConfigError(
                    f"search.{cell.method}.space: cell {cell.cell_id} can propose "
                    f"{json.dumps(params, sort_keys=True)}, which {cell.method} refuses: {outcome[key]}"
                )
            checked += 1 if cell.n_trials else 0
    return checked
