"""What the command-line tools share.

- :func:`run_tool`: a user error (:class:`~ocz_d2.utils.errors.UserError`, a config error) is
  printed as ``error: <what is wrong and what to do>`` and the tool exits with status 2, without
  a traceback; ``--debug`` or ``OCZ_D2_DEBUG=1`` shows the traceback. Anything else is a bug and
  keeps its traceback.
- :func:`check_overrides`: a flag written after the ``KEY VALUE`` overrides.
- :func:`check_run_inputs`: the datasets, weights and files a run needs, checked before a model
  is built or weights are fetched.
- :func:`setup_run_logging`: log files (and a console that is not a terminal) without colour
  codes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from ..config import ConfigError
from ..data.register_zero_shot import check_datasets
from ..modeling.backbone.cnn import resolve_backbone_weights
from ..utils.errors import ArgumentError, MissingFileError, UserError
from ..utils.io import resolve_data_path, resolve_weights_path
from .checkpoint import check_checkpoint_file

__all__ = [
    "DEBUG_ENV",
    "USER_ERROR_STATUS",
    "check_overrides",
    "check_run_inputs",
    "debug_enabled",
    "is_user_error",
    "run_tool",
    "setup_run_logging",
    "user_message",
]

#: Environment variable that shows the traceback of user errors (any value but "", "0").
DEBUG_ENV = "OCZ_D2_DEBUG"
#: Exit status of a tool stopped by a user error.
USER_ERROR_STATUS = 2


def debug_enabled(flag: bool = False) -> bool:
    """Whether user errors show their traceback: ``--debug`` or ``$OCZ_D2_DEBUG``."""
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


def is_user_error(error: BaseException) -> bool:
    """A problem the user fixes (config, data, weights, arguments), not a bug."""
    return isinstance(error, (UserError, ConfigError))


def user_message(error: BaseException) -> str:
    """The message of a user error; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, which is dropped."""
    text = str(error)
    if "Original Traceback" in text:
        name = type(error).__name__
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            for prefix in (f"{type(error).__module__}.{name}: ", f"{name}: "):
                if lines[i].startswith(prefix):
                    return "\n".join([lines[i][len(prefix) :], *lines[i + 1 :]]).strip()
    return text


def _rank_prefix() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return f"[rank {dist.get_rank()}] "
    except Exception:  # noqa: BLE001  (only a prefix)
        pass
    return ""


def run_tool(func: Callable, *args, debug: bool = False, **kwargs) -> int:
    """Run a tool's body and return its exit status.

    Returns:
        ``func``'s result when it is an int, else 0; :data:`USER_ERROR_STATUS` after a user
        error (printed to stderr as ``error: ...``) or when a worker process of a multi-process
        run exited with that status (it printed its error).

    Raises:
        Any other exception (a bug), and user errors too when :func:`debug_enabled`.
    """
    try:
        result = func(*args, **kwargs)
    except Exception as e:
        if is_user_error(e) and not debug_enabled(debug):
            # The tool's own output (the package logs everything else).
            sys.stderr.write(f"{_rank_prefix()}error: {user_message(e)}\n")
            sys.stderr.flush()
            return USER_ERROR_STATUS
        worker_status = getattr(e, "exit_code", None)  # torch.multiprocessing's exceptions
        if worker_status == USER_ERROR_STATUS and "ProcessExited" in type(e).__name__:
            return USER_ERROR_STATUS  # a worker process printed its user error and exited
        raise
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def check_overrides(opts: Sequence[str], tool: str = "the tool") -> None:
    """Raise if a flag (``--...``) sits among the ``KEY VALUE`` overrides: argparse hands every
    word after the first override to them.

    Raises:
        ArgumentError: naming the flag, with the corrected order.
    """
    flags = [str(w) for w in opts if str(w).startswith("--")]
    if flags:
        raise ArgumentError(
            f"{flags[0]} comes after the config overrides: flags go before them, the KEY VALUE "
            f"pairs last ({tool} --config-file FILE [flags] KEY VALUE ...)"
        )


def check_run_inputs(
    cfg,
    *,
    train: bool,
    eval_only: bool = False,
    resume: bool = False,
    allow_untrained: bool = False,
) -> None:
    """Check what a training or evaluation run needs before any model is built or any weight
    fetched: the datasets (registered, folders present), ``MODEL.WEIGHTS``, local CLIP weights
    and the class-embedding file.

    Args:
        cfg: the run's config (split files already registered).
        train: the run trains (``DATASETS.TRAIN`` is checked).
        eval_only: the run only evaluates: it needs trained weights.
        resume: ``--resume``: the last checkpoint in ``OUTPUT_DIR``, when there is one, replaces
            ``MODEL.WEIGHTS``.
        allow_untrained: accept evaluating untrained heads (smoke tests).

    Raises:
        UserError: the first problem found, with its fix.
    """
    if train:
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
    tag = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
    resumes = resume and os.path.isfile(tag)
    weights = cfg.MODEL.WEIGHTS
    if not resumes and weights and "://" not in weights and not os.path.isfile(weights):
        raise MissingFileError(
            f"MODEL.WEIGHTS {weights!r} does not exist: give a model file (e.g. "
            "output/demo/model_final.pth), or '' to start from the backbone's own weights"
        )
    if resumes:
        with open(tag, encoding="utf-8") as f:
            last = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
        if not os.path.isfile(last):
            raise MissingFileError(
                f"--resume: {tag} names {os.path.basename(last)}, which does not exist: put the "
                f"file back, or delete {tag} to start from MODEL.WEIGHTS"
            )
        check_checkpoint_file(last)
    elif weights:
        check_checkpoint_file(weights)
    if eval_only and not resumes and not weights and not allow_untrained:
        raise ArgumentError(
            "--eval-only needs a trained model, but MODEL.WEIGHTS is empty: add MODEL.WEIGHTS "
            "<file> to the overrides (e.g. output/demo/model_final.pth), or --resume to evaluate "
            "the last checkpoint in OUTPUT_DIR (or --allow-untrained to evaluate random heads, "
            "for smoke tests)"
        )
    ocz = cfg.MODEL.OCZ
    simzss = cfg.MODEL.SIMZSS
    if cfg.MODEL.META_ARCHITECTURE == "SimZSS":
        for key, path in (("VISION", simzss.VISION.WEIGHTS), ("TEXT", simzss.TEXT.WEIGHTS)):
            if not path:
                continue
            resolve_data_path(
                path,
                what=f"MODEL.SIMZSS.{key}.WEIGHTS {path!r}",
                fix="give a local weights file, or '' to use PRETRAINED",
                error=MissingFileError,
            )
    # Every OC-ZSS model holds a CLIP (the backbone, or the frozen one beside a CNN backbone);
    # SimZSS only when its vision tower is CLIP's.
    uses_clip = cfg.MODEL.META_ARCHITECTURE != "SimZSS" or simzss.VISION.SOURCE == "clip"
    try:
        if uses_clip and ocz.CLIP.WEIGHTS:
            resolve_weights_path(ocz.CLIP.WEIGHTS)
        if ocz.RESNET.WEIGHTS:
            resolve_backbone_weights(ocz.RESNET.WEIGHTS)
    except FileNotFoundError as e:
        raise MissingFileError(str(e)) from None
    if ocz.TEXT.EMBEDDINGS_FILE and not os.path.isfile(ocz.TEXT.EMBEDDINGS_FILE):
        raise MissingFileError(
            f"MODEL.OCZ.TEXT.EMBEDDINGS_FILE {ocz.TEXT.EMBEDDINGS_FILE!r} does not exist: fix it, "
            "or set it to '' to embed class names with the text tower"
        )


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _PlainFormatter(logging.Formatter):
    """Another formatter's output without ANSI colour codes."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI_RE.sub("", self.inner.format(record))


class _HideUserErrorTraceback(logging.Filter):
    """Drop Detectron2's "Exception during training:" traceback of a user error (the tool
    prints the message); debug mode keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not is_user_error(error) or debug_enabled()


def setup_run_logging(output_dir: str, rank: int) -> logging.Logger:
    """Set up the loggers of a run as ``default_setup`` will (it then reuses them), with log
    files, and a console that is not a terminal, free of colour codes (``default_setup``
    colours the config dump); a terminal keeps its colours.

    Returns:
        The ``ocz_d2`` logger.
    """
    from detectron2.utils.logger import setup_logger

    # The same calls as Detectron2's default_setup: setup_logger caches on its arguments.
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    ours = setup_logger(output=output_dir, distributed_rank=rank, name="ocz_d2")
    for name in ("fvcore", "detectron2", "ocz_d2"):
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            terminal = stream in (sys.stdout, sys.stderr) and stream.isatty()
            if (
                not terminal
                and handler.formatter
                and not isinstance(handler.formatter, _PlainFormatter)
            ):
                handler.setFormatter(_PlainFormatter(handler.formatter))
    train_loop = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _HideUserErrorTraceback) for f in train_loop.filters):
        train_loop.addFilter(_HideUserErrorTraceback())
    return ours
