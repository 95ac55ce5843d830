"""Train with fedlit: ``python experiments/train.py --config configs/default.yaml [key=value ...]``."""

import sys

from fedlit.cli import main

if __name__ == "__main__":
    sys.exit(main())
