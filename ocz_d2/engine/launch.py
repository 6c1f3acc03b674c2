"""Training and evaluation runs as ``tools/train_net.py`` starts them: the run's checked config,
Detectron2's setup, one process per GPU (Detectron2's ``launch``).

The tool parses its command line (``--help`` without importing torch) and calls
:func:`launch_run` with the parsed arguments; :func:`run_in_new_process` starts the same run in a
fresh interpreter (the multi-seed report trains each (row, seed) so, with its console output in a
log file). The arguments are ``tools/train_net.py``'s: ``config_file``, ``opts``, ``resume``,
``eval_only``, ``tuned_test``, ``allow_untrained``, ``num_gpus``, ``num_machines``,
``machine_rank``, ``dist_url`` (None: :func:`default_dist_url`) and ``debug`` (:func:`run_args`
makes them).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from detectron2.engine import default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..config import load_config
from ..data.split_file import register_split_files_from_config
from ..evaluation.protocol import check_tuned_protocol, tuned_test
from ..utils.errors import ArgumentError
from ..utils.parallel import exit_process
from .checkpoint import AtomicCheckpointer
from .cli import DEBUG_ENV, check_overrides, check_run_inputs, run_tool, setup_run_logging
from .trainer import ZeroShotTrainer

__all__ = [
    "default_dist_url",
    "launch_run",
    "load_run_config",
    "main_worker",
    "run",
    "run_args",
    "run_in_new_process",
    "setup",
    "share_cpu_threads",
]


def default_dist_url() -> str:
    """Where the processes of a run meet: a local port per user (Detectron2's default), so that
    two users of one machine do not collide."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return f"tcp://127.0.0.1:{2**15 + 2**14 + hash(uid) % 2**14}"


def run_args(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    resume: bool = False,
    eval_only: bool = False,
    tuned_test: bool = False,
    allow_untrained: bool = False,
    num_gpus: int = 1,
) -> argparse.Namespace:
    """The arguments of a run on this machine, as ``tools/train_net.py`` parses them from
    ``--config-file CONFIG_FILE [--resume] [--eval-only] [--tuned-test] [--allow-untrained]
    --num-gpus N OPTS``."""
    return argparse.Namespace(
        config_file=str(config_file),
        resume=resume,
        eval_only=eval_only,
        tuned_test=tuned_test,
        allow_untrained=allow_untrained,
        num_gpus=num_gpus,
        num_machines=1,
        machine_rank=0,
        dist_url=None,
        debug=False,
        opts=[str(o) for o in opts],
    )


def load_run_config(args):
    """The run's config: file + overrides, device fallback, split files registered; checked
    before any model is built (datasets, weights). Raises user errors."""
    check_overrides(args.opts, "train_net.py")
    if not args.config_file:
        raise ArgumentError("--config-file is required (e.g. configs/synthetic/ocz_tiny.yaml)")
    cfg = load_config(args.config_file, args.opts)
    register_split_files_from_config(cfg)
    check_run_inputs(
        cfg,
        train=not args.eval_only,
        eval_only=args.eval_only,
        resume=args.resume,
        allow_untrained=args.allow_untrained,
    )
    if args.tuned_test:
        check_tuned_protocol(cfg)  # before hours of training, not after
    if cfg.MODEL.DEVICE != "cpu" and not torch.cuda.is_available():
        logging.getLogger("ocz_d2").warning("no CUDA device: running on CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def setup(args):
    """The checked config, with Detectron2's setup (logs, config.yaml, seeds) done."""
    cfg = load_run_config(args)
    setup_run_logging(cfg.OUTPUT_DIR, comm.get_rank())
    default_setup(cfg, args)
    logging.getLogger("detectron2").info(
        "CPU threads of this process: %d (process %d, started by %d)",
        torch.get_num_threads(), os.getpid(), os.getppid(),
    )  # fmt: skip
    return cfg


def run(args):
    """Train (or, with ``eval_only``, evaluate) in this process; with ``tuned_test``, the tuned
    protocol (:func:`~ocz_d2.evaluation.protocol.tuned_test`) instead of the plain evaluation of
    ``DATASETS.TEST``: after training, or instead of it with ``eval_only``."""
    cfg = setup(args)
    if args.eval_only:
        model = ZeroShotTrainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        if args.tuned_test:
            return tuned_test(cfg, model, cfg.OUTPUT_DIR)
        res = ZeroShotTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    # With the tuned protocol the trainer evaluates nothing itself (no periodic evaluation).
    trainer = ZeroShotTrainer(_without_test(cfg) if args.tuned_test else cfg)
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()
    if args.tuned_test:
        model = trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        return tuned_test(cfg, model, cfg.OUTPUT_DIR)
    return res


def _without_test(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ()
    cfg.freeze()
    return cfg


def share_cpu_threads() -> int:
    """Without CUDA, the processes of a run on one machine share its CPU threads: each takes
    its share of the thread count it started with (``OMP_NUM_THREADS``, else the cores), at least
    one. Returns this process's thread count."""
    local = comm.get_local_size()
    if local > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, torch.get_num_threads() // local))
    return torch.get_num_threads()


def main_worker(args):
    """One process of the run (Detectron2's ``launch`` calls it in each); a process of several
    ends here (:func:`~ocz_d2.utils.parallel.exit_process`)."""
    if comm.get_world_size() == 1:
        return run(args)
    # A process of several dies with the process that launched it (train_net.py, or the demo or
    # report that runs it, run_in_new_process): killing that leaves no training running.
    die_with_parent(os.getppid())
    share_cpu_threads()
    status = run_tool(run, args, debug=args.debug)
    if status:
        sys.exit(status)  # the parent reports the status; the others are stopped
    # Leave together and close the group: a process exiting while gloo's threads still run
    # can abort ("terminate called without an active exception").
    comm.synchronize()
    torch.distributed.destroy_process_group()
    exit_process(0)  # a launched process: its run is done, its files closed


def launch_run(args) -> int:
    """The run on ``args.num_gpus`` processes of this machine (this one alone for 1)."""
    launch(
        main_worker,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url or default_dist_url(),
        args=(args,),
    )
    return 0


def run_in_new_process(args, log: str | os.PathLike | None = None) -> int:
    """:func:`launch_run` in fresh Python processes, as ``tools/train_net.py`` runs it: one new
    process, or, for several on this machine, the launcher's own processes started from here
    (they are new interpreters already; no process in between).

    Args:
        args: the run's arguments (:func:`run_args`).
        log: file that takes the processes' console output (stdout and stderr); None: this
            process's console.

    Returns:
        Its exit status: 0, :data:`~ocz_d2.engine.cli.USER_ERROR_STATUS` after a config, data or
        weights error (printed), another value when it failed otherwise.
    """
    log = None if log is None else os.fspath(log)
    if log is not None:
        Path(log).write_bytes(b"")  # each process appends to it
    # A spawned interpreter would make "spawn" its own default start method, and the data
    # loader's workers would then start without the datasets that the run registers from its
    # split files: the new processes start their workers as this one would (fork on Linux).
    # They also die with this process: a report or demo that is killed leaves no training behind.
    setting = (args, log, multiprocessing.get_start_method(), os.getpid())
    if args.num_gpus > 1 and args.num_machines == 1:
        try:
            launch(
                _new_process_main,
                args.num_gpus,
                dist_url=args.dist_url or default_dist_url(),
                args=setting,
            )
        except torch.multiprocessing.ProcessExitedException as e:
            return e.exit_code
        except torch.multiprocessing.ProcessRaisedException as e:
            # The launcher keeps a failed process's traceback from that process's own output:
            # it goes to this process's log, and to the run's log file.
            logging.getLogger(__name__).error("A training process failed:\n%s", e)
            if log is not None:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(f"A training process failed:\n{e}\n")
            return 1
        return 0
    process = multiprocessing.get_context("spawn").Process(target=_new_process_main, args=setting)
    process.start()
    process.join()
    return process.exitcode


#: prctl(2) option: the signal this process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux only), and
    terminate at once if the parent ``parent_pid`` is already gone.

    Returns:
        Whether the request was taken (False on other systems, or if prctl failed).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _new_process_main(args, log: str | None, start_method: str, parent_pid: int) -> None:
    """A new process of the run: its console to ``log``, then the run (a launcher's process:
    its share of the run, :func:`main_worker`)."""
    die_with_parent(parent_pid)
    multiprocessing.set_start_method(start_method, force=True)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)  # the process's stdout and stderr, Python's and any library's alike
        os.dup2(fd, 2)
        os.close(fd)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    if comm.get_world_size() > 1:
        main_worker(args)  # ends the process
    exit_process(run_tool(launch_run, args, debug=args.debug))
