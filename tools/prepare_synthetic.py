#!/usr/bin/env python
"""Generate the synthetic compositional zero-shot benchmark (ocz_synthetic) and its tiny CLIP.

Usage:
    python tools/prepare_synthetic.py                       # $DETECTRON2_DATASETS/ocz_synthetic
    python tools/prepare_synthetic.py --root /data/ocz_synthetic --num-train 2000 --force

The builtin splits ocz_synthetic_{train,val,test} read the folder
$DETECTRON2_DATASETS/ocz_synthetic (DETECTRON2_DATASETS defaults to ./datasets). Unless --no-clip
is given, the tiny CLIP is then pretrained on the benchmark's image-caption set (or taken from
the cache in ~/.cache/ocz_d2/tiny_clip) and written to <root>/tiny_clip.pt. With --object-maps
it also writes the object maps of the OC-ZSS ladder configs (configs/synthetic/ocz_tiny_*.yaml):
the true instance maps (oracle), the tiny CLIP's own clusters (clip), a random ViT's (randvit) and
the self-supervised tiny ViT's (ssl; it is pretrained first, or taken from the cache in
~/.cache/ocz_d2/tiny_ssl_vit, as tools/pretrain_ssl_vit.py does), with their split files
split_objects_{oracle,clip,randvit,ssl}.yaml.
"""

import argparse
import os
import sys
import time
from pathlib import Path

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        help="output folder (default: $DETECTRON2_DATASETS/ocz_synthetic; DETECTRON2_DATASETS "
        "defaults to ./datasets)",
    )
    parser.add_argument("--num-train", type=int, default=1000, help="training images")
    parser.add_argument("--num-val", type=int, default=100, help="validation images")
    parser.add_argument("--num-test", type=int, default=200, help="test images")
    parser.add_argument(
        "--num-pretrain", type=int, default=6000, help="image-caption pairs for the tiny CLIP"
    )
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--embedding-dim", type=int, default=64, help="class-embedding size D")
    parser.add_argument("--min-objects", type=int, default=2, help="fewest objects per image")
    parser.add_argument("--max-objects", type=int, default=5, help="most objects per image")
    parser.add_argument("--force", action="store_true", help="regenerate a complete folder")
    parser.add_argument("--no-clip", action="store_true", help="do not pretrain the tiny CLIP")
    parser.add_argument(
        "--pretraining-set",
        action="store_true",
        help="render the image-caption pretraining set (pretrain/) and the zero-shot check's "
        "images (zeroshot/) now, e.g. for tools/pretrain_clip.py; otherwise they are rendered "
        "only when a pretraining needs them",
    )
    parser.add_argument(
        "--object-maps", action="store_true", help="also write the ladder configs' object maps"
    )
    return parser.parse_args(argv)


def _progress(split: str, done: int, total: int) -> None:
    """Print a line per 10% of each split."""
    if done == total or done % max(1, total // 10) == 0:
        print(f"  {split}: {done}/{total} images", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ocz_d2  # noqa: F401  (first: it keeps fvcore's and Detectron2's import warnings quiet)
    from ocz_d2.data.register_zero_shot import load_class_embeddings
    from ocz_d2.data.split_file import register_split_file
    from ocz_d2.miniature.clip_pretrain import ensure_synthetic_clip
    from ocz_d2.miniature.synthetic import ensure_pretraining_set, generate_synthetic_benchmark
    from ocz_d2.utils.io import datasets_root

    if args.root is None:
        args.root = os.path.join(datasets_root(), "ocz_synthetic")
    start = time.perf_counter()
    print(f"Generating the synthetic benchmark in {os.path.abspath(args.root)}", flush=True)
    info = generate_synthetic_benchmark(
        args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        num_pretrain=args.num_pretrain,
        image_size=args.image_size,
        seed=args.seed,
        embedding_dim=args.embedding_dim,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        force=args.force,
        progress=_progress,
    )
    if not info.generated:
        print("Already complete with these arguments (use --force to regenerate).")

    # Validate the output: the split file registers (all files paired, embeddings match).
    names = register_split_file(
        info.split_file, root=info.root.parent, dataset=f"prepare_check_{info.dataset}"
    )
    classes, embeddings = load_class_embeddings(info.class_embeddings)
    print(
        f"Done in {time.perf_counter() - start:.1f} s: {info.num_train} train / {info.num_val} "
        f"val / {info.num_test} test images, {len(classes)} classes ({len(info.unseen)} unseen: "
        f"{', '.join(info.unseen)}), embeddings {embeddings.shape}; checked {names}."
    )
    parent = info.root.parent
    if os.path.abspath(datasets_root()) != str(parent):
        print(f"Use it with: export DETECTRON2_DATASETS={parent}")
    if info.root.name != "ocz_synthetic":
        print(
            "The builtin ocz_synthetic_* splits read <DETECTRON2_DATASETS>/ocz_synthetic; register "
            f"this folder with ocz_d2.data.register_split_file('{info.split_file}')."
        )
    if args.pretraining_set:
        print(f"Pretraining set: {ensure_pretraining_set(info.root, progress=_progress)}")
    if not args.no_clip:
        if args.num_pretrain == 0:
            print("error: --num-pretrain 0 leaves nothing to pretrain on: add --no-clip")
            return 2
        weights, record = ensure_synthetic_clip(info)
        zs = record["zero_shot"]
        print(
            f"Tiny CLIP: {weights}; zero-shot accuracy on single-object images: seen "
            f"{zs['seen']:.1f}%, unseen {zs['unseen']:.1f}%"
        )
    if args.object_maps:
        return write_object_maps(info, with_clip=not args.no_clip)
    return 0


# Guide name -> the config whose guide makes those maps (as tools/precompute_object_maps.py).
_GUIDE_CONFIGS = {
    "clip": "ocz_tiny_objects.yaml",
    "randvit": "ocz_tiny_oczss_randvit.yaml",
    "ssl": "ocz_tiny_oczss_ssl.yaml",
}


def write_object_maps(benchmark, with_clip: bool) -> int:
    """Oracle maps, then the online guides' maps of the miniature's ladder configs (the SSL tiny
    ViT first, for the ssl guide)."""
    from ocz_d2.config import load_config
    from ocz_d2.data.object_maps import precompute_object_maps
    from ocz_d2.miniature.dino_pretrain import SYNTHETIC_SSL_FILE, ensure_synthetic_ssl_vit
    from ocz_d2.miniature.synthetic import write_oracle_object_maps

    root = Path(benchmark.root)
    print(f"Oracle object maps: {write_oracle_object_maps(root)}", flush=True)
    if not with_clip:
        print("--no-clip: skipping the CLIP-guided maps (they need the tiny CLIP).")
        return 0

    def report(dataset_name: str, count: int, folder: Path, rate: float) -> None:
        print(f"{dataset_name}: {count} object maps in {folder} ({rate:.1f} images/s)")

    ssl_weights, _ = ensure_synthetic_ssl_vit(benchmark)
    print(f"SSL tiny ViT: {ssl_weights} (copied to {root / SYNTHETIC_SSL_FILE})", flush=True)
    clip = ["MODEL.OCZ.CLIP.WEIGHTS", str(root / "tiny_clip.pt")]
    # The ssl guide's own weights: this benchmark's copy (the config names it under
    # $DETECTRON2_DATASETS).
    guide = {"ssl": ["MODEL.OCZ.GUIDE.WEIGHTS", str(root / SYNTHETIC_SSL_FILE)]}
    configs = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
    for name, config in _GUIDE_CONFIGS.items():
        cfg = load_config(configs / config, [*clip, *guide.get(name, [])])
        # The split file's paths are relative to the benchmark's datasets folder.
        out = precompute_object_maps(
            cfg, root / "split.yaml", name, root=root.parent, on_split=report
        )
        print(f"split file: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
