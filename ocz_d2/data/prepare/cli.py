"""Command-line plumbing shared by ``datasets/prepare_*.py``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from ...utils.io import datasets_root
from ...utils.parallel import default_workers
from .common import PrepareError, PrepareResult, format_summary

__all__ = ["DefaultsHelpFormatter", "base_parser", "run_cli"]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" suffix, left out where the help already says the default and
    for defaults that say nothing (None, False of a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def base_parser(description: str, out_name: str) -> argparse.ArgumentParser:
    """A parser with the options every prepare script shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    parser.add_argument(
        "--out",
        default=os.path.join(datasets_root(), out_name),
        help="output folder (the split file expects $DETECTRON2_DATASETS/" + out_name + ")",
    )
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="processes (default: the cores)"
    )
    parser.add_argument(
        "--images",
        choices=("symlink", "hardlink", "copy"),
        default="symlink",
        help="how images enter the output folder",
    )
    parser.add_argument(
        "--no-count-check",
        action="store_true",
        help="accept image counts that differ from the protocol's",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_cli(
    prepare: Callable[..., PrepareResult], args: argparse.Namespace, **kwargs
) -> tuple[int, str]:
    """Run ``prepare`` with the shared options.

    Returns:
        ``(0, summary)``, or ``(1, "error: ...")`` for a :class:`PrepareError`; the script prints
        the text (to stderr when the code is not 0).
    """
    try:
        result = prepare(
            out=args.out,
            workers=args.workers,
            image_mode=args.images,
            check_counts=not args.no_count_check,
            progress=not args.no_progress,
            **kwargs,
        )
    except PrepareError as e:
        return 1, f"error: {e}"
    return 0, format_summary(result)
