#!/usr/bin/env python
"""Make COCO Captions' image-caption CSVs (SimZSS's training set); see datasets/README.md."""

import sys

from ocz_d2.data.prepare.coco_captions import cli


def main(argv: list[str] | None = None) -> int:
    code, text = cli(argv)
    print(text, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
