#!/usr/bin/env python
"""Rewrite a checkpoint without the frozen weights that the model rebuilds from their source.

    python tools/slim_checkpoint.py --config-file configs/synthetic/ocz_tiny.yaml \\
        --input output/demo/model_final.pth --output output/demo/model_final_slim.pth \\
        [KEY VALUE ...]

The model is built from the config (its frozen CLIP from MODEL.OCZ.CLIP.PRETRAINED / WEIGHTS),
the input (an older, full checkpoint, or a slim one) is loaded into it, and the trainable state is
saved with the record of the frozen weights it expects (ocz_d2/engine/checkpoint.py). Optimizer
and trainer state are dropped; the iteration is kept. Prints both sizes.
"""

from __future__ import annotations

import argparse
import os
import sys

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config-file", required=True, help="the config the checkpoint was trained with"
    )
    parser.add_argument("--input", required=True, help="checkpoint to read")
    parser.add_argument("--output", required=True, help="the slim checkpoint (.pth) to write")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of config and checkpoint errors"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, after every flag"
    )
    args = parser.parse_args(argv)
    if not os.path.basename(args.output).endswith(".pth"):
        parser.error("--output must end with .pth")
    import ocz_d2.data  # noqa: F401  (registers the builtin splits; quiets import warnings)
    from ocz_d2.engine.cli import run_tool

    return run_tool(run, args, debug=args.debug)


def run(args) -> int:
    import torch
    from detectron2.modeling import build_model

    from ocz_d2.config import load_config
    from ocz_d2.data import register_split_files_from_config
    from ocz_d2.engine import AtomicCheckpointer
    from ocz_d2.engine.cli import check_overrides

    check_overrides(args.opts, "slim_checkpoint.py")
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    register_split_files_from_config(cfg, lazy=True)
    model = build_model(cfg)
    extra = AtomicCheckpointer(model).load(args.input)
    folder, name = os.path.split(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    checkpointer = AtomicCheckpointer(model, save_dir=folder)
    kept = {k: extra[k] for k in ("iteration",) if k in extra}
    checkpointer.save(name[: -len(".pth")], **kept)
    before, after = os.path.getsize(args.input), os.path.getsize(args.output)
    record = torch.load(args.output, map_location="cpu", weights_only=True)["frozen_weights"]
    left_out = sum(r["numel"] for r in record)
    print(f"{args.input}: {before:,} bytes")
    print(f"{args.output}: {after:,} bytes ({after / before:.1%})")
    print(f"frozen values left out: {left_out:,}, rebuilt from {[r['source'] for r in record]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
