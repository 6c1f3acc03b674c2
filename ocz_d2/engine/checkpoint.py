"""Checkpoints that are never half-written, and that leave out frozen weights.

A module that holds frozen weights declares them with a ``frozen_weights()`` method (see
:meth:`~ocz_d2.modeling.backbone.clip_prompt.CLIPPromptBackbone.frozen_weights`): ``None``, or
``{"prefix": <state-dict prefix inside the module>, "source": {...}}`` when the weights can be
rebuilt from their source (a pretrained tag or a local file). :class:`AtomicCheckpointer` saves
the model's state without those tensors, plus a record under ``"frozen_weights"``: per module, the
source and a SHA-256 digest of every left-out tensor. Loading checks that the model as built holds
the same frozen tensors (names every difference) and fills them in from the model; a checkpoint
without a record (an older, full one) loads as before.

A file that cannot be read (truncated, empty, not a checkpoint) gives one
:class:`~ocz_d2.utils.errors.CheckpointError` naming the file, its size and the likely cause;
:func:`check_checkpoint_file` finds the common cases before a model is built.
:func:`remove_stale_temporaries` deletes what a killed write left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..utils.errors import CheckpointError, MissingFileError
from ..utils.io import atomic_write, atomic_write_text, is_temporary_name

logger = logging.getLogger(__name__)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that a killed atomic write left in ``folder``.

    Only our own names are touched (``.tmp-<8 random characters>-<file name>``, see
    :func:`~ocz_d2.utils.io.is_temporary_name`). Call it when a run starts in the folder, before
    it writes: no write of this run is then under way.

    Returns:
        The removed paths.
    """
    if not folder or "://" in folder or not os.path.isdir(folder):
        return []
    removed, size = [], 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if is_temporary_name(name) and os.path.isfile(path) and not os.path.islink(path):
            size += os.path.getsize(path)
            os.remove(path)
            removed.append(path)
    if removed:
        logger.info(
            "Removed %d partial file(s) (%.1f MB) of an interrupted checkpoint write in %s: %s",
            len(removed),
            size / 1e6,
            folder,
            ", ".join(os.path.basename(p) for p in removed),
        )
    return removed


def unreadable_checkpoint_message(path: str, error: BaseException) -> str:
    """What is wrong with a checkpoint file that ``torch.load`` failed on, and what to do."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    full = str(error).strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", full)
    if found and size:
        return (
            f"cannot read checkpoint {path} ({size:,} bytes): it holds Python objects "
            f"({found.group(1)}) that torch.load refuses with weights_only=True. Load it yourself "
            "and save its tensors as a plain state dict, or use a checkpoint written by ocz_d2."
        )
    if size == 0:
        return (
            f"cannot read checkpoint {path}: it is empty (0 bytes). It is probably incomplete "
            "(an interrupted download or copy, or a full disk): download or copy it again."
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", full)
    text = detail.group(1) if detail else (full.splitlines()[0] if full else "")
    text = text.split(". ")[0][:160] or type(error).__name__
    return (
        f"cannot read checkpoint {path} ({size:,} bytes): it is truncated or corrupt ({text}). "
        "It is probably incomplete "
        "(an interrupted download or copy, or a full disk): download or copy it again."
    )


def check_checkpoint_file(path: str) -> None:
    """Cheap checks of a local checkpoint before a model is built: it exists, is not empty and,
    for torch's zip format, ends with the archive's directory (a truncated copy does not).

    Raises:
        MissingFileError, CheckpointError: with :func:`unreadable_checkpoint_message`'s text.
    """
    if not path or "://" in path:
        return
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(unreadable_checkpoint_message(path, EOFError()))
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        reason = RuntimeError("the zip archive has no central directory at its end")
        raise CheckpointError(unreadable_checkpoint_message(path, reason))


#: Checkpoint key of the frozen-weights record.
FROZEN_RECORD_KEY = "frozen_weights"


def _digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def frozen_weight_groups(model: torch.nn.Module) -> list[tuple[str, str, dict]]:
    """``(module name, full state-dict prefix, source)`` of every rebuildable frozen group."""
    groups = []
    for name, module in model.named_modules():
        declare = getattr(module, "frozen_weights", None)
        if not callable(declare):
            continue
        info = declare()
        if info:
            groups.append((name, (f"{name}." if name else "") + info["prefix"], info["source"]))
    return groups


def split_frozen_state(model: torch.nn.Module) -> tuple[dict, list[dict]]:
    """The model's state dict without its rebuildable frozen tensors, and their record.

    Returns:
        ``(state, records)``: ``records`` holds per group ``module``, ``prefix``, ``source``,
        ``numel`` and ``sha256`` (tensor name -> digest).
    """
    state = model.state_dict()
    records = []
    for name, prefix, source in frozen_weight_groups(model):
        keys = sorted(k for k in state if k.startswith(prefix))
        records.append(
            {
                "module": name,
                "prefix": prefix,
                "source": dict(source),
                "numel": int(sum(state[k].numel() for k in keys)),
                "sha256": {k: _digest(state[k]) for k in keys},
            }
        )
        for k in keys:
            del state[k]
    return state, records


def check_frozen_record(model: torch.nn.Module, records: list[dict]) -> dict:
    """Check a checkpoint's frozen-weights record against ``model`` as built.

    Returns:
        The frozen tensors to fill in (state-dict name -> tensor, from ``model``).

    Raises:
        CheckpointError (a ValueError): a recorded group is absent or differs; the message
            names the sources and the differing tensors.
    """
    state = model.state_dict()
    groups = {name: (prefix, source) for name, prefix, source in frozen_weight_groups(model)}
    fill = {}
    for rec in records:
        want = rec["source"]
        if rec["module"] not in groups:
            raise CheckpointError(
                f"the checkpoint left out the frozen weights of {rec['module'] or 'the model'} "
                f"({want}) and expects the model to rebuild them, but this model has no "
                "rebuildable frozen weights there (trainable, or random: no pretrained tag or "
                "file): build it with the recorded weights (MODEL.OCZ.CLIP.PRETRAINED / WEIGHTS)."
            )
        prefix, have = groups[rec["module"]]
        keys = sorted(k for k in state if k.startswith(prefix))
        extra = [k for k in keys if k not in rec["sha256"]]
        differ = [k for k in keys if k in rec["sha256"] and _digest(state[k]) != rec["sha256"][k]]
        if extra or differ:
            unknown = f", {len(extra)} not in the record (e.g. {extra[:3]})" if extra else ""
            raise CheckpointError(
                f"frozen weights differ from the checkpoint's: it was trained with {want}, this "
                f"model was built with {have}; {len(differ)} of {len(keys)} tensors differ "
                f"(e.g. {differ[:3]}){unknown}. Set MODEL.OCZ.CLIP.MODEL_NAME / PRETRAINED / "
                "WEIGHTS to the recorded source."
            )
        fill.update({k: state[k] for k in keys})
    return fill


class AtomicCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` whose checkpoint and ``last_checkpoint`` tag are written
    atomically (temporary file + rename).

    fvcore writes the checkpoint in place and then the tag: a kill during a save of a name that
    already exists (``model_final``) would leave a truncated file, and a kill while writing the tag
    an empty tag. Here the tag names only complete files. Remote paths (``s3://``...) fall back to
    the parent's behaviour.

    Frozen weights that the model rebuilds from their source are left out and recorded (see the
    module docstring); ``save_frozen=True`` keeps them (a self-contained file).
    """

    def __init__(self, *args, save_frozen: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_frozen = save_frozen

    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise MissingFileError(
                f"checkpoint {path!r} does not exist: set MODEL.WEIGHTS to a model file (e.g. "
                "output/demo/model_final.pth), or '' to start from the backbone's own weights"
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        """The parent's reading, with an error that names the file, its size and the likely
        cause when the file cannot be read (truncated, empty, not a checkpoint)."""
        try:
            return super()._load_file(filename)
        except Exception as e:
            local = PathManager.get_local_path(filename) if "://" in filename else filename
            raise CheckpointError(unreadable_checkpoint_message(local, e)) from e

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        if not _is_local(save_file):
            return super().save(name, **kwargs)
        if self.save_frozen:
            data = {"model": self.model.state_dict()}
        else:
            state, records = split_frozen_state(self.model)
            data = {"model": state, FROZEN_RECORD_KEY: records}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        self.logger.info("Saving checkpoint to %s", save_file)
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(os.path.basename(save_file))

    def _load_model(self, checkpoint):
        records = checkpoint.get(FROZEN_RECORD_KEY)
        if records:
            fill = check_frozen_record(self.model, records)
            model_state = checkpoint["model"]
            for k, v in fill.items():
                model_state.setdefault(k, v)
            self.logger.info(
                "Frozen weights (%s) taken from the model as built, checked against the record.",
                "; ".join(str(r["source"]) for r in records),
            )
        return super()._load_model(checkpoint)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not _is_local(tag):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(tag, last_filename_basename)


def _is_local(path: str) -> bool:
    return PathManager.get_local_path(path) == path if "://" in path else True
