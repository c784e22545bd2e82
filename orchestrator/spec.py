"""The sweep spec: ``search_spaces/<name>.yaml`` parsed into validated pydantic models.

Owns the YAML format, its validation (unknown keys, unknown method/dataset names, bad ranges,
impossible protocol/method pairs -> ``ConfigError`` naming the offending key path, e.g.
``search.coop.space.n_ctx.low`` or ``shots[0]``), the normalized form and its hash. Loading is
strict: a key given twice is an error, numbers and booleans are never coerced (``shots: [true]``,
``cpu: "2"``), floats must be finite, seeds lie in 0..2**32-1, and every override value and
every value a search space can propose is checked against the TrainConfig / method Config field.

Format (all keys optional unless marked)::

    name: demo                                   # required; results go to <output>/<name>/
    protocol: fewshot                            # or a list; fewshot|base2novel|cross_dataset|domain_generalization
    methods: [zeroshot, coop]                    # required
    datasets: [digits, shapes]                   # required; the *source* datasets for cross_dataset / DG
    targets: []                                  # evaluation datasets (required for cross_dataset / DG only)
    shots: [1, 2]
    by_protocol:                                 # a protocol's own datasets / shots / targets (else the lists above)
      base2novel: {datasets: [shapes-64], shots: [16]}
    seeds: [1, 2]                                # final-stage seeds
    backbone: {arch: promptsweep-tiny, pretrained: null}
    data_root: null                              # else --data-root / $PROMPTSWEEP_DATA inside the trial
    count_tolerance: 0.01                        # image counts vs the published split sizes; null: no comparison
    device: auto
    train:                                       # TrainConfig / method Config values, as data
      defaults: {epochs: 2}
      methods: {coop: {batch_size: 16}}
      datasets: {shapes: {epochs: 3}}            # precedence: defaults < methods < datasets
    search:
      coop:
        n_trials: 4                              # Optuna proposals per cell
        seeds: [1]                               # search seeds (value = mean val metric over them)
        metric: val_acc
        sampler: {name: tpe, seed: 0, n_startup_trials: 2}
        pruner: {name: none}                     # none | median
        space:
          lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
          n_ctx: {type: int, low: 2, high: 8}
          csc: {type: categorical, choices: [false, true]}
          class_token_position: {type: categorical, choices: [end, front], when: {csc: [true]}}
    resources: {cpu: 1, gpu: 0}                  # per trial; {cpu: 4, trials_per_gpu: 2} packs 2 trials per GPU
    max_retries: 1                               # a crashed trial is retried from its checkpoint
    tracking: {uri: null, experiment: promptsweep}
    output: results
    report:                                      # how report.md / comparisons.arrow read the results (no trial)
      baseline: coop                             # or per protocol: {fewshot: coop, base2novel: zeroshot}
      unstable: {mads: 3.5, min_spread: 2.0, max_std: 5.0}

``report`` changes no trial: it is left out of the spec hash and of the changed-spec check, and a
rerun with another ``report`` section rewrites the statistics tables and the report only.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from fewshot.errors import ConfigError
from fewshot.protocols import PROTOCOLS, TRANSFER_PROTOCOLS, Protocol  # noqa: F401 (also named from here)
from fewshot.registry import COUNT_TOLERANCE
from orchestrator.mlflow_uri import check_uri_scheme

Scalar = bool | int | float | str | None
#: YAML gives native types, so no coercion: ``shots: [true]`` or ``cpu: "2"`` are errors, not 1 and 2.0
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = StrictBool
#: seeds go to numpy / Optuna, which take 0 .. 2**32 - 1
SEED_MAX = 2**32 - 1
#: shots per class: the results' ``shots`` column is an int16, and no split has more images per class
SHOTS_MAX = 10_000
#: Optuna proposals per cell (the results' ``optuna_trial_number`` column is an int32)
N_TRIALS_MAX = 100_000
#: values a spec document may hold once YAML aliases are expanded (a "billion laughs" document is refused)
MAX_SPEC_VALUES = 100_000
#: method settings that are a number of learned text tokens; a prompt holds them plus the start and end tokens
#: and at least one class-name token, so each must be <= the text context length - 3
PROMPT_LENGTH_KEYS = ("n_ctx", "n_ctx_text")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
#: top-level keys that change how results are read, never a trial: out of the spec hash and the changed-spec check
PRESENTATION_KEYS = ("report",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """One searched hyperparameter (an override key of TrainConfig or the method's Config)."""

    type: Literal["int", "float", "categorical"]
    low: Optional[Float] = None
    high: Optional[Float] = None
    log: Bool = False
    step: Optional[Float] = Field(None, gt=0)
    choices: Optional[list[Scalar]] = None
    #: conditional parameter: sampled only when every named (earlier) parameter takes one of the values
    when: Optional[dict[str, list[Scalar]]] = None


class SamplerSpec(_Strict):
    name: Literal["tpe", "random"] = "tpe"
    seed: Int = Field(0, ge=0, le=SEED_MAX)
    n_startup_trials: Int = Field(5, ge=0)


class PrunerSpec(_Strict):
    name: Literal["none", "median"] = "none"
    n_startup_trials: Int = Field(2, ge=0)
    n_warmup_steps: Int = Field(1, ge=0)


class MethodSearch(_Strict):
    n_trials: Int = Field(0, ge=0, le=N_TRIALS_MAX)
    seeds: list[Int] = Field(default_factory=lambda: [1], min_length=1)
    metric: Literal["val_acc"] = "val_acc"
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    space: dict[str, ParamSpec] = Field(default_factory=dict)


class BackboneSpec(_Strict):
    arch: str = Field("promptsweep-tiny", min_length=1)
    pretrained: Optional[str] = None

    def label(self) -> str:
        """``arch:pretrained`` (``random-init`` without weights): the ``backbone`` column of the result files."""
        return f"{self.arch}:{self.pretrained or 'random-init'}"

    def key(self) -> str:
        """A short name safe in cell ids: ``arch`` or ``arch-tag`` (a checkpoint path: its file stem and a hash
        of the whole path, so two files of one name stay apart)."""
        tag = self.pretrained
        if tag and ("/" in tag or "\\" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))):
            digest = hashlib.sha256(tag.encode()).hexdigest()[:6]
            tag = f"{Path(tag).stem}-{digest}"
        text = self.arch if not tag else f"{self.arch}-{tag}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


class TrainSpec(_Strict):
    defaults: dict[str, Any] = Field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ResourcesSpec(_Strict):
    """Per-trial resources. ``trials_per_gpu: k`` packs k trials on each GPU (gpu = 1/k per trial); each
    packed trial's CUDA allocator is capped at its share of the device (``tune_runner.cap_gpu_memory``)."""

    cpu: Float = Field(1.0, gt=0)
    gpu: Float = Field(0.0, ge=0)
    trials_per_gpu: Optional[Int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _pack(self):
        if self.trials_per_gpu is not None:
            share = 1.0 / self.trials_per_gpu
            if self.gpu not in (0.0, share):
                raise ValueError(
                    f"give either gpu or trials_per_gpu (gpu={self.gpu:g} but trials_per_gpu="
                    f"{self.trials_per_gpu} means gpu={share:g})"
                )
            self.gpu = share
        return self


class ProtocolAxes(_Strict):
    """A protocol's own axes, used instead of the spec's top-level ``datasets`` / ``shots`` / ``targets`` for
    that protocol's cells: the field runs few-shot at 1-16 shots but base-to-novel and the transfer protocols
    at 16 shots only, and cross-dataset and domain generalization have different targets."""

    datasets: Optional[list[str]] = Field(None, min_length=1)
    shots: Optional[list[Int]] = Field(None, min_length=1)
    targets: Optional[list[str]] = Field(None, min_length=1)


class UnstableSpec(_Strict):
    """When the report lists a seed or a cell as unstable (``orchestrator.statistics.outlier_seeds``): a seed
    more than ``mads`` scaled MADs (1.4826 x MAD, at least ``min_spread`` accuracy points) from its cell's
    median, or a cell whose std over its seeds exceeds ``max_std`` accuracy points."""

    mads: Float = Field(3.5, gt=0)
    min_spread: Float = Field(2.0, ge=0)
    max_std: Float = Field(5.0, gt=0)


class ReportSpec(_Strict):
    """How the results are read (report.md, comparisons.arrow); no trial depends on it."""

    #: the method every other one is compared with: a method name for all protocols, or ``{protocol: method}``
    #: (its shape is checked by ``_check_baseline``, so that each error names its key)
    baseline: Any = None
    unstable: UnstableSpec = Field(default_factory=UnstableSpec)

    def baseline_for(self, protocol: str) -> Optional[str]:
        if isinstance(self.baseline, dict):
            return self.baseline.get(protocol)
        return self.baseline


class TrackingSpec(_Strict):
    uri: Optional[str] = None
    experiment: str = Field("promptsweep", min_length=1)


class SweepSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    protocol: list[Protocol] = Field(default_factory=lambda: ["fewshot"], min_length=1)
    methods: list[str] = Field(min_length=1)
    datasets: list[str] = Field(min_length=1)
    targets: list[str] = Field(default_factory=list)
    shots: list[Int] = Field(default_factory=lambda: [16], min_length=1)
    by_protocol: dict[Protocol, ProtocolAxes] = Field(default_factory=dict)
    seeds: list[Int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    #: several backbones: cells expand by backbone (``backbone`` then is the first; give one or the other)
    backbones: Optional[list[BackboneSpec]] = Field(None, min_length=1)
    data_root: Optional[str] = Field(None, min_length=1)
    count_tolerance: Optional[Float] = Field(COUNT_TOLERANCE, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: dict[str, MethodSearch] = Field(default_factory=dict)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_retries: Int = Field(1, ge=0)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: str = Field("results", min_length=1)
    report: ReportSpec = Field(default_factory=ReportSpec)

    @field_validator("protocol", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _one_backbone_key(cls, data):
        if not isinstance(data, dict) or data.get("backbones") is None or data.get("backbone") is None:
            return data

        def arch_and_weights(b):
            return (b.get("arch"), b.get("pretrained")) if isinstance(b, dict) else b

        listed = data["backbones"]
        if not (
            isinstance(listed, list) and listed and arch_and_weights(data["backbone"]) == arch_and_weights(listed[0])
        ):
            raise ValueError("give either backbone (one) or backbones (a list), not both")
        return data  # the canonical form names both (backbone = the first of backbones)

    @model_validator(mode="after")
    def _first_backbone(self):
        if self.backbones is not None:
            keys = [b.key() for b in self.backbones]
            twice = sorted({k for k in keys if keys.count(k) > 1})
            if twice:
                raise ValueError(f"backbones: {', '.join(twice)} listed more than once")
            self.backbone = self.backbones[0]
        return self

    # --- derived -------------------------------------------------------------------------
    def normalized(self) -> dict:
        """JSON-able canonical form (defaults filled in) used for the hash and the change check (``backbones``
        only when given, so a one-backbone spec keeps its hash)."""
        out = json.loads(self.model_dump_json())
        if out.get("backbones") is None:
            out.pop("backbones", None)
        return out

    def all_backbones(self) -> list[BackboneSpec]:
        """The backbones cells expand over: ``backbones``, or the one ``backbone``."""
        return list(self.backbones) if self.backbones is not None else [self.backbone]

    def backbone_suffix(self, backbone: BackboneSpec) -> str:
        """What a cell id of ``backbone`` ends with: nothing for the first backbone (so a sweep that adds
        backbones keeps its cells), ``@<key>`` for the others."""
        return "" if backbone.key() == self.all_backbones()[0].key() else f"@{backbone.key()}"

    def spec_hash(self) -> str:
        """Hash of what the trials are: the normalized spec less ``PRESENTATION_KEYS``."""
        trials = {k: v for k, v in self.normalized().items() if k not in PRESENTATION_KEYS}
        return hashlib.sha256(json.dumps(trials, sort_keys=True).encode()).hexdigest()[:16]

    def _axis(self, protocol: str, key: str) -> list:
        own = self.by_protocol.get(protocol)
        value = getattr(own, key) if own is not None else None
        return list(value) if value is not None else list(getattr(self, key))

    def datasets_for(self, protocol: str) -> list[str]:
        """The (source) datasets of ``protocol``'s cells: its ``by_protocol`` entry, else ``datasets``."""
        return self._axis(protocol, "datasets")

    def shots_for(self, protocol: str) -> list[int]:
        return self._axis(protocol, "shots")

    def targets_for(self, protocol: str) -> list[str]:
        """Evaluation targets of a transfer protocol (empty for the others)."""
        return self._axis(protocol, "targets") if protocol in TRANSFER_PROTOCOLS else []

    def all_datasets(self) -> list[str]:
        """Every source dataset of the sweep, in first-use order."""
        return list(dict.fromkeys(d for p in self.protocol for d in self.datasets_for(p)))

    def all_targets(self) -> list[str]:
        """Every transfer target of the sweep, in first-use order."""
        return list(dict.fromkeys(t for p in self.protocol for t in self.targets_for(p)))

    def search_for(self, method: str) -> MethodSearch:
        return self.search.get(method) or MethodSearch()

    def train_overrides(self, method: str, dataset: str) -> dict[str, Any]:
        """Spec-level training/method overrides for a cell: defaults < methods[m] < datasets[d]."""
        out = dict(self.train.defaults)
        out.update(self.train.methods.get(method, {}))
        out.update(self.train.datasets.get(dataset, {}))
        return out


# --- loading ----------------------------------------------------------------------------------

ROOT = "spec"  #: the key path of the whole document in messages


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are not duplicates
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: PyYAML reports it below
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _refuse_set(loader, node):
    raise yaml.constructor.ConstructorError(
        None,
        None,
        "a set (!!set) is not allowed (its order differs between runs): write a list [a, b]",
        node.start_mark,
    )


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:set", _refuse_set)


def _count_values(data: Any, limit: int) -> int:
    """How many values ``data`` holds with YAML aliases expanded (a node shared through an alias counts each
    time it is used), computed once per distinct node and capped at ``limit + 1``, so a document whose aliases
    nest into billions of values is measured in a few steps. A node that contains itself (a recursive alias)
    counts once: the field it sits in refuses it."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # while it is being measured: a reference back to it counts once
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total = min(limit + 1, total + size(child))
            if total > limit:
                break
        sizes[key] = total
        return total

    try:
        return size(data)
    except RecursionError:  # nested deeper than Python recurses: the model validation reports it
        return 0


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def _sub(path: str, key: Any) -> str:
    """``path`` + one mapping key: ``a.b``; a key that is empty or holds other characters is quoted, ``a["x y"]``."""
    if isinstance(key, str) and not _PLAIN_KEY.match(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else str(key)


def _path(parts: list[tuple[str, Any]]) -> str:
    """``[("key", "shots"), ("index", 0)]`` -> ``shots[0]``; the empty path is ``spec``."""
    out = ""
    for kind, p in parts:
        out = f"{out}[{p}]" if kind == "index" else _sub(out, p)
    return out or ROOT


def _walk(data: Any, loc: tuple) -> tuple[list[tuple[str, Any]], Any]:
    """Follow a pydantic error location through the *input*: the parts that exist there and the node reached.

    Parts the input does not have (union member tags such as ``bool``, ``[key]``, the list index
    pydantic adds after turning ``protocol: x`` into ``[x]``) are skipped, so the path always
    names something the user wrote.
    """
    parts: list[tuple[str, Any]] = []
    node = data
    for p in loc:
        if isinstance(node, dict) and _has_key(node, p):
            parts.append(("key", p))
            node = node[p]
        elif isinstance(node, (list, tuple)) and isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(node):
            parts.append(("index", p))
            node = node[p]
    return parts, node


def _has_key(node: dict, key: Any) -> bool:
    try:
        return key in node
    except TypeError:  # unhashable location part
        return False


def _unwrap(tp: Any) -> Any:
    """``Optional[X]`` / ``Annotated[X, ...]`` -> ``X``."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _model_keys(parts: list[tuple[str, Any]]) -> Optional[list[str]]:
    """The valid keys of the model the path ``parts`` points into (None if it is not a model)."""
    tp: Any = SweepSpec
    for kind, p in parts:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            f = tp.model_fields.get(p) if kind == "key" else None
            if f is None:
                return None
            tp = _unwrap(f.annotation)
        elif typing.get_origin(tp) in (dict, list):
            tp = _unwrap(typing.get_args(tp)[-1])
        else:
            return None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return None


def _got(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


_TYPE_WORDS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping of keys",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}


def _format_validation_error(err: ValidationError, data: Any) -> str:
    """One line ``<key path>: <what is wrong> (got <value>)`` for the first error pydantic found."""
    e = err.errors()[0]
    loc, typ, value = tuple(e["loc"]), e["type"], e.get("input")
    parts, _ = _walk(data, loc)
    if typ == "missing":
        return f"{_path(parts + [('key', loc[-1])])}: required key is missing"
    where = _path(parts)
    if typ == "extra_forbidden":
        valid = _model_keys(parts[:-1])
        hint = f"valid keys here: {', '.join(valid)}" if valid else "check the spelling"
        return f"{where}: unknown key ({hint}; see orchestrator/spec.py for the format)"
    if typ == "invalid_key" or "[key]" in loc:
        return f"{where}: keys must be strings (got key {_got(value if typ != 'invalid_key' else loc[-1])})"
    if typ == "list_type":
        hint = f"; write [{value}]" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        return f"{where}: must be a list (got {_got(value)}{hint})"
    if typ == "string_pattern_mismatch" and parts == [("key", "name")]:
        return (
            f"name: must start with a letter or digit and contain only letters, digits, '_', '.' and '-' "
            f"(it names the results folder; got {_got(value)})"
        )
    if typ == "literal_error":
        return f"{where}: must be one of {e.get('ctx', {}).get('expected', '?')} (got {_got(value)})"
    if typ == "recursion_loop":
        return f"{where}: a YAML alias refers to itself (remove the anchor/alias loop)"
    what = _TYPE_WORDS.get(typ) or e["msg"].replace("Input should be", "must be")
    return f"{where}: {what} (got {_got(value)})"


def _dupes(values: list) -> list:
    return sorted({v for v in values if values.count(v) > 1}, key=str)


def _override_keys(method: str) -> Optional[set[str]]:
    """Valid override keys for a method (TrainConfig + its Config), or None if it cannot be imported yet."""
    fields = _override_fields(method)
    return None if fields is None else set(fields)


def _override_fields(method: str) -> Optional[dict]:
    """``{key: (model, FieldInfo)}`` for TrainConfig and the method's Config; None if the method cannot be imported."""
    from methods.base import TrainConfig
    from methods.registry import get_method

    try:
        cls = get_method(method)
    except ConfigError:
        raise
    except Exception:  # method module not importable (yet): only TrainConfig keys can be checked
        return None
    out = {k: (TrainConfig, f) for k, f in TrainConfig.model_fields.items()}
    out.update({k: (cls.Config, f) for k, f in cls.Config.model_fields.items()})
    return out


@lru_cache(maxsize=None)
def _field_adapter(model: type, key: str) -> TypeAdapter:
    f = model.model_fields[key]  # validated with the model's own float rule (the config models refuse inf / NaN)
    return TypeAdapter(
        Annotated[f.annotation, f], config=ConfigDict(allow_inf_nan=model.model_config.get("allow_inf_nan", True))
    )


def _value_problem(method: str, key: str, value: Any) -> Optional[str]:
    """Why ``value`` is not a valid ``key`` for ``method`` (field type and bounds only), or None."""
    fields = _override_fields(method)
    if fields is None or key not in fields:
        return None
    model, _ = fields[key]
    try:
        _field_adapter(model, key).validate_python(value)
    except ValidationError as err:
        e = err.errors()[0]
        what = _TYPE_WORDS.get(e["type"]) or e["msg"].replace("Input should be", "must be")
        return f"{what} for '{method}' (got {_got(value)})"
    except Exception as exc:  # a value pydantic cannot even inspect
        return f"is not a valid value for '{method}' ({type(exc).__name__}; got {_got(value)})"
    return None


def _method_protocols(method: str) -> Optional[tuple[str, ...]]:
    from methods.registry import get_method

    try:
        return tuple(get_method(method).protocols)
    except ConfigError:
        raise
    except Exception:
        return None


def _check_param(path: str, p: ParamSpec, earlier: list[str], space: dict[str, ParamSpec]) -> None:
    if p.type in ("int", "float"):
        if p.low is None:
            raise ConfigError(f"{path}.low: required key is missing (a {p.type} parameter needs low and high)")
        if p.high is None:
            raise ConfigError(f"{path}.high: required key is missing (a {p.type} parameter needs low and high)")
        if p.low >= p.high:
            raise ConfigError(f"{path}.low: must be smaller than high (got low={p.low}, high={p.high})")
        if p.log and p.low <= 0:
            raise ConfigError(f"{path}.low: must be > 0 when log is true (got {p.low})")
        if p.log and p.step is not None:
            raise ConfigError(f"{path}.step: cannot be combined with log: true (remove one of them)")
        if p.type == "int":
            for k in ("low", "high", "step"):
                v = getattr(p, k)
                if v is not None and v != int(v):
                    raise ConfigError(f"{path}.{k}: must be an integer for an int parameter (got {v})")
        if p.step is not None and p.step > p.high - p.low:
            raise ConfigError(f"{path}.step: larger than the range high - low = {p.high - p.low:g} (got {p.step})")
        if p.choices is not None:
            raise ConfigError(f"{path}.choices: only valid for type: categorical")
    else:
        if p.choices is None:
            raise ConfigError(
                f"{path}.choices: required key is missing (a categorical parameter needs a non-empty list)"
            )
        if not p.choices:
            raise ConfigError(f"{path}.choices: a categorical parameter needs a non-empty list of choices")
        if _dupes(p.choices):
            raise ConfigError(f"{path}.choices: duplicate values {_dupes(p.choices)}")
        for k in ("low", "high", "step"):
            if getattr(p, k) is not None:
                raise ConfigError(f"{path}.{k}: not valid for type: categorical (use choices)")
        if p.log:
            raise ConfigError(f"{path}.log: not valid for type: categorical")
    for parent, values in (p.when or {}).items():
        if parent not in earlier:
            raise ConfigError(
                f"{_sub(path + '.when', parent)}: must name a parameter defined earlier in the same space "
                f"(defined before: {earlier or 'none'})"
            )
        if not values:
            raise ConfigError(f"{_sub(path + '.when', parent)}: needs a non-empty list of values")
        pp = space[parent]
        if pp.type == "categorical":
            bad = [v for v in values if v not in pp.choices]
            if bad:
                raise ConfigError(
                    f"{_sub(path + '.when', parent)}: values {bad} are not among {parent}'s choices {pp.choices}"
                )


def _check_param_values(path: str, method: str, name: str, p: ParamSpec) -> None:
    """Every value the sampler can propose must be a valid setting: bounds / choices checked against the field."""
    if p.type == "categorical":
        for i, v in enumerate(p.choices or []):
            why = _value_problem(method, name, v)
            if why:
                raise ConfigError(f"{path}.choices[{i}]: {why}")
        return
    cast = int if p.type == "int" else float
    for k in ("low", "high"):
        why = _value_problem(method, name, cast(getattr(p, k)))
        if why:
            raise ConfigError(f"{path}.{k}: {why}")
    if p.type == "float" and p.step is None:
        inner = 0.63 * p.low + 0.37 * p.high  # (no overflow for huge bounds)
        if _value_problem(method, name, inner) and not _value_problem(method, name, int(round(inner))):
            raise ConfigError(f"{path}.type: '{name}' of '{method}' takes integers; use type: int")


def _check_seeds(path: str, seeds: list[int]) -> None:
    for i, s in enumerate(seeds):
        if not 0 <= s <= SEED_MAX:
            raise ConfigError(f"{path}[{i}]: a seed must be in 0..{SEED_MAX} (got {_got_int(s)})")


def _got_int(v: int) -> str:
    """An integer for a message: a huge one is shown by its digit count, not in full."""
    text = str(v)
    return text if len(text) <= 24 else f"an integer of {len(text)} digits"


def _check_prompt_lengths(spec: SweepSpec) -> None:
    """Every prompt length a cell can train with (an override value, the largest value a search space can
    propose) must fit the backbone's text context; the methods' own defaults are checked in the trial."""
    from methods.backbone import text_context_length

    for backbone in spec.all_backbones():
        _check_prompt_lengths_for(spec, backbone.arch, text_context_length(backbone.arch))


def _check_prompt_lengths_for(spec: SweepSpec, arch: str, ctx: Optional[int]) -> None:
    if ctx is None:
        return
    limit = ctx - 3
    sections = [
        ("train.defaults", spec.train.defaults),
        *[(_sub("train.methods", m), v) for m, v in spec.train.methods.items()],
        *[(_sub("train.datasets", d), v) for d, v in spec.train.datasets.items()],
    ]
    found = [(_sub(path, k), values[k]) for path, values in sections for k in PROMPT_LENGTH_KEYS if k in values]
    for m, s in spec.search.items():
        for k in PROMPT_LENGTH_KEYS:
            p = s.space.get(k)
            if p is None:
                continue
            if p.type == "categorical":
                found += [
                    (f"{_sub(_sub('search', m) + '.space', k)}.choices[{i}]", v) for i, v in enumerate(p.choices or [])
                ]
            elif p.high is not None:
                found.append((f"{_sub(_sub('search', m) + '.space', k)}.high", p.high))
    for path, v in found:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > limit:
            raise ConfigError(
                f"{path}: {v:g} learned tokens do not fit the text context of {arch} "
                f"({ctx} tokens, of which the start and end tokens and at least one class-name token "
                f"need 3): use at most {limit}"
            )


def _check_backbone(spec: SweepSpec) -> None:
    try:
        from methods.backbone import available_archs

        archs = available_archs()
    except Exception:  # open_clip not importable here: the trial reports it
        return
    for i, backbone in enumerate(spec.all_backbones()):
        _check_one_backbone(spec, backbone, "backbone" if spec.backbones is None else f"backbones[{i}]", archs)


def _check_one_backbone(spec: SweepSpec, backbone: BackboneSpec, where: str, archs: list[str]) -> None:
    arch = backbone.arch
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=5)
        raise ConfigError(
            f"{where}.arch: unknown architecture '{arch}' (open_clip names such as ViT-B-16, "
            f"ViT-B-32, promptsweep-tiny{'; similar: ' + ', '.join(close) if close else ''})"
        )
    from fewshot.errors import CheckpointError
    from methods.backbone import PROJECT_TAG, _resolve_pretrained

    if backbone.pretrained != PROJECT_TAG:
        try:  # a checkpoint path must name an existing file now, not fail every trial later
            _resolve_pretrained(arch, backbone.pretrained)
        except CheckpointError as exc:
            raise ConfigError(f"{where}.pretrained: {exc}") from None
    from methods.families import family_of_arch, refusal
    from methods.registry import get_method

    family = family_of_arch(arch)  # the prompt path runs this tower family exactly, or the spec is refused
    for i, m in enumerate(spec.methods):
        why = refusal(get_method(m), arch, family)
        if why:
            raise ConfigError(f"{f'{where}.arch' if family.name is None else f'methods[{i}]'}: {why}")


def _check_shots(path: str, shots: list[int]) -> None:
    for i, s in enumerate(shots):
        if s < 1:
            raise ConfigError(f"{path}[{i}]: must be >= 1 (got {s})")
        if s > SHOTS_MAX:
            raise ConfigError(f"{path}[{i}]: must be <= {SHOTS_MAX} images per class (got {_got_int(s)})")


def validate(spec: SweepSpec) -> SweepSpec:
    """Semantic checks pydantic cannot express; raises ``ConfigError`` naming the key path."""
    from fewshot.offline import is_offline
    from fewshot.registry import dataset_names
    from methods.registry import method_names

    known_methods, known_datasets = method_names(), dataset_names()
    for key in ("methods", "datasets", "targets", "shots", "seeds"):
        d = _dupes(getattr(spec, key))
        if d:
            raise ConfigError(f"{key}: duplicate entries {d}")
    if _dupes(spec.protocol):
        raise ConfigError(f"protocol: duplicate entries {_dupes(spec.protocol)}")
    for i, m in enumerate(spec.methods):
        if m not in known_methods:
            raise ConfigError(f"methods[{i}]: unknown method '{m}' (valid: {', '.join(known_methods)})")
    for key in ("datasets", "targets"):
        for i, d in enumerate(getattr(spec, key)):
            if d not in known_datasets and not is_offline(d):  # shapes-<N> variants are datasets too
                raise ConfigError(f"{key}[{i}]: unknown dataset '{d}' (valid: {', '.join(known_datasets)}, shapes-<N>)")
    _check_shots("shots", spec.shots)
    _check_seeds("seeds", spec.seeds)
    for p, axes in spec.by_protocol.items():
        where = _sub("by_protocol", p)
        if p not in spec.protocol:
            raise ConfigError(
                f"{where}: protocol '{p}' is not in protocol {spec.protocol} (remove it or add the protocol)"
            )
        if axes.targets is not None and p not in TRANSFER_PROTOCOLS:
            raise ConfigError(f"{where}.targets: only valid for cross_dataset or domain_generalization (remove it)")
        for key in ("datasets", "shots", "targets"):
            d = _dupes(getattr(axes, key) or [])
            if d:
                raise ConfigError(f"{where}.{key}: duplicate entries {d}")
        for key in ("datasets", "targets"):
            for i, d in enumerate(getattr(axes, key) or []):
                if d not in known_datasets and not is_offline(d):
                    raise ConfigError(
                        f"{where}.{key}[{i}]: unknown dataset '{d}' (valid: {', '.join(known_datasets)}, shapes-<N>)"
                    )
        if axes.shots is not None:
            _check_shots(f"{where}.shots", axes.shots)
    transfer = [p for p in spec.protocol if p in TRANSFER_PROTOCOLS]
    # transfer protocols without targets of their own take the top-level list
    shared = [p for p in transfer if (spec.by_protocol.get(p) or ProtocolAxes()).targets is None]
    if shared and "targets" not in spec.model_fields_set:
        raise ConfigError(
            f"targets: required key is missing (protocol {shared[0]} needs a list of target "
            f"datasets to evaluate on, here or as by_protocol.{shared[0]}.targets)"
        )
    if shared and not spec.targets:
        raise ConfigError(f"targets: protocol {shared[0]} needs a non-empty list of target datasets to evaluate on")
    if spec.targets and not shared:
        why = (
            "every transfer protocol has by_protocol targets of its own"
            if transfer
            else "only valid with protocol cross_dataset or domain_generalization"
        )
        raise ConfigError(f"targets: {why} (remove it)")
    if spec.resources.gpu > 1 and spec.resources.gpu != int(spec.resources.gpu):
        raise ConfigError(f"resources.gpu: fractions are only allowed below 1 (got {spec.resources.gpu})")
    if spec.device == "cuda" and spec.resources.gpu == 0:
        raise ConfigError(
            "device: cuda needs a GPU per trial, but resources.gpu is 0 (set resources.gpu: 1, or "
            "trials_per_gpu, or device: auto / cpu)"
        )
    if spec.tracking.uri is not None:
        check_uri_scheme(spec.tracking.uri, "tracking.uri")

    for i, m in enumerate(spec.methods):
        protos = _method_protocols(m)
        if protos is not None:
            for p in spec.protocol:
                if p not in protos:
                    raise ConfigError(
                        f"methods[{i}]: method '{m}' does not support protocol '{p}' (it supports: "
                        f"{', '.join(protos)}; see python -m methods list)"
                    )
    _check_backbone(spec)
    _check_prompt_lengths(spec)
    for section in ("methods", "datasets"):
        names = known_methods if section == "methods" else known_datasets
        chosen = spec.methods if section == "methods" else spec.all_datasets() + spec.all_targets()
        for name in getattr(spec.train, section):
            if name not in names and not (section == "datasets" and is_offline(name)):
                raise ConfigError(
                    f"{_sub('train.' + section, name)}: unknown {section[:-1]} (valid: {', '.join(names)})"
                )
            if name not in chosen:
                raise ConfigError(
                    f"{_sub('train.' + section, name)}: '{name}' is not in the sweep's {section} (remove it or add it)"
                )

    def check_keys(path: str, values: dict, methods_: list[str]):
        for m in methods_:
            valid = _override_keys(m)
            if valid is None:
                continue
            for k in values:
                if k not in valid:
                    raise ConfigError(
                        f"{_sub(path, k)}: not a training or '{m}' hyperparameter (valid: {', '.join(sorted(valid))})"
                    )
                if isinstance(values, dict):
                    why = _value_problem(m, k, values[k])
                    if why:
                        raise ConfigError(f"{_sub(path, k)}: {why}")

    from methods.defaults import schedule_overrides

    for m in spec.methods:  # epochs and max_iters for one cell: one of them would be silently ignored
        space = spec.search_for(m).space
        searched = {k: _sub(_sub("search", m) + ".space", k) for k in ("epochs", "max_iters") if k in space}
        for d in spec.all_datasets():
            try:
                schedule_overrides({**spec.train_overrides(m, d), **searched})
            except ConfigError as exc:
                raise ConfigError(f"train (method {m}, dataset {d}): {exc}") from None
    check_keys("train.defaults", spec.train.defaults, spec.methods)
    for m, vals in spec.train.methods.items():
        check_keys(_sub("train.methods", m), vals, [m])
    for d, vals in spec.train.datasets.items():
        check_keys(_sub("train.datasets", d), vals, spec.methods)

    for m, s in spec.search.items():
        sp = _sub("search", m)
        if m not in spec.methods:
            raise ConfigError(f"{sp}: '{m}' is not in methods {spec.methods} (remove it or add the method)")
        if _dupes(s.seeds):
            raise ConfigError(f"{sp}.seeds: duplicate entries {_dupes(s.seeds)}")
        _check_seeds(f"{sp}.seeds", s.seeds)
        if s.space and "n_trials" not in s.model_fields_set:
            raise ConfigError(f"{sp}.n_trials: required key is missing (a search space needs n_trials >= 1)")
        if s.space and s.n_trials < 1:
            raise ConfigError(f"{sp}.n_trials: must be >= 1 when a space is given (got {s.n_trials})")
        if not s.space and s.n_trials > 0:
            where = "space" if "space" in s.model_fields_set else "n_trials"
            raise ConfigError(
                f"{sp}.{where}: n_trials is {s.n_trials} but the space is empty (add parameters or set n_trials: 0)"
            )
        earlier: list[str] = []
        for name, p in s.space.items():
            _check_param(_sub(f"{sp}.space", name), p, earlier, s.space)
            earlier.append(name)
        check_keys(f"{sp}.space", list(s.space), [m])
        for name, p in s.space.items():
            _check_param_values(_sub(f"{sp}.space", name), m, name, p)
    _check_baseline(spec, known_methods)
    return spec


def _check_baseline(spec: SweepSpec, known_methods: list[str]) -> None:
    """``report.baseline``: a method of the sweep, for all protocols or per protocol of the sweep."""
    given = spec.report.baseline
    if given is None:
        return
    if isinstance(given, str):
        named = [("report.baseline", given)]
    elif isinstance(given, dict) and given:
        named = [(_sub("report.baseline", p), m) for p, m in given.items()]
        for protocol, (path, _) in zip(given, named):
            if protocol not in PROTOCOLS:
                raise ConfigError(f"{path}: not a protocol (valid keys here: {', '.join(PROTOCOLS)})")
            if protocol not in spec.protocol:
                raise ConfigError(
                    f"{path}: protocol '{protocol}' is not in protocol {spec.protocol} (remove it or add the protocol)"
                )
    else:
        raise ConfigError(
            f"report.baseline: must be a method name or a mapping {{protocol: method}} (got {_got(given)})"
        )
    for path, method in named:
        if not isinstance(method, str):
            raise ConfigError(f"{path}: must be a method name (got {_got(method)})")
        if method not in known_methods:
            raise ConfigError(f"{path}: unknown method '{method}' (valid: {', '.join(known_methods)})")
        if method not in spec.methods:
            raise ConfigError(
                f"{path}: '{method}' is not in methods {spec.methods} (the baseline must be one of the "
                "sweep's methods: add it or name another)"
            )


def parse_spec(data: Any) -> SweepSpec:
    """Validate an already-loaded YAML mapping."""
    if data is None:
        raise ConfigError(f"{ROOT}: the spec is empty; it needs at least name, methods and datasets")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{ROOT}: the top level must be a mapping of keys (name, methods, datasets, ...), "
            f"got a {type(data).__name__}"
        )
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        msg = _format_validation_error(err, data)  # keys are JSON-quoted and values repr'd: no raw newlines
        raise ConfigError(_one_line(msg)) from None
    try:
        return validate(spec)
    except ConfigError as exc:  # a user value quoted in the message may hold a line break
        if "\n" in str(exc) or "\r" in str(exc):
            raise ConfigError(_one_line(str(exc))) from None
        raise


def _one_line(msg: str) -> str:
    return msg.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate ``path``; every problem is a one-line ``ConfigError``."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"spec file '{path}' is a directory; pass a YAML file such as search_spaces/demo.yaml")
    if not p.is_file():
        raise ConfigError(f"spec file '{path}' does not exist (pass a path like search_spaces/demo.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"spec file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"spec file '{path}' cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}: invalid YAML{where}: {why}") from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors raise these for bad scalars such as `2020-13-01` or `!!int x`
        raise ConfigError(
            f"{path}: invalid YAML: {' '.join(str(exc).split())[:120]} (quote the value if it is meant as a string)"
        ) from None
    if _count_values(data, MAX_SPEC_VALUES) > MAX_SPEC_VALUES:
        raise ConfigError(
            f"{path}: the spec holds more than {MAX_SPEC_VALUES} values once its YAML aliases (*name) "
            "are expanded; write the values out or use fewer aliases"
        )
    if data is None:
        raise ConfigError(f"{ROOT}: the file '{path}' is empty (or only comments); it needs name, methods and datasets")
    return parse_spec(data)
