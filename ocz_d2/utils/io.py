"""File helpers, one per job: atomic writes, file digests, the datasets root.

- :func:`atomic_write` (and its ``_bytes`` / ``_text`` / ``_json`` forms) writes through a
  temporary file in the target's folder, fsyncs it, then renames it over the target: a process
  killed at any moment leaves the old file or the new one, never a truncated file. Temporary
  names are ``.tmp-<8 random characters>-<target name>`` (:func:`is_temporary_name` recognises
  them, so a run can delete what a killed write left behind).
- :func:`file_sha256`: hex SHA-256 of a file.
- :func:`datasets_root` (``$DETECTRON2_DATASETS``, default ``datasets``) and
  :func:`resolve_data_path` ("as given, else under the datasets root"); its use for weights
  files (``MODEL.OCZ.CLIP.WEIGHTS``, ``MODEL.OCZ.RESNET.WEIGHTS``), :func:`resolve_weights_path`.

Standard library only: ``tools/install_detectron2.py`` loads this file by path, before
Detectron2 (which importing the ``ocz_d2`` package needs) exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable
from typing import BinaryIO

__all__ = [
    "DATASETS_ENV",
    "TMP_PREFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "datasets_root",
    "file_sha256",
    "is_temporary_name",
    "resolve_data_path",
    "resolve_weights_path",
]

#: Environment variable naming the folder that relative dataset paths resolve against.
DATASETS_ENV = "DETECTRON2_DATASETS"
#: Prefix of the temporary files of :func:`atomic_write` (``.tmp-<random>-<name>``).
TMP_PREFIX = ".tmp-"
# The random part: 8 characters of [a-z0-9_] (the alphabet of tempfile.mkstemp).
_TMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TMP_RE = re.compile("^" + re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}-.+$")


def is_temporary_name(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary names."""
    return _TMP_RE.match(name) is not None


def _create_temporary(path: str) -> str:
    """Create an empty, unique temporary file beside ``path``; returns its path.

    Unlike ``tempfile.mkstemp`` (mode 0600), the file gets the usual permissions (0666 less the
    umask), which the renamed file keeps: a dataset or checkpoint stays readable by others.
    """
    folder, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tag = "".join(secrets.choice(_TMP_CHARS) for _ in range(8))
        tmp = os.path.join(folder, f"{TMP_PREFIX}{tag}-{name}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename.

    Args:
        path: the file to write (its folder must exist).
        write: called with the temporary file, open for binary writing.

    On any exception (``KeyboardInterrupt`` included) the temporary file is removed, ``path``
    keeps its old content, and the exception propagates.
    """
    tmp = _create_temporary(os.fspath(path))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of ``text`` (UTF-8 unless told; newlines written as given)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> None:
    """:func:`atomic_write` of ``json.dumps(obj, **dumps_kwargs)`` and a final newline."""
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def datasets_root() -> str:
    """Return the folder that relative dataset paths resolve against.

    Returns:
        ``$DETECTRON2_DATASETS`` if set, else ``"datasets"`` (relative to the working directory).
    """
    return os.environ.get(DATASETS_ENV, "datasets")


def resolve_data_path(
    path: str | os.PathLike,
    *,
    what: str,
    fix: str,
    error: Callable[[str], Exception] = FileNotFoundError,
) -> str:
    """The existing file that ``path`` names: as given, else (when relative) under
    :func:`datasets_root`, where data-derived files live.

    Args:
        path: a file path; a relative one is tried in the working directory first.
        what: the start of the error message, e.g. ``"split file 'x.yaml'"``.
        fix: the end of the error message: what to do.
        error: the exception class (or factory) raised when no candidate exists.

    Returns:
        The first existing candidate, as tried (not made absolute).

    Raises:
        ``error("<what> does not exist (looked for [<absolute candidates>]): <fix>")``.
    """
    path = os.fspath(path)
    candidates = [path]
    if not os.path.isabs(path):
        candidates.append(os.path.join(datasets_root(), path))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    looked = [os.path.abspath(c) for c in candidates]
    raise error(f"{what} does not exist (looked for {looked}): {fix}")


def resolve_weights_path(
    weights: str, key: str = "MODEL.OCZ.CLIP.WEIGHTS", fix: str | None = None
) -> str:
    """The existing file that a weights key (``MODEL.OCZ.CLIP.WEIGHTS`` by default) names.

    A relative path is tried in the working directory, then under ``$DETECTRON2_DATASETS``
    (default ``datasets``), where data-derived weights live (the synthetic benchmark's tiny CLIP
    is ``ocz_synthetic/tiny_clip.pt``).

    Args:
        weights: the key's value, a file path.
        key: the config key, named in the error.
        fix: the error's advice; None: CLIP's (a local open_clip state dict, or PRETRAINED).

    Returns:
        The file's absolute path.

    Raises:
        FileNotFoundError: naming every place that was tried.
    """
    if fix is None:
        hint = (
            " Run `python tools/prepare_synthetic.py` to pretrain it."
            if weights.endswith("tiny_clip.pt")
            else ""
        )
        fix = (
            f"fix {key} (a local open_clip state-dict file) or set it to '' to use "
            "MODEL.OCZ.CLIP.PRETRAINED instead." + hint
        )
    found = resolve_data_path(weights, what=f"weights file {key}={weights!r}", fix=fix)
    return os.path.abspath(found)
