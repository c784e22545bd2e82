"""Where things live: the data root (``--data-root`` / ``$PROMPTSWEEP_DATA``) and the cache root
(``$PROMPTSWEEP_CACHE``, default ``~/.cache/promptsweep``), plus the project's one atomic file writer
(``atomic_open``: temp file beside the target, fsync, the usual ``0666 & ~umask`` mode, ``os.replace``, fsync
of the folder). Every file the sweep driver writes (results, report, plots, ``sweep.json``, the MLflow
backlog, the searcher's saved state) and every trial checkpoint goes through it.

``first_escape`` is the one containment rule for listed image paths: each must be free of NUL bytes and
resolve (symbolic links included) inside its image folder's real path. ``check_cache_writable`` refuses,
up front, a cache folder that is not a writable directory."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

from fewshot.errors import ConfigError, MissingDataError

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
        raise MissingDataError(
            f"data root {root} does not exist or is not a directory: create it and put the datasets there (see {DOCS})"
        )
    return root.resolve()


def cache_root() -> Path:
    """``$PROMPTSWEEP_CACHE`` or ``~/.cache/promptsweep``, as an absolute path (not created here)."""
    env = os.environ.get("PROMPTSWEEP_CACHE", "")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "promptsweep").absolute()


def _within(path: str, real_root: str) -> bool:
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)


def _symlinked_names(folder: str, memo: dict) -> frozenset:
    """Names of the symbolic links in ``folder`` (one scandir per folder, from d_type: no stat per file)."""
    if folder not in memo:
        try:
            with os.scandir(folder) as it:
                memo[folder] = frozenset(e.name for e in it if e.is_symlink())
        except OSError:  # a missing folder: its images are reported missing later
            memo[folder] = frozenset()
    return memo[folder]


def first_escape(root: str | os.PathLike, paths: list[str]) -> Optional[tuple[int, str]]:
    """``(index, why)`` of the first of ``paths`` that has a NUL byte or resolves outside ``root`` (both
    resolved with ``os.path.realpath``, so a root that is itself a symbolic link is fine, and a link inside
    it pointing elsewhere is caught); None when all stay inside. Costs one realpath per distinct folder and
    one scandir per folder (to find the links among its files), not a stat per image."""
    real_root = os.path.realpath(root)
    real_dirs: dict[str, str] = {}
    links: dict[str, frozenset] = {}
    for i, path in enumerate(paths):
        if "\0" in path:
            return i, "has a NUL byte in it"
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            real = os.path.realpath(path)
        else:
            real = real_dirs.get(folder)
            if real is None:
                real = real_dirs[folder] = os.path.realpath(folder)
            if _within(real, real_root) and name in _symlinked_names(folder, links):
                real = os.path.realpath(path)
        if not _within(real, real_root):
            return i, f"resolves to {real}, outside {real_root}"
    return None


def _cache_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot serve as a cache (None when it is, or can be made, a writable directory)."""
    try:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is not a directory"
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
        for sub in (p for p in folder.iterdir() if not p.name.startswith(".")):
            if sub.is_dir() and not os.access(sub, os.W_OK | os.X_OK):
                return f"its folder {sub} cannot be written"
    except OSError as exc:
        return f"it cannot be written ({exc.strerror or exc})"
    return None


def check_cache_writable(extra: Iterable[tuple[Path, str]] = ()) -> None:
    """ConfigError naming the folder, its environment variable and the fix unless the cache root (and each
    ``(folder, env var)`` of ``extra``, e.g. the model cache) is a writable directory (created if missing)."""
    for folder, env in [(cache_root(), "PROMPTSWEEP_CACHE"), *extra]:
        why = _cache_problem(Path(folder))
        if why is not None:
            raise ConfigError(
                f"cache folder {folder} (${env}) is unusable: {why}; set {env} to a writable folder "
                "or fix its permissions"
            )


@contextmanager
def atomic_open(
    path: Path, mode: str = "w", encoding: str | None = None, before_replace: Optional[Callable[[], None]] = None
):
    """Open a temp file beside ``path``; on success it is fsynced, given ``FILE_MODE`` and
    ``os.replace``d onto ``path``, and the folder is fsynced so the rename itself survives a power loss
    (``before_replace`` runs just before the rename: a test hook).

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
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename into it) to disk; a file system that cannot fsync a folder
    (some network mounts answer EINVAL) is left to its own guarantees."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
