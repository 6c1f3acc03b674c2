#!/usr/bin/env python
"""Benchmark configs side by side: parameters, FLOPs per component, inference and training-step
time, time of matching / clustering / criterion in the step, peak memory, data-loader and
evaluator throughput, and every number's ratio to the first config (ocz_d2/benchmark/).

    python tools/benchmark.py --config configs/synthetic/ocz_tiny.yaml \\
        --config configs/synthetic/ocz_tiny_oczss.yaml --size 128 --batch 8 --device cpu \\
        --repeats 10 --warmup 3 --output output/benchmark/tiny.json
    python tools/benchmark.py --row base configs/voc/ablation/baseline_vitb16_bs16_20k.yaml \\
        --row oczss configs/voc/oczss_vitb16_bs16_20k.yaml MODEL.OCZ.ORA.NUM_ROUNDS 2 \\
        --opts MODEL.OCZ.CLIP.PRETRAINED "" MODEL.OCZ.GUIDE.PRETRAINED False --size 512 --batch 1

Without the dataset's files the loader is "not available"; --loader-stand-in N times it on N
stand-in image/label pairs (and object maps for configs with object prompts) written in the
dataset's formats at --loader-stand-in-size (VOC's 500x375), with the config's input recipe:

    python tools/benchmark.py --config configs/voc/oczss_vitb16_bs16_20k.yaml \\
        --loader-stand-in 64 ...

Rows are measured in the order given; --config PATH is a row named after the file. --opts applies
to every row, before the row's own overrides. Models are built with the configs' weights; on a
machine without downloads, empty the pretrained tags (as above) to measure random-weight models.
Prints Markdown tables and writes the full results as JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.


def _config_row(path: str) -> list[str]:
    """``--config PATH``: a row named after the file's stem."""
    return [Path(path).stem, path]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--row",
        dest="rows",
        nargs="+",
        action="append",
        metavar="NAME CONFIG [KEY VALUE ...]",
        help="a row: a name, a config file and optional overrides (repeatable)",
    )
    parser.add_argument(
        "--config",
        dest="rows",
        type=_config_row,
        action="append",
        metavar="CONFIG",
        help="a row named after its config file (repeatable; mixes with --row in order)",
    )
    parser.add_argument(
        "--opts", nargs="+", default=[], metavar="KEY VALUE", help="overrides of every row"
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="images per step and per inference")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before them")
    parser.add_argument(
        "--loader-batches", type=int, default=20, help="train-loader batches timed (0: skip)"
    )
    parser.add_argument(
        "--loader-stand-in",
        type=int,
        default=0,
        metavar="N",
        help="when the train dataset's files are missing, time the loader on N stand-in "
        "image/label pairs (and object maps) in its formats, in a temporary folder (0: off)",
    )
    parser.add_argument(
        "--loader-stand-in-size",
        type=int,
        nargs=2,
        default=[500, 375],
        metavar=("WIDTH", "HEIGHT"),
        help="size of the stand-in images (default: PASCAL VOC's 500 375)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--output", help="JSON file for the results")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.benchmark import BenchmarkSettings, format_markdown, run_benchmark
    from ocz_d2.evaluation.report import ReportRow
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    logging.basicConfig(level=logging.INFO, format="[benchmark] %(message)s")
    if not args.rows:
        print("error: give at least one --config or --row", file=sys.stderr)
        return 2
    if len(args.opts) % 2:
        print(f"error: --opts takes KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return 2
    try:
        rows = [ReportRow(r[0], r[1], (*args.opts, *r[2:])) for r in args.rows if len(r) >= 2]
        settings = BenchmarkSettings(
            size=args.size,
            batch=args.batch,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            loader_batches=args.loader_batches,
            loader_stand_in=args.loader_stand_in,
            loader_stand_in_size=tuple(args.loader_stand_in_size),
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(rows) != len(args.rows):
        print("error: every --row needs a NAME and a CONFIG", file=sys.stderr)
        return 2
    report = run_benchmark(rows, settings)
    print(format_markdown(report))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"Written to {output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
