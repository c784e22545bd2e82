"""Method registry: name -> method class. A new method is one module plus one line here.

Modules are imported lazily so that ``python -m methods list`` and the sweep planner stay cheap.
"""

from __future__ import annotations

import importlib

from fewshot.errors import ConfigError
from methods.base import PromptMethod

#: registry name -> "module:Class"
METHODS: dict[str, str] = {
    "zeroshot": "methods.zeroshot:ZeroShotCLIP",
    "coop": "methods.coop:CoOp",
    "spt": "methods.spt:SPT",
    "linear_probe": "methods.linear_probe:LinearProbe",
    "vpt": "methods.vpt:VPT",
    "cocoop": "methods.cocoop:CoCoOp",
    "maple": "methods.maple:MaPLe",
    "kgcoop": "methods.kgcoop:KgCoOp",
    "tgpt": "methods.tgpt:TGPT",
    "sep": "methods.sep:SEP",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[PromptMethod]:
    """The method class registered as ``name``; a ``ConfigError`` listing valid names otherwise."""
    target = METHODS.get(name)
    if target is None:
        raise ConfigError(f"unknown method '{name}' (valid: {', '.join(method_names())})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
