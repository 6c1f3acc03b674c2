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

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import DatasetEvaluators, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import ocz_d2
from ocz_d2.config import ConfigError, load_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper, register_split_files_from_config
from ocz_d2.engine import (
    AtomicCheckpointer,
    ZeroShotTrainerBase,
    build_lr_scheduler,
    build_optimizer,
)
from ocz_d2.evaluation import build_zero_shot_evaluator
from ocz_d2.utils.checkout import check_same_checkout


class Trainer(ZeroShotTrainerBase):
    """The ocz_d2 data, evaluator, optimizer and schedule on :class:`ZeroShotTrainerBase`."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators([build_zero_shot_evaluator(dataset_name, output_folder)])

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
    if not args.config_file:
        raise SystemExit("--config-file is required (e.g. configs/synthetic/ocz_tiny.yaml)")
    try:
        cfg = load_config(args.config_file, args.opts)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    if cfg.MODEL.DEVICE != "cpu" and not torch.cuda.is_available():
        logging.getLogger("ocz_d2").warning("no CUDA device: running on CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    register_split_files_from_config(cfg)
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
    check_same_checkout(__file__, ocz_d2.__file__)
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
