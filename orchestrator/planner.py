"""Expands a validated spec into cells (protocol, backbone, method, dataset, shots) and counts their trials.

A cell owns its search space (possibly empty), its number of Optuna proposals, its search and
final seeds, its spec-level training overrides and the method defaults for the searched keys.
``Plan.describe()`` is what ``--dry-run`` prints.

``plan`` also refuses, before anything runs, a cell that could train but not be evaluated: a method
whose classifier is tied to its training classes (TGP-T, SPT with ``head: linear``, the linear probe)
under base2novel, or with a transfer target whose classes are not (a subset of) the source's
(``fewshot.registry.label_subset_of``) — one ``ConfigError`` line naming the cell, the targets and the fix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from fewshot.errors import ConfigError
from fewshot.protocols import OTHER_CLASS_PROTOCOLS
from orchestrator.spec import BackboneSpec, MethodSearch, ParamSpec, SweepSpec


@dataclass(frozen=True)
class Cell:
    protocol: str
    method: str
    dataset: str
    shots: int
    targets: tuple[str, ...]
    search: MethodSearch
    final_seeds: tuple[int, ...]
    overrides: dict[str, Any] = field(hash=False, compare=False)
    #: the cell's backbone (None: the spec's one backbone) and what its id ends with (``SweepSpec.backbone_suffix``)
    backbone: Optional[BackboneSpec] = field(default=None, hash=False, compare=False)
    backbone_suffix: str = ""

    @property
    def cell_id(self) -> str:
        return f"{self.protocol}.{self.method}.{self.dataset}.{self.shots}shot{self.backbone_suffix}"

    @property
    def space(self) -> dict[str, ParamSpec]:
        return self.search.space

    @property
    def n_trials(self) -> int:
        return self.search.n_trials if self.space else 0

    @property
    def search_seeds(self) -> tuple[int, ...]:
        return tuple(self.search.seeds) if self.n_trials else ()

    @property
    def n_search_runs(self) -> int:
        return self.n_trials * len(self.search_seeds)

    @property
    def n_final_runs(self) -> int:
        return len(self.final_seeds)

    def tied_to_training_classes(self) -> bool:
        """Whether the method, with this cell's settings (defaults, the spec's overrides, or any categorical
        choice of its search space), has a classifier tied to its training classes."""
        from pydantic import ValidationError

        from methods.defaults import resolve
        from methods.registry import get_method

        cls = get_method(self.method)
        fields = cls.Config.model_fields
        _, meth = resolve(self.method, self.dataset, self.shots, self.protocol)
        base = {**meth, **{k: v for k, v in self.overrides.items() if k in fields}}
        variants = [base] + [
            {**base, name: choice}
            for name, p in self.space.items()
            if name in fields and p.type == "categorical"
            for choice in p.choices
        ]
        for values in variants:
            try:
                if cls.tied_to_training_classes(cls.Config(**values)):
                    return True
            except ValidationError:  # spec validation reports bad values; nothing to decide here
                continue
        return False

    def default_values(self) -> dict[str, Any]:
        """The method's defaults for this cell (defaults YAML, then the spec's overrides) for the searched keys."""
        from methods.base import TrainConfig
        from methods.defaults import resolve

        train, meth = resolve(self.method, self.dataset, self.shots, self.protocol)
        merged: dict[str, Any] = {}
        fields = dict(TrainConfig.model_fields)
        try:
            from methods.registry import get_method

            fields.update(get_method(self.method).Config.model_fields)
        except Exception:  # method module not importable: TrainConfig fields only
            pass
        for k, f in fields.items():
            if not f.is_required():
                merged[k] = f.get_default(call_default_factory=True)
        merged.update(train)
        merged.update(meth)
        merged.update(self.overrides)
        return {k: merged[k] for k in self.space if k in merged}

    def defaults_in_space(self) -> Optional[dict[str, Any]]:
        """The default values as an Optuna proposal, or None when some default lies outside the space."""
        vals = self.default_values()
        out: dict[str, Any] = {}
        for name, p in self.space.items():
            if p.when and any(out.get(parent, object()) not in allowed for parent, allowed in p.when.items()):
                continue  # inactive conditional parameter
            if name not in vals:
                return None
            v = vals[name]
            if p.type == "categorical":
                if v not in p.choices:
                    return None
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (p.low <= v <= p.high):
                    return None
                if p.type == "int" and v != int(v):
                    return None
                v = int(v) if p.type == "int" else float(v)
            out[name] = v
        return out


@dataclass
class Plan:
    spec: SweepSpec
    cells: list[Cell]

    @property
    def n_search_runs(self) -> int:
        return sum(c.n_search_runs for c in self.cells)

    @property
    def n_final_runs(self) -> int:
        return sum(c.n_final_runs for c in self.cells)

    @property
    def n_trials(self) -> int:
        return self.n_search_runs + self.n_final_runs

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.cell_id == cell_id:
                return c
        raise KeyError(cell_id)

    def describe(self) -> str:
        r = self.spec.resources
        lines = [
            f"sweep '{self.spec.name}': {len(self.cells)} cells, {self.n_trials} trials "
            f"({self.n_search_runs} search + {self.n_final_runs} final); "
            f"per trial cpu={r.cpu:g} gpu={r.gpu:g}"
        ]
        w = max(len(c.cell_id) for c in self.cells)
        lines.append(f"  {'cell':<{w}}  search (proposals x seeds)  final seeds  space")
        for c in self.cells:
            s = f"{c.n_trials} x {len(c.search_seeds)} = {c.n_search_runs}" if c.n_trials else "-"
            lines.append(f"  {c.cell_id:<{w}}  {s:<26}  {len(c.final_seeds):<11}  {', '.join(c.space) or '(defaults)'}")
        return "\n".join(lines)


def check_evaluable(cells: list[Cell]) -> None:
    """ConfigError for the first cell whose method cannot score the classes its protocol evaluates."""
    from fewshot.registry import label_subset_of

    for c in cells:
        if c.protocol not in OTHER_CLASS_PROTOCOLS or not c.tied_to_training_classes():
            continue
        what = (
            f"cell {c.cell_id}: method '{c.method}' (with these settings) has a classifier tied to its "
            f"{c.dataset} training classes"
        )
        if c.protocol == "base2novel":
            raise ConfigError(
                f"{what}, so it cannot score base2novel's novel classes; use a text-based method "
                "(or, for spt, method setting head: text)"
            )
        foreign = [t for t in c.targets if not label_subset_of(t, c.dataset)]
        if foreign:
            raise ConfigError(
                f"{what}, so it cannot score target(s) {', '.join(foreign)}, whose classes are not "
                f"{c.dataset}'s; keep only targets with {c.dataset}'s classes or a subset of them "
                "(ImageNet -> imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r), or use a text-based "
                "method (spt: head: text)"
            )


def plan(spec: SweepSpec) -> Plan:
    """Cells in a stable order: protocol, backbone, method, dataset, shots (the spec's order; a protocol's datasets and
    shots are its ``by_protocol`` entry's where it has one); ConfigError for a cell
    that cannot be evaluated (``check_evaluable``)."""
    cells = []
    for protocol, backbone in itertools.product(spec.protocol, spec.all_backbones()):
        axes = itertools.product(spec.methods, spec.datasets_for(protocol), spec.shots_for(protocol))
        cells += [
            Cell(
                protocol=protocol,
                method=method,
                dataset=dataset,
                shots=shots,
                targets=tuple(spec.targets_for(protocol)),
                search=spec.search_for(method),
                final_seeds=tuple(spec.seeds),
                overrides=spec.train_overrides(method, dataset),
                backbone=backbone,
                backbone_suffix=spec.backbone_suffix(backbone),
            )
            for method, dataset, shots in axes
        ]
    check_evaluable(cells)
    return Plan(spec=spec, cells=cells)
