"""The trainers of ocz_d2: Detectron2's ``DefaultTrainer`` that also runs DDP on CPU, writes
checkpoints atomically, keeps the optimizer state in them and resumes exactly."""

from __future__ import annotations

import logging
import os
import re
import weakref

from detectron2.data import (
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    hooks,
)
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import (
    CaptionDatasetMapper,
    ZeroShotSemSegDatasetMapper,
    build_zero_shot_test_loader,
    is_caption_split,
)
from ..data.train_loader import (
    ResumableTrainLoader,
    build_resumable_train_loader,
    derive_seed,
    seed_all_rngs,
)
from ..evaluation import build_zero_shot_evaluator
from ..utils.errors import CheckpointError
from .checkpoint import AtomicCheckpointer, remove_stale_temporaries
from .optimizer import build_lr_scheduler, build_optimizer
from .tensorboard import PredictionVisualizer

__all__ = ["ZeroShotTrainer", "ZeroShotTrainerBase"]

logger = logging.getLogger(__name__)

#: Trainer-state key of the data seed (kept so that a run with ``SEED < 0`` resumes exactly).
DATA_SEED_KEY = "data_seed"


class ZeroShotTrainerBase(DefaultTrainer):
    """:class:`DefaultTrainer` with these changes, and otherwise its wiring and hooks:

    - DDP without ``device_ids`` when ``MODEL.DEVICE`` is ``"cpu"`` (gloo processes; Detectron2
      v0.6 passes the current CUDA device);
    - checkpoints and the ``last_checkpoint`` tag written atomically (:class:`AtomicCheckpointer`);
      the partial files of a write that was killed are removed when a run starts in the folder;
    - the optimizer state (e.g. AdamW moments) saved and restored under ``"_trainer"``, as later
      Detectron2 versions do; v0.6 leaves it out, so a resumed run restarted from empty moments;
    - ``SOLVER.CHECKPOINT_MAX_TO_KEEP``: only the newest periodic checkpoints stay on disk;
    - ``--resume`` without a checkpoint in ``OUTPUT_DIR`` starts from scratch, as in Detectron2,
      with a warning that names the folder; a resumed run with no iteration left still writes
      ``model_final.pth`` (a kill during its write left the last periodic checkpoint);
    - exact resume: the random state of each iteration is seeded from ``(data seed, iteration,
      rank)``, and a loader with ``set_start`` (see :mod:`ocz_d2.data.train_loader`) restarts
      at the resumed iteration, so a resumed run continues as if it had never stopped. The data
      seed is ``SEED``, or a random one kept in the checkpoints when ``SEED < 0``.

    Subclasses supply the data, evaluator, optimizer and schedule through the ``build_*``
    classmethods, as with ``DefaultTrainer`` (:class:`ZeroShotTrainer` is ocz_d2's).
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
        if comm.is_main_process():
            remove_stale_temporaries(cfg.OUTPUT_DIR)
        # All processes draw it (shared_random_seed gathers): the same data seed everywhere.
        self.data_seed = int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())
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
        self._restart_data(0)

    def build_hooks(self) -> list:
        """Detectron2's hooks, a per-iteration seed first, and the checkpointer of
        :class:`FinishingPeriodicCheckpointer` (``SOLVER.CHECKPOINT_MAX_TO_KEEP``)."""
        ret = [_IterationSeed()]
        for hook in super().build_hooks():
            if type(hook) is hooks.PeriodicCheckpointer:
                hook = FinishingPeriodicCheckpointer(
                    self.checkpointer,
                    self.cfg.SOLVER.CHECKPOINT_PERIOD,
                    max_to_keep=self.cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP or None,
                )
            ret.append(hook)
        return ret

    def resume_or_load(self, resume: bool = True) -> None:
        """Detectron2's, with a warning when ``resume`` finds no checkpoint, and the data
        restarted at the resumed iteration."""
        if resume and not self.checkpointer.has_checkpoint() and comm.is_main_process():
            start = (
                f"MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS}"
                if self.cfg.MODEL.WEIGHTS
                else "the initial weights"
            )
            logger.warning(
                "--resume: no checkpoint in %s (no last_checkpoint file): training starts "
                "from scratch, at iteration 0 from %s",
                os.path.abspath(self.cfg.OUTPUT_DIR),
                start,
            )
        super().resume_or_load(resume=resume)
        self._restart_data(self.start_iter)

    def _restart_data(self, start_iter: int) -> None:
        """Start a resumable loader at ``start_iter`` (others are left alone)."""
        loader = self._trainer.data_loader
        if not hasattr(loader, "set_start"):
            return
        loader.set_start(start_iter, self.data_seed)
        trainer = self._trainer
        if isinstance(getattr(type(trainer), "_data_loader_iter", None), property):
            trainer._data_loader_iter_obj = None  # later Detectron2: created on first use
        else:
            trainer._data_loader_iter = iter(loader)

    def state_dict(self) -> dict:
        """Detectron2's trainer state plus, under ``"_trainer"``, the optimizer's (and the AMP
        grad scaler's) state, unless the installed Detectron2 stores it already, and the data
        seed."""
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        ret[DATA_SEED_KEY] = self.data_seed
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output (``"_trainer"`` and the data seed are optional:
        older checkpoints). A random data seed (``SEED < 0``) is taken from the checkpoint."""
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            try:
                self._trainer.load_state_dict(state_dict["_trainer"])
            except ValueError as e:  # torch: the saved parameter groups do not fit
                raise CheckpointError(
                    f"Cannot resume: the checkpoint's optimizer state does not fit this run's "
                    f"optimizer ({e}). It was written with other SOLVER settings or by an ocz_d2 "
                    "older than its grouping of the parameters by learning rate and weight "
                    "decay. Start from its weights instead: MODEL.WEIGHTS <checkpoint> without "
                    "--resume, in a new OUTPUT_DIR."
                ) from e
        if self.cfg.SEED < 0 and DATA_SEED_KEY in state_dict:
            self.data_seed = int(state_dict[DATA_SEED_KEY])


class _IterationSeed(HookBase):
    """Seed ``random``, ``numpy`` and ``torch`` before each iteration from (data seed,
    iteration, rank): the random draws of iteration t (loss points, dropout...) do not depend
    on what ran before, so a resumed run draws what an uninterrupted one draws."""

    def before_step(self):
        seed_all_rngs(derive_seed(self.trainer.data_seed, self.trainer.iter, comm.get_rank()))


_PERIODIC_RE = re.compile(r"^(?P<prefix>.+)_(?P<iter>\d{7})\.pth$")


class FinishingPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """Detectron2's checkpointing hook, plus:

    - with ``max_to_keep``, the periodic checkpoints of the run before a resume count too (the
      oldest beyond ``max_to_keep`` are removed at the start); ``model_final`` is always kept;
    - a resumed run that has no iteration left (killed while writing ``model_final``, after the
      last periodic checkpoint) writes ``model_final`` from the loaded state.
    """

    def before_train(self):
        super().before_train()
        if not self.max_to_keep or self.trainer.start_iter <= 0:
            return
        folder = self.checkpointer.save_dir
        if not folder or "://" in folder or not os.path.isdir(folder):
            return
        earlier = []
        for name in os.listdir(folder):
            found = _PERIODIC_RE.match(name)
            if found and found["prefix"] == self.file_prefix:
                if int(found["iter"]) < self.trainer.start_iter:
                    earlier.append((int(found["iter"]), os.path.join(folder, name)))
        self.recent_checkpoints = [path for _, path in sorted(earlier)]
        while len(self.recent_checkpoints) > self.max_to_keep:
            old = self.recent_checkpoints.pop(0)
            if os.path.isfile(old):
                os.remove(old)

    def after_train(self):
        trainer = self.trainer
        finished = trainer.iter == trainer.start_iter + 1  # the loop ended without an error
        if trainer.start_iter >= trainer.max_iter and finished:
            final = os.path.join(self.checkpointer.save_dir, f"{self.file_prefix}_final.pth")
            if not os.path.isfile(final):
                logger.info("Resumed at MAX_ITER without %s: writing it", final)
                self.checkpointer.save(
                    f"{self.file_prefix}_final", iteration=trainer.start_iter - 1
                )


class ZeroShotTrainer(ZeroShotTrainerBase):
    """The ocz_d2 data (resumable loader, :class:`ZeroShotSemSegDatasetMapper`), evaluator,
    optimizer and schedule on :class:`ZeroShotTrainerBase`: what ``tools/train_net.py`` runs.

    With ``TEST.VIS_PERIOD`` > 0, every VIS_PERIOD-th evaluation also writes pictures of the
    predictions to TensorBoard (:class:`~ocz_d2.engine.tensorboard.PredictionVisualizer`).
    """

    def build_hooks(self) -> list:
        """The base's hooks; with ``TEST.VIS_PERIOD``, Detectron2's evaluation hook replaced
        by one that also draws the predictions after every VIS_PERIOD-th evaluation."""
        ret = super().build_hooks()
        if not self.cfg.TEST.VIS_PERIOD:
            return ret
        self.prediction_visualizer = PredictionVisualizer(self.cfg)

        def evaluate_and_draw():
            # What DefaultTrainer's hook runs, then the pictures.
            self._last_eval_results = self.test(self.cfg, self.model)
            self.prediction_visualizer.after_evaluation(self.model)
            return self._last_eval_results

        return [
            hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, evaluate_and_draw)
            if type(hook) is hooks.EvalHook
            else hook
            for hook in ret
        ]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators([build_zero_shot_evaluator(dataset_name, output_folder)])

    @classmethod
    def build_train_loader(cls, cfg):
        captions = [is_caption_split(name) for name in cfg.DATASETS.TRAIN]
        if any(captions):
            return cls._caption_train_loader(cfg, all(captions))
        mapper = ZeroShotSemSegDatasetMapper(cfg, True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning(
                "DATALOADER.SAMPLER_TRAIN=%s: Detectron2's loader, a resumed run will not see "
                "the batches of an uninterrupted one (exact resume needs TrainingSampler)",
                cfg.DATALOADER.SAMPLER_TRAIN,
            )
            return build_detection_train_loader(cfg, mapper=mapper)
        return build_resumable_train_loader(cfg, mapper)

    @classmethod
    def _caption_train_loader(cls, cfg, only_captions: bool) -> ResumableTrainLoader:
        """Image-caption batches (SimZSS): :class:`CaptionDatasetMapper`, the resumable loader,
        no aspect-ratio grouping (the mapper crops every image to one square size)."""
        if not only_captions:
            raise ValueError(
                f"DATASETS.TRAIN={tuple(cfg.DATASETS.TRAIN)} mixes caption datasets with "
                "segmentation splits: train on one kind"
            )
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ValueError(
                "caption datasets use the resumable loader: set DATALOADER.SAMPLER_TRAIN "
                "TrainingSampler"
            )
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
        logger.info("Caption training loader: %d image-caption pairs", len(dicts))
        return ResumableTrainLoader(
            dicts,
            CaptionDatasetMapper(cfg, True),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=False,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_zero_shot_test_loader(cfg, dataset_name)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)
