"""User-facing errors shared by all of promptsweep (fewshot is the bottom layer, so they live here).

Every error a user can cause (bad YAML, unknown method or dataset, missing data, unreadable
checkpoint, NaN loss) is raised as a ``UserError`` subclass; the CLIs print its message on one
line and exit with code 2 instead of showing a traceback.
"""

from __future__ import annotations

import re

#: C0 and C1 control characters (ESC starts a terminal escape sequence; CR/LF would break the one line)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class UserError(Exception):
    """An error caused by the user's input; ``str(err)`` is the one-line message to print."""

    exit_code = 2


class ConfigError(UserError):
    """A spec, flag or hyperparameter is invalid."""


class DataError(UserError):
    """A dataset, split file or image is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or weights file is missing or unreadable."""


class TrainingError(UserError):
    """Training failed for a reason the user can act on (e.g. a NaN loss)."""

    def __init__(self, message: str, error_class: str = "training_error"):
        super().__init__(message)
        self.error_class = error_class


class EmptySplitError(DataError):
    """A split that is read has no images (a flat ImageNet val, an emptied split file): an accuracy over
    nothing is an error, never 0 %."""

    error_class = "empty_split"


class MissingDataError(DataError):
    """A data root, dataset folder, split/list file or image that should exist does not."""


def error_line(exc: BaseException) -> str:
    """The one line a CLI prints for a user error: ``error: <message>``, whitespace runs (line breaks
    included) folded to one space and every other control character a user's input can carry (an ANSI
    escape in a method name, a NUL) shown escaped as ``\\x1b``, never sent raw to the terminal."""
    msg = " ".join(str(exc).split())
    return "error: " + _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", msg)
