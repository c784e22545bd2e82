"""``python -m fewshot``: ``check`` which datasets are present under the data root, and print a
few-shot ``split`` as JSON. User errors print one ``error: ...`` line and exit with code 2.

``check`` gives each dataset one line: ``present`` (readable, sound labels, no empty split, image
counts within ``--count-tolerance`` of the published sizes, every test image there; with ``--shots``
also every image of those few-shot splits decodes), ``mismatch`` (counts off: the line says which),
``malformed`` (the line names the file and the fix) or ``missing``. Exit 0 only when all are present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fewshot.errors import DataError, MissingDataError, UserError, error_line
from fewshot.offline import is_offline, shapes_class_count
from fewshot.paths import check_cache_writable, resolve_data_root
from fewshot.registry import CATALOG, COUNT_TOLERANCE, dataset_names, load_dataset
from fewshot.sampling import fewshot_split
from fewshot.validate import SizeMismatchError, check_fewshot, check_files_exist, check_labels, check_sizes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see python -m fewshot --help)")


def _expected(name: str):
    if name in CATALOG:
        info = CATALOG[name]
        return info.num_classes, info.sizes
    if name == "digits":
        return 10, None
    return shapes_class_count(name), None


def _count(found: int, expected: int | None) -> str:
    if expected is None:
        return str(found)
    return f"{found}/{expected}" + ("" if found == expected else " !")


def check_one(name: str, data_root, shots=(), seeds=(1, 2, 3), tolerance=COUNT_TOLERANCE) -> tuple[str, str]:
    """``(status, detail)`` with status present | mismatch | missing | malformed (see the module docstring)."""
    try:
        n_cls, sizes = _expected(name)
        ds = load_dataset(name, data_root)
    except MissingDataError as exc:
        return "missing", str(exc)
    except DataError as exc:
        return "malformed", str(exc)
    got = (len(ds.train), len(ds.val), len(ds.test))
    cells = [f"classes {_count(ds.num_classes, n_cls)}"] + [
        f"{part} {_count(g, sizes[i] if sizes else None)}"
        for i, (part, g) in enumerate(zip(("train", "val", "test"), got))
    ]
    counts = "  ".join(cells)
    if ds.num_classes != n_cls:
        return "malformed", counts + f"  (expected {n_cls} classes)"
    has_train = bool(sizes[0]) if sizes else True  # ImageNet's variants are test-only
    try:
        check_labels(ds)
        check_sizes(ds, needs_train=has_train, tolerance=tolerance)
        check_files_exist(ds.test, f"the test split of '{name}'")
        n_images = check_fewshot(ds, [(k, s) for k in shots for s in seeds]) if shots and has_train else None
    except SizeMismatchError as exc:
        return "mismatch", f"{counts}  ({exc})"
    except DataError as exc:
        return "malformed", f"{counts}  ({exc})"
    note = (
        "  (image counts differ from CoOp's split, within the tolerance)"
        if sizes and tuple(got) != tuple(sizes)
        else ""
    )
    if n_images is not None:
        note += f"  ({n_images} few-shot images decode)"
    return "present", counts + note


def cmd_check(args) -> int:
    names = args.datasets or dataset_names(include_offline=False)
    for name in names:
        if name not in CATALOG and not is_offline(name):
            raise DataError(f"unknown dataset '{name}': choose one of {', '.join(dataset_names())} (or shapes-<N>)")
    if any(n in CATALOG for n in names):
        root = resolve_data_root(args.data_root)
        print(f"data root: {root}")
    if args.shots or any(is_offline(n) for n in names):
        check_cache_writable()  # few-shot splits and offline datasets are written there
    ok = True
    width = max(len(n) for n in names)
    for name in names:
        status, detail = check_one(name, args.data_root, args.shots or (), args.seeds, args.count_tolerance)
        ok &= status == "present"
        print(f"{name:<{width}}  {status:<9}  {detail}")
    return 0 if ok else 2


def cmd_split(args) -> int:
    check_cache_writable()  # the split is cached there
    ds = load_dataset(args.dataset, args.data_root)
    split = fewshot_split(ds, args.shots, args.seed)

    def rows(items):
        return [[os.path.relpath(it.impath, ds.image_root), it.label, it.classname] for it in items]

    if args.json:
        print(json.dumps({"train": rows(split.train), "val": rows(split.val)}))
    else:
        print(
            f"{ds.name}: {args.shots}-shot seed {args.seed}: {len(split.train)} train, {len(split.val)} val images, "
            f"{ds.num_classes} classes (paths relative to {ds.image_root}; add --json for the lists)"
        )
    return 0


def _positive_ints(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; each must be an int >= 1."""
    values = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: '{part.strip()}' (use e.g. 1,2,4)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
        values.append(value)
    return values


def _tolerance(text: str):
    """``0.01`` -> 0.01; ``none`` -> None (no comparison)."""
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value: '{text}' (a fraction such as 0.01, or none)") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fewshot", description="promptsweep datasets: check the data root, print few-shot splits"
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("check", help="report which datasets are present / missing / malformed")
    c.add_argument("--data-root", default=None, help="folder holding the datasets (default: $PROMPTSWEEP_DATA)")
    c.add_argument("datasets", nargs="*", help="dataset keys (default: the 15 standard datasets)")
    c.add_argument(
        "--shots",
        type=_positive_ints,
        metavar="K,K,...",
        help="also decode every image of these K-shot train/val splits (e.g. --shots 1,2,4,8,16)",
    )
    c.add_argument(
        "--seeds",
        type=_positive_ints,
        default=[1, 2, 3],
        metavar="S,S,...",
        help="seeds of the splits checked with --shots (default: 1,2,3)",
    )
    c.add_argument(
        "--count-tolerance",
        type=_tolerance,
        default=COUNT_TOLERANCE,
        metavar="F",
        help=f"relative difference allowed between each split's image count and the published size "
        f"(default {COUNT_TOLERANCE}; 'none' skips the comparison, e.g. for a deliberate subset)",
    )
    c.set_defaults(func=cmd_check)
    s = sub.add_parser("split", help="print the K-shot train/val split of a dataset")
    s.add_argument("--dataset", required=True)
    s.add_argument("--shots", type=int, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--data-root", default=None)
    s.add_argument(
        "--json", action="store_true", help="print {'train': [[relpath, label, classname], ...], 'val': [...]}"
    )
    s.set_defaults(func=cmd_split)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return exc.exit_code
