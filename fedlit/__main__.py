"""``python -m fedlit``: the ``fedlit`` command (:mod:`fedlit.command`)."""

import sys

if __name__ == "__main__":
    if [a for a in sys.argv[1:] if not a.startswith("-")][:1] == ["train"]:
        # Before the seconds of torch/lightning imports: a SIGUSR1/SIGTERM during start-up stops the run at the
        # first round boundary (exit code 3) instead of killing it. The signals module imports nothing heavy.
        from fedlit.federation.signals import STOP

        STOP.install()
    from fedlit.command import main

    sys.exit(main())
