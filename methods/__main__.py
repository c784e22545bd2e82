"""``python -m methods``: list the registered methods (with the method x backbone-family capability
matrix), classify open_clip's model configs by family, build one method and print its parameter counts,
or pretrain the project's own backbone.

    python -m methods list
    python -m methods families [--all]
    python -m methods info --method coop --arch ViT-B-16 --classes 10 [--dataset D] [--set n_ctx=4 ...] --json
    python -m methods pretrain [--arch promptsweep-mini] [--eval] [--json]

``list`` prints one row per method: its protocols, then ``yes`` / ``-`` per backbone family
(``methods.families``). ``families`` prints each supported family with its open_clip configs, and with
``--all`` every refused config with the reason. ``info`` builds the method on a random-init backbone of ``arch`` with ``C`` dummy class names (the
method's defaults for the dataset, then ``--set`` overrides of its Config fields) and prints
``{"trainable_params", "frozen_params", "breakdown"}``. ``pretrain`` builds (or finds in the cache)
the checkpoint of ``load_backbone(arch, "promptsweep")`` (``methods.pretrain``) and prints its path;
``--eval`` adds the zero-shot accuracies on the offline test splits (``methods.zeroshot_eval``).
User errors: ``error: ...`` on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from fewshot.errors import ConfigError, UserError, error_line

#: ``info --classes``: a model holds a text feature (and CoCoOp / CSC a prompt) per class
MAX_INFO_CLASSES = 100_000


def parse_sets(pairs: list[str]) -> dict:
    """``k=v`` strings -> dict (values parsed as YAML scalars: 4 -> int, null -> None, true -> bool)."""
    out = {}
    for s in pairs or []:
        if "=" not in s:
            raise ConfigError(f"--set expects key=value, got '{s}'")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def _list() -> int:
    from methods.families import FAMILIES, matrix
    from methods.registry import get_method, method_names

    allowed = matrix()
    rows = [["method", "protocols", *FAMILIES]]
    for name in method_names():
        try:
            protocols = ",".join(get_method(name).protocols)
        except ImportError as exc:
            protocols = f"(unavailable: {exc})"
        rows.append([name, protocols, *("yes" if allowed[name][f] else "-" for f in FAMILIES)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\nbackbone families (python -m methods families; every other open_clip config is refused):")
    for f, (_tokens, what) in FAMILIES.items():
        print(f"  {f:<9} {what}")
    return 0


def _families(args) -> int:
    from methods.backbone import available_archs
    from methods.families import FAMILIES, family_of_arch

    found = {a: family_of_arch(a) for a in available_archs()}
    for f in FAMILIES:
        archs = [a for a, fam in found.items() if fam.name == f]
        print(f"{f} ({len(archs)}): {', '.join(archs)}")
    refused = {a: fam.why for a, fam in found.items() if fam.name is None}
    print(f"refused ({len(refused)})" + (":" if args.all else ": python -m methods families --all lists them"))
    if args.all:
        for a, why in refused.items():
            print(f"  {a}: {why}")
    return 0


def _info(args) -> int:
    import torch
    from pydantic import ValidationError

    from methods.backbone import load_backbone
    from methods.defaults import resolve
    from methods.registry import get_method

    torch.manual_seed(0)
    cls = get_method(args.method)
    if not 1 <= args.classes <= MAX_INFO_CLASSES:
        raise ConfigError(f"--classes must be in 1..{MAX_INFO_CLASSES} (got {args.classes})")
    _, meth = resolve(args.method, args.dataset, args.shots, args.protocol)
    sets = parse_sets(args.set)
    unknown = set(sets) - set(cls.Config.model_fields)
    if unknown:
        raise ConfigError(
            f"unknown {args.method} option(s) {sorted(unknown)} (valid: {', '.join(sorted(cls.Config.model_fields))})"
        )
    meth.update(sets)
    try:
        cfg = cls.Config(**meth)
    except ValidationError as exc:
        raise ConfigError(f"invalid {args.method} option: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
    bb = load_backbone(args.arch, None)
    classnames = [f"class {i}" for i in range(args.classes)]
    with torch.no_grad():
        method = cls(bb, classnames, args.dataset, cfg)
    out = {
        "trainable_params": method.num_trainable(),
        "frozen_params": method.frozen_param_count(),
        "breakdown": method.param_breakdown(),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.method} on {args.arch} ({args.classes} classes): trainable {out['trainable_params']:,}, "
            f"frozen {out['frozen_params']:,}"
        )
        for k, v in out["breakdown"].items():
            print(f"  {k}: {v:,}")
    return 0


def _pretrain(args) -> int:
    import hashlib
    import time

    from methods.pretrain import pretrained_checkpoint

    t0 = time.time()
    path = pretrained_checkpoint(args.arch)
    out = {
        "arch": args.arch,
        "checkpoint": str(path),
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "seconds": round(time.time() - t0, 1),
    }
    if args.eval:
        from methods.backbone import load_backbone
        from methods.zeroshot_eval import zero_shot_report

        out["zero_shot"] = zero_shot_report(load_backbone(args.arch, "promptsweep"))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.arch}: {path} ({out['bytes'] / 2**20:.1f} MiB, sha256 {out['sha256'][:16]}...)")
        for name, r in out.get("zero_shot", {}).items():
            print(f"  zero-shot {name:<18} {r['acc']:6.2f} %  (chance {r['chance']:.2f} %, {r['classes']} classes)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m methods", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered methods, their protocols and the backbone families they run on")
    fam = sub.add_parser("families", help="open_clip model configs by backbone family")
    fam.add_argument("--all", action="store_true", help="also list every refused config with the reason")
    info = sub.add_parser("info", help="build a method on a random-init backbone and count its parameters")
    info.add_argument("--method", required=True)
    info.add_argument("--arch", default="ViT-B-16")
    info.add_argument("--classes", type=int, required=True)
    info.add_argument("--dataset", default="imagenet")
    info.add_argument("--shots", type=int, default=16)
    info.add_argument("--protocol", default="fewshot")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    info.add_argument("--json", action="store_true")
    pre = sub.add_parser("pretrain", help="pretrain the project's own backbone (cached; built once)")
    pre.add_argument("--arch", default="promptsweep-mini")
    pre.add_argument("--eval", action="store_true", help="also print zero-shot accuracies on the offline test splits")
    pre.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        return {
            "list": lambda: _list(),
            "families": lambda: _families(args),
            "info": lambda: _info(args),
            "pretrain": lambda: _pretrain(args),
        }[args.cmd]()
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
