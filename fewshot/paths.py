"""Where things live: the data root (``--data-root`` / ``$PROMPTSWEEP_DATA``) and the cache root
(``$PROMPTSWEEP_CACHE``, default ``~/.cache/promptsweep``), plus the project's one atomic file writer
(``atomic_open``: temp file beside the target, fsync, the usual ``0666 & ~umask`` mode, ``os.replace``)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from typing import Callable, Optional

from fewshot.errors import MissingDataError

DOCS = "docs/data.md"
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it)
os.umask(_UMASK)
#: the mode every file written through ``atomic_open`` gets: what ``open()`` would give, not mkstemp's 0600
FILE_MODE = 0o666 & ~_UMASK


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
def atomic_open(path: Path, mode: str = "w", encoding: str | None = None,
                before_replace: Optional[Callable[[], None]] = None):
    """Open a temp file beside ``path``; on success it is fsynced, given ``FILE_MODE`` and
    ``os.replace``d onto ``path`` (``before_replace`` runs just before the rename: a test hook).

    Readers see either no file (or the old one) or the complete new one; concurrent writers of the
    same content are safe (the last rename wins, every version is whole). On an error the temp file
    is removed and ``path`` is untouched. Cache, split and result files all get the mode a plain
    ``open()`` would give them, so whoever may read the directory may read them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
