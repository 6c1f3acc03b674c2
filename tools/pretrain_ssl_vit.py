#!/usr/bin/env python
"""Pretrain the miniature's self-supervised tiny ViT with DINO, and compare it with a random ViT
and the tiny CLIP's image tower (k-NN accuracy on the labelled close-ups: the class, and the hue
and the texture alone).

    python tools/pretrain_ssl_vit.py                  # $DETECTRON2_DATASETS/ocz_synthetic
    python tools/pretrain_ssl_vit.py --steps 1000 --batch-size 32 --seed 0

The ViT (vit_ocz_tiny_patch16) learns from the benchmark's images only (the pretraining
close-ups and the segmentation train scenes; no mask, no caption), deterministically given the
seed, resuming an interrupted run, cached in ~/.cache/ocz_d2/tiny_ssl_vit by a key of its
settings and inputs, and copied to <root>/tiny_ssl_vit.pt, the file that
configs/synthetic/simzss_tiny_ssl.yaml names. The synthetic benchmark and its tiny CLIP must
exist (python tools/prepare_synthetic.py).
"""

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", help="the benchmark (default: $DETECTRON2_DATASETS/ocz_synthetic)"
    )
    parser.add_argument("--steps", type=int, default=None, help="DINO steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 32)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import dataclasses

    import ocz_d2  # noqa: F401
    from ocz_d2.miniature import ensure_synthetic_benchmark
    from ocz_d2.miniature.dino_pretrain import (
        SYNTHETIC_DINO_PRETRAIN,
        compare_towers,
        ensure_synthetic_ssl_vit,
    )

    changes = {
        k: v
        for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed))
        if v is not None
    }
    cfg = dataclasses.replace(SYNTHETIC_DINO_PRETRAIN, **changes)
    benchmark = ensure_synthetic_benchmark(args.root)
    weights, record = ensure_synthetic_ssl_vit(benchmark, cfg, progress=not args.no_progress)
    print(f"SSL tiny ViT: {weights} (copied to {benchmark.root}/tiny_ssl_vit.pt)")
    print("k-NN accuracy (%) on the labelled close-ups (chance: class 6, hue 25, texture 25):")
    print(json.dumps(compare_towers(benchmark, weights), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
