#!/usr/bin/env python
"""Prepare the benchmark from its raw download; see datasets/README.md and `--help`."""

import sys

from ocz_d2.data.prepare.ade20k import cli
from ocz_d2.data.prepare.cli import script_main


def main(argv: list[str] | None = None) -> int:
    return script_main(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
