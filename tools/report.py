#!/usr/bin/env python
"""Multi-seed report: each row (a config plus overrides) is trained once per seed, its calibration
is tuned on DATASETS.VAL, and seen / unseen / hIoU on DATASETS.TEST are tabulated as mean ± std,
with the minimum over seeds and the seconds per training iteration, and compared paired by seed
with a reference row.

    python tools/report.py --row text configs/synthetic/ocz_tiny.yaml \\
        --row attr configs/synthetic/ocz_tiny_attr.yaml --seeds 0 1 2 --output output/report
    python tools/report.py --row no_prompts configs/synthetic/ocz_tiny.yaml \\
        MODEL.OCZ.CLIP.NUM_PROMPTS 0 --seeds 0 1 2
    python tools/report.py --row text configs/synthetic/ocz_tiny.yaml \\
        --row attr configs/synthetic/ocz_tiny_attr.yaml --reference attr
    python tools/report.py --row tiny configs/synthetic/ocz_tiny.yaml \\
        --test-row tiny_crop tiny MODEL.OCZ.SEGMENT_CLIP.ENABLED True --reference tiny

Results vary a lot between seeds, so every row but the reference (--reference ROW_NAME; by
default the first row) is also compared paired by seed: on the seeds that both it and the
reference have finished, the per-seed difference (row - reference) of seen / unseen / hIoU, its
mean and a 95% paired t confidence interval (none with a single common seed): report.md shows
them as a second table, "Δ mean [95% CI]", report.json as each table entry's "paired". Each run's
result.json (and report.json's "runs") also holds the per-class test IoU ("per_class_iou").

Finished (row, seed) runs are reused and unfinished ones resume, so an interrupted report picks up
where it stopped.

A test-time row (--test-row NAME BASE_ROW KEY VALUE ...) trains nothing: it tunes and tests the
checkpoints of BASE_ROW (a --row of the same report) with overrides that act at test time only,
e.g. a test-time module switched on. Paired with BASE_ROW, its difference measures that change
alone, on the same weights.

Writes report.json and report.md in the output folder. Before running, the synthetic benchmark
and its tiny CLIP are prepared when missing (cached; --no-prepare skips), rows that load CLIP
weights from a file get the cached tiny CLIP, and the chance row is computed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--row",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME CONFIG [KEY VALUE ...]",
        help="a report row: a name, a config file and optional overrides (repeatable)",
    )
    parser.add_argument(
        "--test-row",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME BASE_ROW [KEY VALUE ...]",
        help="a row that evaluates BASE_ROW's checkpoints with test-time overrides (repeatable)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (SEED)")
    parser.add_argument("--output", default="output/report", help="output folder")
    parser.add_argument(
        "--reference",
        metavar="ROW_NAME",
        help="the row the others are compared with, paired by seed (default: the first row)",
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per run (CPU: gloo)")
    parser.add_argument(
        "--no-prepare", action="store_true", help="do not prepare the synthetic benchmark"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ocz_d2.engine.cli import run_tool  # after the arguments: --help answers at once

    return run_tool(_run, args)


def _run(args: argparse.Namespace) -> int:
    import ocz_d2
    from ocz_d2.evaluation.report import ReportRow, format_markdown, pin_clip_weights, run_report
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    logging.basicConfig(level=logging.INFO, format="[report] %(message)s")
    try:
        rows = [ReportRow(r[0], r[1], tuple(r[2:])) for r in args.row if len(r) >= 2]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(rows) != len(args.row):
        print("error: every --row needs a NAME and a CONFIG", file=sys.stderr)
        return 2
    if any(len(r) < 2 for r in args.test_row):
        print("error: every --test-row needs a NAME and a BASE_ROW", file=sys.stderr)
        return 2
    by_name = {row.name: row for row in rows}
    unknown = [r[1] for r in args.test_row if r[1] not in by_name]
    if unknown:
        print(f"error: --test-row base {unknown[0]} is not a --row name: {list(by_name)}",
              file=sys.stderr)  # fmt: skip
        return 2
    names = [row.name for row in rows] + [r[0] for r in args.test_row]
    if args.reference is not None and args.reference not in names:
        print(f"error: --reference {args.reference} is not a row name: {names}", file=sys.stderr)
        return 2
    chance = None
    if not args.no_prepare:
        from ocz_d2.evaluation.protocol import chance_metrics
        from ocz_d2.miniature.clip_pretrain import ensure_synthetic_clip
        from ocz_d2.miniature.synthetic import ensure_synthetic_benchmark

        weights, _ = ensure_synthetic_clip(ensure_synthetic_benchmark())
        rows = [pin_clip_weights(row, weights) for row in rows]
        chance = chance_metrics("ocz_synthetic_test")
    by_name = {row.name: row for row in rows}
    try:
        rows += [by_name[r[1]].at_test_time(r[0], tuple(r[2:])) for r in args.test_row]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = run_report(
        rows,
        args.seeds,
        args.output,
        num_gpus=args.num_gpus,
        chance=chance,
        reference=args.reference,
    )
    print(format_markdown(table, chance))
    print(f"Written to {Path(args.output) / 'report.md'} and report.json")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
