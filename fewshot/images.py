"""``ImageDataset``: a torch Dataset over Items that loads images with PIL (``.convert("RGB")``),
applies a transform and counts how many images it has read (``.images_read``); ``load_image`` /
``check_image``: open (or just decode-check) one file, a missing or corrupt one is a one-line
``DataError`` naming the file (also when it happens in a DataLoader worker process). Only regular files
are opened: a FIFO, device, socket or directory in an image's place is refused from its ``stat``
(``file_problem``) and the file is opened non-blocking, so a named pipe can never hang a reader.

The counter lives in shared memory, so reads done in DataLoader worker processes are counted too
(fork or spawn); if the dataset is pickled outside process start-up (e.g. sent through Ray), the
copy gets its own counter starting at the current value.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from multiprocessing import context as mp_context
from typing import BinaryIO, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fewshot.errors import DataError, MissingDataError
from fewshot.types import Item


class ImageError(DataError):
    """An image file is unreadable. Rebuilt from its one-line message when a DataLoader worker
    re-raises it in the main process (torch wraps the worker's traceback into the message)."""

    def __init__(self, message: str):
        super().__init__(_unwrap_worker_message(str(message)))


class MissingImageError(ImageError, MissingDataError):
    """An image file listed by the dataset does not exist."""


def _unwrap_worker_message(message: str) -> str:
    """``"Caught X in DataLoader worker process 0.\nOriginal Traceback ...\nmod.X: msg"`` -> ``msg``."""
    if not message.startswith("Caught ") or "Traceback" not in message:
        return message
    last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest.strip() if sep and head.rsplit(".", 1)[-1].endswith("Error") else last.strip()


def _open_error(path: str, exc: BaseException) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return MissingImageError(f"image file {path} is missing: re-download the dataset (see docs/data.md)")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"image file {path} is a directory, not an image: fix the dataset's split/list file")
    if isinstance(exc, PermissionError):
        return ImageError(f"image file {path} cannot be read (permission denied): fix its permissions")
    why = " ".join(str(exc).split())
    # PIL's "cannot identify image file <file object>" adds nothing
    why = "" if path in why or isinstance(exc, UnidentifiedImageError) else why[:100]
    return ImageError(
        f"image file {path} is corrupt or not an image ({exc.__class__.__name__}"
        f"{': ' + why if why else ''}): replace it"
    )


_IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def file_problem(path: str) -> Optional[DataError]:
    """The error for ``path`` unless it is a regular file (following links): missing, a NUL byte in the
    path, or a directory / FIFO / device / socket. A stat only: nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return MissingImageError(f"image file {path} is missing: re-download the dataset (see docs/data.md)")
    except ValueError:  # "embedded null byte"
        return ImageError(f"image path {path!r} has a NUL byte in it: fix the dataset's split/list file")
    except OSError as exc:
        return _open_error(path, exc)
    if not stat.S_ISREG(mode):
        return ImageError(
            f"image file {path} is {_kind(mode)}, not an image file: replace it by the image or fix "
            "the dataset's split/list file"
        )
    return None


def _open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (checked before opening, and again on the open
    descriptor, which is opened non-blocking so a pipe swapped in meanwhile cannot block); else DataError."""
    problem = file_problem(path)
    if problem is not None:
        raise problem
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError(f"image file {path} is {_kind(mode)}, not an image file: replace it by the image")
    return os.fdopen(fd, "rb")


def load_image(path: str) -> Image.Image:
    """Open an image as RGB; DataError naming the file if it is missing or unreadable."""
    try:
        with _open_regular(path) as fh, Image.open(fh) as img:
            return img.convert("RGB")
    except _IMAGE_ERRORS as exc:
        raise _open_error(path, exc) from None


def check_image(path: str, size: int = 64) -> None:
    """Decode ``path`` fully (JPEGs at reduced scale, which is fast but still reads every byte);
    the same DataError as ``load_image`` if it is missing, truncated or not an image."""
    try:
        with _open_regular(path) as fh, Image.open(fh) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
    except _IMAGE_ERRORS as exc:
        raise _open_error(path, exc) from None


def _counter(start: int):
    """A shared int with a lock made in the spawn context: usable by fork and spawn workers alike
    (a lock made in the default fork context cannot be sent to spawned workers)."""
    return mp.get_context("spawn").Value("q", start)


class ImageDataset(Dataset):
    """``(transform(image), label)`` for each Item; ``split`` is a label for logs and errors."""

    def __init__(self, items: list[Item], transform=None, split: str = "train"):
        self.items = list(items)
        self.transform = transform
        self.split = split
        self._reads = _counter(0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        with self._reads.get_lock():
            self._reads.value += 1
        img = load_image(item.impath)
        if self.transform is not None:
            img = self.transform(img)
        return img, item.label

    @property
    def images_read(self) -> int:
        """How many times ``__getitem__`` was called (in this process and its DataLoader workers)."""
        return int(self._reads.value)

    def reset_images_read(self) -> None:
        with self._reads.get_lock():
            self._reads.value = 0

    def __getstate__(self):
        state = self.__dict__.copy()
        if mp_context.get_spawning_popen() is None:  # not a worker start-up: ship a plain number
            state["_reads"] = int(self._reads.value)
        return state

    def __setstate__(self, state):
        reads = state["_reads"]
        if isinstance(reads, int):
            state["_reads"] = _counter(reads)
        self.__dict__.update(state)
