"""Checkpoints that are never half-written."""

from __future__ import annotations

import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager


def _atomic_write(path: str, write) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync it, then rename.

    A process killed at any moment leaves either the old file or the new one, never a truncated
    file. ``write(f)`` receives a binary file object.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` whose checkpoint and ``last_checkpoint`` tag are written
    atomically (temporary file + rename).

    fvcore writes the checkpoint in place and then the tag: a kill during a save of a name that
    already exists (``model_final``) would leave a truncated file, and a kill while writing the tag
    an empty tag. Here the tag names only complete files. Remote paths (``s3://``...) fall back to
    the parent's behaviour.
    """

    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {path!r} does not exist: set MODEL.WEIGHTS to a model file (e.g. "
                "output/demo/model_final.pth), or '' to start from the backbone's own weights"
            )
        return super().load(path, *args, **kwargs)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        if not _is_local(save_file):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        self.logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(os.path.basename(save_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not _is_local(tag):
            return super().tag_last_checkpoint(last_filename_basename)
        _atomic_write(tag, lambda f: f.write(last_filename_basename.encode()))


def _is_local(path: str) -> bool:
    return PathManager.get_local_path(path) == path if "://" in path else True
