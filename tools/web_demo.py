#!/usr/bin/env python
"""A local web page for open-vocabulary segmentation: upload an image, type class names, see
the segmentation (Gradio; install the extra with `pip install -e .[web]` or `make setup-web`).

    python tools/web_demo.py --config-file configs/synthetic/ocz_tiny.yaml \\
        MODEL.WEIGHTS output/demo/model_final.pth [KEY VALUE ...]

It serves on http://127.0.0.1:7860, reachable from this machine only; `--host 0.0.0.0` opens
it to the network (anyone who reaches the port can use the model). Requests run one at a time,
the others wait in a queue of `--queue-size`. The page takes class names comma-separated with
`a|b` synonyms (as tools/segment.py), whole or slide inference and the segment-CLIP ensemble
(MODEL.OCZ.SEGMENT_CLIP), and gives the overlay with its legend, a table of the classes
present (area share, mean score) and the label PNG and JSON that tools/segment.py writes.
Images over `--max-image-pixels` (default: MODEL.OCZ.TEST.MAX_IMAGE_PIXELS, or 16 Mpx when
that is 0) and uploads over `--max-upload-mb` are refused with a message. The examples are the
miniature's test images under $DETECTRON2_DATASETS when they exist (`--examples` other files).
"""

from __future__ import annotations

import argparse
import os
import sys

# torch, Detectron2, Gradio and ocz_d2 are imported after the arguments are parsed.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="the model's config")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: all)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="refuse larger images (default: MODEL.OCZ.TEST.MAX_IMAGE_PIXELS, or 16000000 "
        "when that is 0)",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=50.0, help="largest upload in MB (default: 50)"
    )
    parser.add_argument(
        "--queue-size", type=int, default=16, help="requests waiting at most (default: 16)"
    )
    parser.add_argument(
        "--examples",
        nargs="*",
        default=None,
        help="example image files (default: the "
        "miniature's test images under $DETECTRON2_DATASETS, when they exist)",
    )
    parser.add_argument(
        "--example-classes",
        default=None,
        help="classes filled in with an example (default: the miniature's 16 classes)",
    )
    parser.add_argument(
        "--calibration",
        metavar="DATASET",
        help="calibrate the seen classes of this registered dataset (default: no calibration)",
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
    return parser.parse_args(argv)


def build(args):
    """The predictor, the page's logic and the page (not launched)."""
    import torch

    from ocz_d2.config import load_config
    from ocz_d2.engine import ZeroShotPredictor
    from ocz_d2.engine.cli import check_overrides
    from ocz_d2.engine.web_demo import WebSegmenter, build_web_demo, example_images
    from ocz_d2.miniature.synthetic import SYNTHETIC_CLASSES
    from ocz_d2.utils.errors import ArgumentError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ArgumentError(
            "the web page needs Gradio: pip install -e .[web] (or make setup-web)"
        ) from None
    check_overrides(args.opts, "web_demo.py")
    cfg = load_config(args.config_file, args.opts)
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS and not args.allow_untrained:
        raise ArgumentError(
            "MODEL.WEIGHTS is empty: give the trained model, e.g. MODEL.WEIGHTS "
            "output/demo/model_final.pth (or --allow-untrained for a smoke run with random heads)"
        )
    for name, value in (("--max-upload-mb", args.max_upload_mb), ("--queue-size", args.queue_size)):
        if value <= 0:
            raise ArgumentError(f"{name} must be > 0, got {value}")
    if args.max_image_pixels is not None and args.max_image_pixels <= 0:
        raise ArgumentError(f"--max-image-pixels must be > 0, got {args.max_image_pixels}")
    predictor = ZeroShotPredictor(
        cfg, allow_untrained=args.allow_untrained, calibration=args.calibration
    )
    segmenter = WebSegmenter(predictor, max_image_pixels=args.max_image_pixels)
    if args.examples is None:
        examples = example_images(os.environ.get("DETECTRON2_DATASETS", "datasets"))
        classes = args.example_classes
        if classes is None:
            classes = ", ".join(SYNTHETIC_CLASSES)
    else:
        examples, classes = args.examples, args.example_classes or ""
    return segmenter, build_web_demo(segmenter, examples=examples, example_classes=classes)


def launch(demo, args, *, block: bool = True):
    """Serve the page (queued, one request at a time); returns Gradio's (app, local URL, share
    URL) when ``block`` is False."""
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    return demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        ssr_mode=False,
        max_file_size=int(args.max_upload_mb * 1024 * 1024),
        prevent_thread_lock=not block,
        quiet=not block,
        footer_links=[],
        theme=_offline_theme(),
    )


def _offline_theme():
    """Gradio's default theme with system fonts: the page loads no web font from the internet."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


def run(args) -> int:
    segmenter, demo = build(args)
    print(f"[web] serving on http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr)
    launch(demo, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # No usage statistics, no update check: the page works offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.engine.cli import run_tool
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    return run_tool(run, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
