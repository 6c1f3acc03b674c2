#!/usr/bin/env python
"""Train or evaluate an ocz_d2 zero-shot semantic segmentation model (Detectron2).

    python tools/train_net.py --config-file configs/synthetic/ocz_tiny.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS path/model_final.pth
    python tools/train_net.py --config-file ... --resume          # continue from last_checkpoint
    python tools/train_net.py --config-file ... --tuned-test      # gamma chosen on DATASETS.VAL
    python tools/train_net.py --config-file ... --num-gpus 8      # one process per GPU

Flags come first, config overrides (KEY VALUE pairs) last. Training writes checkpoints, logs and
the evaluation of DATASETS.TEST to OUTPUT_DIR; --resume continues from its last checkpoint with
the batches an uninterrupted run would see (without a checkpoint it starts from scratch, with a
warning). --tuned-test evaluates as tools/report.py does instead: the calibration gamma chosen on
DATASETS.VAL, then DATASETS.TEST evaluated once with it (OUTPUT_DIR/tuned_results.json).
--num-gpus N starts N processes, one per GPU; on a machine without GPU they run on the
CPU and talk through gloo (SOLVER.IMS_PER_BATCH is the total over them). A problem with the
config, data or weights stops the tool with status 2 and one message (--debug or OCZ_D2_DEBUG=1
shows the traceback).
"""

from __future__ import annotations

import argparse
import os

# Heavy imports (torch, Detectron2) happen after the arguments are parsed: --help is instant.
# The run itself is ocz_d2.engine.launch's.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_net.py",
        description=__doc__.split("\n\n")[0].strip(),
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="the YAML config")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR's last checkpoint (from scratch, with a warning, if none)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate DATASETS.TEST with MODEL.WEIGHTS (or, with --resume, the last checkpoint)",
    )
    parser.add_argument(
        "--tuned-test",
        action="store_true",
        help="after training (or with --eval-only), choose the calibration gamma on DATASETS.VAL "
        "(MODEL.OCZ.TEST.CALIBRATION_GRID) and evaluate DATASETS.TEST with it, in the run's "
        "processes; writes OUTPUT_DIR/tuned_results.json. Training then runs no evaluation "
        "of its own",
    )
    parser.add_argument(
        "--allow-untrained",
        action="store_true",
        help="let --eval-only run without weights (random heads: smoke tests only)",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes per machine, one per GPU; without GPU, CPU processes talking through "
        "gloo (default: 1)",
    )
    parser.add_argument("--num-machines", type=int, default=1, help="machines (default: 1)")
    parser.add_argument(
        "--machine-rank", type=int, default=0, help="this machine's rank, 0..N-1 (default: 0)"
    )
    parser.add_argument(
        "--dist-url",
        default=None,
        help="URL where the processes meet (default: a per-user local port)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of config, data and weight errors (also: OCZ_D2_DEBUG=1)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides, after every flag, e.g. SOLVER.MAX_ITER 100 OUTPUT_DIR out/x",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.debug:
        os.environ["OCZ_D2_DEBUG"] = "1"  # for the worker processes and the log filter too
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.engine.cli import run_tool
    from ocz_d2.engine.launch import launch_run
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    return run_tool(launch_run, args, debug=args.debug)


def __getattr__(name: str):
    # ``Trainer``: the package's trainer, for code that loads this file as a module.
    if name == "Trainer":
        from ocz_d2.engine import ZeroShotTrainer

        return ZeroShotTrainer
    raise AttributeError(name)


def invoke_main() -> None:
    status = main()
    from ocz_d2.utils.parallel import exit_process

    exit_process(status)  # without the 1.3 s of tearing down torch's modules


if __name__ == "__main__":
    invoke_main()
