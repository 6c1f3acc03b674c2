"""The trainer base of ocz_d2: Detectron2's ``DefaultTrainer`` that also runs DDP on CPU, writes
checkpoints atomically and keeps the optimizer state in them."""

from __future__ import annotations

import logging
import weakref

from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import AtomicCheckpointer

__all__ = ["ZeroShotTrainerBase"]


class ZeroShotTrainerBase(DefaultTrainer):
    """:class:`DefaultTrainer` with three changes, and otherwise its wiring and hooks:

    - DDP without ``device_ids`` when ``MODEL.DEVICE`` is ``"cpu"`` (gloo processes; Detectron2
      v0.6 passes the current CUDA device);
    - checkpoints and the ``last_checkpoint`` tag written atomically (:class:`AtomicCheckpointer`);
    - the optimizer state (e.g. AdamW moments) saved and restored under ``"_trainer"``, as later
      Detectron2 versions do; v0.6 leaves it out, so a resumed run restarted from empty moments.

    Subclasses supply the data, evaluator, optimizer and schedule through the ``build_*``
    classmethods, as with ``DefaultTrainer`` (see ``tools/train_net.py``).
    """

    def __init__(self, cfg):
        """
        Args:
            cfg: a Detectron2 config (``DefaultTrainer``'s keys; ``auto_scale_workers`` applies).
        """
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = {"broadcast_buffers": False}
        if cfg.MODEL.DEVICE == "cpu":
            ddp_kwargs["device_ids"] = None
        model = create_ddp_model(model, **ddp_kwargs)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def state_dict(self) -> dict:
        """Detectron2's trainer state plus, under ``"_trainer"``, the optimizer's (and the AMP
        grad scaler's) state, unless the installed Detectron2 stores it already."""
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output (``"_trainer"`` is optional: older checkpoints)."""
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
