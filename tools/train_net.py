#!/usr/bin/env python
"""Train or evaluate an ocz_d2 zero-shot segmentation model.

    python tools/train_net.py --config-file configs/synthetic/ocz_tiny.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS path/model_final.pth
    python tools/train_net.py --config-file ... --resume          # continue from last_checkpoint
    python tools/train_net.py --config-file ... --num-gpus 8      # one process per GPU
On a machine without GPU, ``--num-gpus N`` starts N CPU processes that talk through gloo.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import DatasetEvaluators, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ocz_d2 import add_ocz_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper, register_split_file
from ocz_d2.engine import AtomicCheckpointer, build_lr_scheduler, build_optimizer
from ocz_d2.evaluation import ZeroShotSemSegEvaluator


class Trainer(DefaultTrainer):
    """DefaultTrainer with the ocz_d2 data, evaluator, optimizer and atomic checkpoints."""

    def __init__(self, cfg):
        # Same wiring as DefaultTrainer.__init__, with two changes: DDP without device_ids when
        # the model is on CPU (gloo processes), and checkpoints written atomically.
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

    # Detectron2 v0.6 does not checkpoint the optimizer state (later versions do, as "_trainer"):
    # without it a resumed AdamW restarts from empty moments.
    def state_dict(self):
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type != "ocz_zero_shot_sem_seg":
            raise ValueError(
                f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}: register it with "
                "ocz_d2.data.register_zero_shot_split or a split file (DATASETS.SPLIT_FILES)"
            )
        return DatasetEvaluators([ZeroShotSemSegEvaluator(dataset_name, output_dir=output_folder)])

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=ZeroShotSemSegDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = ZeroShotSemSegDatasetMapper(cfg, False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


def setup(args):
    cfg = get_cfg()
    add_ocz_config(cfg)
    if not args.config_file:
        raise SystemExit("--config-file is required (e.g. configs/synthetic/ocz_tiny.yaml)")
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except KeyError as e:
        raise SystemExit(
            f"config error: {e.args[0]} (in {args.config_file} or the command line). "
            "Check the spelling; ocz_d2's keys and their meaning are in ocz_d2/config.py"
        ) from None
    if cfg.MODEL.DEVICE != "cpu" and not torch.cuda.is_available():
        logging.getLogger("ocz_d2").warning("no CUDA device: running on CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    for path in cfg.DATASETS.SPLIT_FILES:
        register_split_file(path)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="ocz_d2")
    return cfg


def main(args):
    result = run(args)
    if comm.get_world_size() > 1:
        # Leave together and close the group: a process exiting while gloo's threads still run
        # can abort ("terminate called without an active exception").
        comm.synchronize()
        torch.distributed.destroy_process_group()
    return result


def run(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
