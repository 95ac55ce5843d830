"""Train with fedlit: ``python experiments/train.py --config configs/default.yaml [key=value ...]``."""

import sys

if __name__ == "__main__":
    # First, before the seconds of torch/lightning imports: a SIGUSR1/SIGTERM from now on stops the run at the first
    # round boundary (exit code 3) instead of killing the process. The signals module imports nothing heavy.
    from fedlit.federation.signals import STOP

    STOP.install()
    from fedlit.cli import main

    sys.exit(main())
