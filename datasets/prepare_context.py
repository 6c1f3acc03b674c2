#!/usr/bin/env python
"""Prepare the benchmark from its raw download; see datasets/README.md and `--help`."""

import sys

from ocz_d2.data.prepare.context import main

if __name__ == "__main__":
    sys.exit(main())
