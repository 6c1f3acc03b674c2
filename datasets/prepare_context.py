#!/usr/bin/env python
"""Prepare the benchmark from its raw download; see datasets/README.md and `--help`."""

import sys

from ocz_d2.data.prepare.cli import script_main
from ocz_d2.data.prepare.context import cli


def main(argv: list[str] | None = None) -> int:
    return script_main(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
