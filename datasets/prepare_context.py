#!/usr/bin/env python
"""Prepare the benchmark from its raw download; see datasets/README.md and `--help`."""

import sys

from ocz_d2.data.prepare.context import cli


def main(argv: list[str] | None = None) -> int:
    code, text = cli(argv)
    print(text, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
