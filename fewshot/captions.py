"""Per-image text descriptions (TGP-T's content supervision): the dataset folder's ``captions.txt``.

Format (the TGP-T code's, spec methods.md §4.4): one image per line,
``<image path relative to the image dir>\\t<description>[\\t<more fields ignored>]``; blank lines and
lines starting with ``#`` are skipped. The relative path is the one the CoOp ``split_zhou_*.json``
files use (e.g. ``n01440764/n01440764_10026.JPEG``).

* ``read_captions(path) -> {relpath: description}``;
* ``find_captions_file(impaths)`` looks for ``captions.txt`` in the folders above the images (the
  image dir and its parents, up to the dataset folder), returning ``None`` when there is none;
* ``match_captions(impaths, captions) -> {impath: description}`` matches absolute image paths to
  the relative keys by path suffix (so it works whatever the data root is).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from fewshot.errors import DataError

CAPTIONS_FILENAME = "captions.txt"
#: how many folders above an image ``find_captions_file`` looks in (class dir, image dir, dataset dir, ...)
SEARCH_DEPTH = 4


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``{relative image path: description}`` from a captions file; DataError on a malformed line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"captions file {path} does not exist: create it (lines '<image relpath>\\t<description>') or remove the setting"
        )
    out: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
                raise DataError(
                    f"{path}:{lineno}: expected '<image relpath>\\t<description>' (tab-separated), got {line[:80]!r}: fix the line"
                )
            out[_norm(fields[0])] = fields[1].strip()
    return out


def find_captions_file(impaths: Iterable[str]) -> Optional[Path]:
    """The ``captions.txt`` in a folder above the first image (nearest first), or ``None``."""
    for impath in impaths:
        folder = Path(impath).parent
        for _ in range(SEARCH_DEPTH):
            cand = folder / CAPTIONS_FILENAME
            if cand.is_file():
                return cand
            if folder.parent == folder:
                break
            folder = folder.parent
        return None
    return None


def match_captions(impaths: Iterable[str], captions: dict[str, str]) -> dict[str, str]:
    """``{impath: description}`` for the images whose path ends with a caption key (longest key wins)."""
    out: dict[str, str] = {}
    for impath in impaths:
        parts = _norm(impath).split("/")
        for k in range(1, len(parts) + 1):
            key = "/".join(parts[-k:])
            if key in captions:  # longer suffixes are tried later and win
                out[impath] = captions[key]
    return out


def _norm(p: str) -> str:
    s = str(p).strip().replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return s
