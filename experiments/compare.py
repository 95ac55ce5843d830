"""Compare runs: ``python experiments/compare.py RUN_DIR [RUN_DIR ...] [--format text|markdown|csv]``, the same
as ``fedlit compare``: runs grouped by every config key that differs except the seed and bookkeeping keys, mean ±
std and a 95% confidence interval over seeds of the personalised and global accuracy (and base/novel/HM)."""

import sys

from fedlit.command import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
