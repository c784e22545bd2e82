"""Where things live: the data root (``--data-root`` / ``$PROMPTSWEEP_DATA``) and the cache root
(``$PROMPTSWEEP_CACHE``, default ``~/.cache/promptsweep``), plus atomic file writing."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fewshot.errors import MissingDataError

DOCS = "docs/data.md"


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else ``$PROMPTSWEEP_DATA``; DataError if unset or not a directory."""
    if data_root is None or str(data_root) == "":
        env = os.environ.get("PROMPTSWEEP_DATA", "")
        if not env:
            raise MissingDataError(
                "no data root given: pass --data-root DIR (data_root=...) or set PROMPTSWEEP_DATA "
                f"to the folder holding the CoOp-layout datasets (see {DOCS})"
            )
        data_root = env
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise MissingDataError(f"data root {root} does not exist or is not a directory: create it and put the datasets there (see {DOCS})")
    return root.resolve()


def cache_root() -> Path:
    """``$PROMPTSWEEP_CACHE`` or ``~/.cache/promptsweep``, as an absolute path (not created here)."""
    env = os.environ.get("PROMPTSWEEP_CACHE", "")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "promptsweep").absolute()


@contextmanager
def atomic_open(path: Path, mode: str = "w", encoding: str | None = None):
    """Open a temp file beside ``path``; on success it is fsynced and ``os.replace``d onto ``path``.

    Readers see either no file (or the old one) or the complete new one; concurrent writers of the
    same content are safe (the last rename wins, every version is whole). On an error the temp file
    is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
