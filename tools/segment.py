#!/usr/bin/env python
"""Segment your own images with your own class names (open-vocabulary inference).

    python tools/segment.py --config-file configs/synthetic/ocz_tiny.yaml \\
        --input photo.jpg more_photos/ "shots/*.png" --classes "cat, dog, sofa|couch" \\
        --output output/segment MODEL.WEIGHTS output/demo/model_final.pth [KEY VALUE ...]

``--input`` takes files, folders (their images, not recursive) and quoted globs (``**``
recurses). ``--classes`` is comma-separated; ``--vocab-file`` has one class per line (``#``
comments). A class may list synonyms, ``sofa|couch``: their text embeddings are averaged; label k
is the k-th class. For each image ``<name>`` it writes to ``--output``:

- ``<name>_overlay.png``: the segmentation drawn with Detectron2's Visualizer and a legend of the
  classes present;
- ``<name>_labels.png``: the label map (uint8 class indices; uint16 above 256 classes);
- ``<name>.json``: the vocabulary, each class's pixel count, share and mean score, the legend.

No calibration unless ``--calibration DATASET``: then the classes named like a seen class of
that registered dataset lose ``MODEL.OCZ.TEST.CALIBRATION`` from their scores, as in its
evaluation. An unreadable image (or one over ``MODEL.OCZ.TEST.MAX_IMAGE_PIXELS``, when set) is
reported and skipped; the others are still segmented and the
exit status is 1. Errors in the arguments (empty vocabulary, a name given twice, missing or
unreadable weights, a flag after the overrides) stop the tool with status 2 before any image,
with one message (``--debug`` or ``OCZ_D2_DEBUG=1`` shows the traceback). ``--allow-untrained``
accepts an empty ``MODEL.WEIGHTS`` (random heads: smoke tests only).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys
from pathlib import Path

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class UsageError(Exception):
    """An argument error: reported, and the tool exits with status 2 before any image."""


_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+|OUTPUT_DIR|SEED")


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors name a flag written after the config overrides (argparse gives
    every word after the first override to them, then misses the flag)."""

    argv: list[str] = []

    def error(self, message: str):
        words = self.argv
        for i, word in enumerate(words):
            if _CONFIG_KEY.fullmatch(word) and i + 1 < len(words):
                flags = [w for w in words[i + 2 :] if w.startswith("--")]
                if flags:
                    message = (
                        f"{flags[0]} comes after the config overrides: flags go before them, "
                        "the KEY VALUE pairs last"
                    )
                break
        super().error(message)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the model's config")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or (quoted) globs"
    )
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--classes", help='comma-separated class names, e.g. "cat, sofa|couch"')
    vocab.add_argument("--vocab-file", help="a text file with one class (name|synonym...) a line")
    parser.add_argument("--output", default="output/segment", help="output folder")
    parser.add_argument(
        "--calibration",
        metavar="DATASET",
        help="calibrate the seen classes of this registered dataset (default: no calibration)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per model call; those of one size go through the model in one forward",
    )
    parser.add_argument(
        "--allow-untrained",
        action="store_true",
        help="accept an empty MODEL.WEIGHTS (random heads; for smoke tests)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of argument errors (OCZ_D2_DEBUG=1)"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, after every flag"
    )
    parser.argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(argv)


def read_vocabulary(args):
    """The :class:`~ocz_d2.modeling.text.Vocabulary` of ``--classes`` / ``--vocab-file``."""
    from ocz_d2.modeling.text import Vocabulary

    try:
        if args.vocab_file is not None:
            if not os.path.isfile(args.vocab_file):
                raise UsageError(f"--vocab-file {args.vocab_file} does not exist")
            return Vocabulary.from_file(args.vocab_file)
        if not args.classes.replace(",", "").strip():
            raise UsageError("--classes is empty: give comma-separated names, e.g. 'cat, dog'")
        return Vocabulary.from_text(args.classes)
    except ValueError as e:
        raise UsageError(f"bad vocabulary: {e}") from None


def expand_inputs(specs: list[str]) -> tuple[list[str], list[str]]:
    """Image paths (in order, without repeats) and error messages for inputs that give none.

    A file is taken as given (its readability is checked when it is read); a folder gives its
    files with an image extension (sorted, not recursive); anything else is a glob.
    """
    paths, errors = [], []
    for spec in specs:
        if os.path.isfile(spec):
            found = [spec]
        elif os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                errors.append(f"folder {spec} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        elif glob.has_magic(spec):
            found = sorted(
                p
                for p in glob.glob(spec, recursive=True)
                if os.path.isfile(p) and Path(p).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                errors.append(f"no image matches {spec}")
        else:
            errors.append(f"cannot read image {spec}: no such file or folder")
            found = []
        paths.extend(found)
    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    return unique, errors


def output_names(paths: list[str]) -> list[str]:
    """A distinct file-name stem per input: its own, with -2, -3... when another input of the
    same stem (from another folder) came first."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        names.append(name)
    return names


def build_predictor(args):
    """The :class:`~ocz_d2.engine.ZeroShotPredictor` of the config and weights."""
    import torch

    from ocz_d2.config import ConfigError, load_config
    from ocz_d2.engine import ZeroShotPredictor
    from ocz_d2.engine.cli import check_overrides

    check_overrides(args.opts, "segment.py")
    try:
        cfg = load_config(args.config_file, args.opts)
    except ConfigError as e:
        raise UsageError(f"config error: {e}") from None
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("ocz_d2").info("no CUDA device: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS and not args.allow_untrained:
        raise UsageError(
            "MODEL.WEIGHTS is empty: give the trained model, e.g. MODEL.WEIGHTS "
            "output/demo/model_final.pth (or --allow-untrained for a smoke run with random heads)"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        return ZeroShotPredictor(
            cfg,
            allow_untrained=args.allow_untrained,
            calibration=args.calibration,
            batch_size=args.batch_size,
        )
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def run(args) -> int:
    from tqdm import tqdm

    from ocz_d2.engine import load_image
    from ocz_d2.engine.outputs import write_segmentation
    from ocz_d2.engine.predictor import check_image_pixels

    vocabulary = read_vocabulary(args)
    paths, errors = expand_inputs(args.input)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if not paths:
        raise UsageError("no image to segment: check --input")
    predictor = build_predictor(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = len(errors)
    names = output_names(paths)
    bar = tqdm(total=len(paths), unit="image", desc="segment", file=sys.stderr)
    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path, name in zip(paths[start : start + args.batch_size], names[start:]):
            try:
                image = load_image(path)
                check_image_pixels(*image.shape[:2], predictor.max_image_pixels, f"image {path}")
                batch.append((path, name, image))
            except ValueError as e:
                tqdm.write(f"error: {e} (skipped)", file=sys.stderr)
                failed += 1
                bar.update(1)
        if not batch:
            continue
        results = predictor.predict([image for _, _, image in batch], vocabulary)
        for (path, name, image), result in zip(batch, results):
            write_segmentation(out, name, path, image, result, predictor)
            bar.update(1)
    bar.close()
    done = len(paths) - (failed - len(errors))
    print(f"{done} image(s) segmented into {out}", file=sys.stderr)
    if failed:
        print(f"error: {failed} input(s) failed (see above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.engine.cli import USER_ERROR_STATUS, debug_enabled, run_tool
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    try:
        return run_tool(run, args, debug=args.debug)
    except UsageError as e:
        if debug_enabled(args.debug):
            raise
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
