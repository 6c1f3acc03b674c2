#!/usr/bin/env python
"""Micro-benchmarks behind BENCHMARKS.md's explanations: the evaluator's per-pixel argmax and
the Hungarian matcher's parts, each variant timed interleaved in one process (medians).

    OMP_NUM_THREADS=1 python tools/microbench.py argmax --size 512 --classes 20
    OMP_NUM_THREADS=2 python tools/microbench.py matcher
    OMP_NUM_THREADS=2 python tools/microbench.py predict --size 512 --batch-sizes 1 4 8

``argmax``: ``class_map`` against ``argmax(0)``, ``max(0)``, one ``amax(0)`` reduction and one
comparison pass over the K planes (the two lower bounds of a reduction-based argmax).
``matcher``: ``HungarianMatcher.match_sets`` on one image (``--sets`` prediction sets x
``--queries`` queries, masks at 1/4 of ``--size``, ``--targets`` targets, ``--points``), its
bilinear point sampling of the predicted masks, the BCE cost as shipped against the two-softplus
form it replaced, and the dice cost.
``predict``: ``ZeroShotPredictor.predict`` on ``--images`` random images of ``--size`` pixels
(the test resize set to that size) with the miniature's 16 class names, at each of
``--batch-sizes`` (images of one size share one forward): images/s and the ratio to the first
batch size. The model of ``--config`` (default: ``configs/synthetic/ocz_tiny.yaml``; ``--opts``
overrides, e.g. ``MODEL.OCZ.CLIP.WEIGHTS ""`` for a random CLIP), untrained heads: only the time
matters. CPU figures: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch and ocz_d2 are imported after the arguments are parsed: --help is instant.


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict:
    """Median seconds of each case, one call of every case per round."""
    import numpy as np

    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _two_softplus_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The matcher's BCE cost before it used softplus(x) = softplus(-x) + x (reference)."""
    import torch.nn.functional as F

    pos, neg = F.softplus(-logits), F.softplus(logits)
    return (pos @ targets.t() + neg @ (1 - targets).t()) / logits.shape[1]


def bench_argmax(args) -> list[str]:
    import torch

    from ocz_d2.evaluation import class_map

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand((args.classes, args.size, args.size), generator=gen)
    best = scores.amax(0, keepdim=True)
    assert torch.equal(class_map(scores), scores.argmax(0))
    medians = interleaved(
        {
            "class_map": lambda: class_map(scores),
            "argmax(0)": lambda: scores.argmax(0),
            "max(0)": lambda: scores.max(0),
            "amax(0) (one reduction)": lambda: scores.amax(0),
            "eq with the max (one comparison pass)": lambda: torch.eq(scores, best),
        },
        args.repeats,
        args.warmup,
    )
    pixels = args.size * args.size
    return [
        f"| {n} | {s * 1e3:.2f} ms | {pixels / s / 1e6:.0f} Mpixel/s |" for n, s in medians.items()
    ]


def bench_matcher(args) -> list[str]:
    import torch

    from ocz_d2.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost
    from ocz_d2.modeling.point_utils import point_sample, sample_valid_points

    torch.manual_seed(0)
    side = args.size // 4
    sets = [
        {
            "pred_logits": torch.randn(1, args.queries, 16),
            "pred_masks": torch.randn(1, args.queries, side, side),
        }
        for _ in range(args.sets)
    ]
    masks = torch.zeros(args.targets, args.size, args.size, dtype=torch.bool)
    for t in range(args.targets):
        top = t * args.size // (args.targets + 1)
        masks[t, top : top + args.size // 3, : args.size // 2] = True
    targets = [{"masks": masks, "labels": torch.arange(args.targets)}]
    matcher = HungarianMatcher(num_points=args.points)
    stacked = torch.cat([s["pred_masks"] for s in sets], dim=1)
    coords = sample_valid_points(torch.ones(args.size, args.size, dtype=torch.bool), args.points)
    logits = point_sample(stacked, coords[None])[0]
    points = point_sample(masks[None].float(), coords[None])[0]
    torch.testing.assert_close(
        batch_sigmoid_ce_cost(logits, points), _two_softplus_bce(logits, points)
    )
    medians = interleaved(
        {
            "match_sets (all sets of the image)": lambda: matcher.match_sets(sets, targets),
            "point sampling of the predicted masks": lambda: point_sample(stacked, coords[None]),
            "BCE cost (shipped)": lambda: batch_sigmoid_ce_cost(logits, points),
            "BCE cost (two softplus, before)": lambda: _two_softplus_bce(logits, points),
            "dice cost": lambda: batch_dice_cost(logits, points),
        },
        args.repeats,
        args.warmup,
    )
    return [f"| {n} | {s * 1e3:.1f} ms |" for n, s in medians.items()]


def bench_predict(args) -> list[str]:
    import numpy as np

    from ocz_d2.config import load_config
    from ocz_d2.engine import ZeroShotPredictor
    from ocz_d2.miniature.synthetic import SYNTHETIC_CLASSES

    size = str(args.size)
    opts = ["INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size, *args.opts]
    cfg = load_config(args.config, opts)
    cfg.MODEL.DEVICE = args.device
    predictor = ZeroShotPredictor(cfg, allow_untrained=True)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)
    ]
    vocabulary = list(SYNTHETIC_CLASSES)
    predictor.embeddings(vocabulary)  # cached: the text tower is not timed

    def run(batch_size: int):
        def call():
            predictor.batch_size = batch_size
            return predictor.predict(images, vocabulary)

        return call

    cases = {f"batch {b}": run(b) for b in args.batch_sizes}
    seconds = interleaved(cases, args.repeats, args.warmup)
    first = seconds[f"batch {args.batch_sizes[0]}"]
    return [
        f"  {name:10s} {args.images / t:8.2f} images/s  {first / t:5.2f}x"
        for name, t in seconds.items()
    ]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "what",
        choices=("argmax", "matcher", "predict"),
        help="argmax: the evaluator's per-pixel argmax; matcher: the Hungarian matcher's parts; "
        "predict: batched prediction",
    )
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=20, help="K (argmax)")
    parser.add_argument("--sets", type=int, default=7, help="prediction sets (matcher)")
    parser.add_argument("--queries", type=int, default=100, help="queries per set (matcher)")
    parser.add_argument("--targets", type=int, default=4, help="target masks (matcher)")
    parser.add_argument("--points", type=int, default=12544, help="points (matcher)")
    parser.add_argument(
        "--config",
        default=str(Path(__file__).resolve().parents[1] / "configs/synthetic/ocz_tiny.yaml"),
        help="the model's config (predict)",
    )
    parser.add_argument("--images", type=int, default=8, help="images per round (predict)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="batch sizes (predict)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (predict)")
    parser.add_argument(
        "--opts", nargs="*", default=[], help="config overrides KEY VALUE (predict)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (the median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    args = parser.parse_args(argv)
    import torch

    bench = {"argmax": bench_argmax, "matcher": bench_matcher, "predict": bench_predict}
    lines = bench[args.what](args)
    header = f"{args.what}, {torch.get_num_threads()} thread(s), median of {args.repeats} runs"
    print(header, *lines, sep="\n")
    return lines


if __name__ == "__main__":
    main()
