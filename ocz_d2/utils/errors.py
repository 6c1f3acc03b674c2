"""Errors that the user fixes: a config, data, weights or an argument, not our code.

The tools print such an error's message (which says what is wrong and what to do) and exit with
status 2, without a traceback; ``--debug`` or ``OCZ_D2_DEBUG=1`` shows the traceback (see
:func:`ocz_d2.engine.cli.run_tool`). Any other exception is a bug and keeps its traceback.

Each class also derives from the built-in exception that the code raised before (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` still catches it.
"""

from __future__ import annotations

import os

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "DataError",
    "MissingFileError",
    "UserError",
    "unreadable_file_message",
]


class UserError(Exception):
    """A problem in the user's input (config, data, weights, arguments), with its fix."""


class ArgumentError(UserError, ValueError):
    """A bad argument or config value (an empty ``MODEL.WEIGHTS``, an unknown mode...)."""


class DataError(UserError, ValueError):
    """An unreadable or inconsistent dataset file: image, label, split file, unknown dataset."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that the config or the command line names does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read (truncated, corrupt) or does not fit the model."""


def unreadable_file_message(head: str, path: str, error: BaseException | str) -> str:
    """``"<head>: <error>"``, or, for an empty file (the usual trace of an interrupted copy or
    download), ``"<head>: the file is empty (0 bytes)..."`` with the fix."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        return (
            f"{head}: the file is empty (0 bytes), probably an interrupted copy or download: "
            "copy it again, or remove it"
        )
    return f"{head}: {error}"
