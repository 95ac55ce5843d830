"""The ``fedlit`` command (also ``python -m fedlit``): ``train``, ``compare``, ``plot``, ``export``, ``audit``,
``sweep``, ``slurm``, ``print-config`` and ``--version``; bare ``fedlit`` prints the help.

``fedlit train`` is :func:`fedlit.cli.main` (the ``fedlit-train`` script) with its exit codes: 0 success, 1 a bug,
2 bad input, 3 stopped by a signal, 4 diverged, 130 Ctrl-C. The other subcommands exit 0, or 2 with one
``error: ...`` line on bad input, 130 with one line on Ctrl-C (and ``fedlit sweep run`` with the exit code of its
first failing cell). Only light modules are imported here, so that ``fedlit train`` installs its stop-signal
handlers before torch and lightning load.
"""

from __future__ import annotations

import argparse
import sys

from fedlit import __version__
from fedlit.cli import EXIT_BAD_INPUT, interrupted, one_line
from fedlit.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors (one line, exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def print_config(args: argparse.Namespace) -> int:
    """Print the resolved config as YAML and the summary line; inert-method warnings go to stderr."""
    from fedlit.config import load_config
    from fedlit.packaged import resolve_config
    from fedlit.summary import describe, inert_warnings

    cfg = load_config(resolve_config(args.config), args.overrides)
    for warning in inert_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    print(describe(cfg))
    return 0


def compare(args: argparse.Namespace) -> int:
    """``fedlit compare``: see :mod:`fedlit.compare`."""
    from fedlit import compare as module

    return module.run(args)


def plot(args: argparse.Namespace) -> int:
    """``fedlit plot``: see :mod:`fedlit.plots`."""
    from fedlit import plots

    return plots.run(args)


def sweep(args: argparse.Namespace) -> int:
    """``fedlit sweep count|range|args|list|run``: see :mod:`fedlit.sweeps`."""
    from fedlit import sweeps
    from fedlit.packaged import resolve_config

    try:
        spec = sweeps.read_sweep(resolve_config(args.file) or args.file)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    if args.action == "count":
        print(len(spec.cells))
    elif args.action == "range":
        print(sweeps.array_range(len(spec.cells), args.max_parallel))
    elif args.action == "args":
        try:
            print("\n".join(spec.argv(args.index)))
        except IndexError as err:
            raise UserError(str(err)) from None
    elif args.action == "list":
        for index, cell in enumerate(spec.cells):
            print(f"{index}: {' '.join(cell)}")
    else:
        if args.jobs < 1:
            raise UserError(f"--jobs must be >= 1 (got {args.jobs})")
        codes = sweeps.run_sweep(spec, args.jobs, args.log_dir or sweeps.default_log_dir(spec))
        failed = [i for i, code in enumerate(codes) if code != 0]
        if failed:
            print(f"error: {len(failed)} of {len(codes)} cells failed: {', '.join(map(str, failed))}", file=sys.stderr)
            return codes[failed[0]]
    return 0


def slurm(args: argparse.Namespace) -> int:
    """``fedlit slurm array|run``: see :mod:`fedlit.submit`."""
    from fedlit import submit

    return submit.run(args)


def export(args: argparse.Namespace) -> int:
    """``fedlit export``: see :mod:`fedlit.export`."""
    from fedlit import export as module

    return module.run(args)


def audit(args: argparse.Namespace) -> int:
    """``fedlit audit``: see :mod:`fedlit.audit`."""
    from fedlit import audit as module

    return module.run(args)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return int(text)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sweep", help="expand or run a sweep file", description="Sweep files (fedlit/sweeps.py).")
    actions = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name, text in (("count", "number of cells"), ("list", "every cell's overrides, one a line")):
        actions.add_parser(name, help=text).add_argument("file", help="sweep file (or a packaged one: sweeps/table1)")
    ranged = actions.add_parser("range", help="the sbatch --array spec")
    ranged.add_argument("file")
    ranged.add_argument("max_parallel", nargs="?", type=_positive, help="at most this many tasks at once")
    one = actions.add_parser("args", help="the train arguments of cell INDEX, one a line")
    one.add_argument("file")
    one.add_argument("index", type=int)
    runner = actions.add_parser("run", help="run every cell here, N subprocesses at a time",
                                description="Run the cells as local subprocesses (fedlit train), N at a time, "
                                            "each with OMP_NUM_THREADS = available cores // N.")
    runner.add_argument("file")
    runner.add_argument("--jobs", "-j", type=int, default=1, help="cells at a time (default 1)")
    runner.add_argument("--log-dir", default=None,
                        help="one log per cell, named by its run.name (default <run.out_dir>/<sweep name>-logs)")
    parser.set_defaults(func=sweep)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedlit export`` (here rather than in :mod:`fedlit.export`, which loads torch)."""
    parser.add_argument("run_dir", help="a method's run directory (the folder that holds its checkpoint.pt)")
    parser.add_argument("--client", "-i", type=int, required=True, help="the client id (0 .. N-1)")
    parser.add_argument("--out", default=None,
                        help="the checkpoint file (default <run_dir>/export/client-<i>.ckpt)")


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedlit audit`` (here rather than in :mod:`fedlit.audit`, which loads torch)."""
    parser.add_argument("run_dir", help="a run directory (a method's folder, or an algorithm=all run: every method)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence of the Clopper-Pearson bounds behind the epsilon lower bound (default 0.95)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the class balancing and of the attack's half splits (default 0)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand except ``train`` (which keeps :func:`fedlit.cli.parse_args`)."""
    from fedlit import compare as compare_module
    from fedlit import plots
    from fedlit import submit as submit_module

    parser = _Parser(prog="fedlit",
                     description="Federated prompt learning on CLIP: train, compare, plot, export, audit, sweep.",
                     epilog="fedlit train --help lists the main config keys.")
    parser.add_argument("--version", action="version", version=f"fedlit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of bad-input errors too")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("train", help="train: fedlit train --config FILE [key=value ...] (see fedlit train --help)")
    shown = sub.add_parser("print-config", help="the resolved config as YAML and a one-line summary")
    shown.add_argument("--config", "-c", default=None, help="YAML file or packaged name (paper/table1_dtd)")
    shown.add_argument("overrides", nargs="*", help="key=value overrides")
    shown.set_defaults(func=print_config)
    compared = sub.add_parser("compare", help="mean ± std and 95%% CI over seeds per config group")
    compare_module.add_arguments(compared)
    compared.set_defaults(func=compare)
    plotted = sub.add_parser("plot", help="accuracy, client spread, expert attention, base/novel figures")
    plots.add_arguments(plotted)
    plotted.set_defaults(func=plot)
    exported = sub.add_parser("export", help="one client's trained model as a Lightning checkpoint",
                              description="Write client i's personalised model, as fedlit evaluated it, as a "
                                          "Lightning checkpoint of its client module (fedlit/export.py).")
    add_export_arguments(exported)
    exported.set_defaults(func=export)
    audited = sub.add_parser("audit", help="membership-inference audit of a run next to its accountant epsilon",
                             description="Loss-threshold and likelihood-ratio membership attacks on a trained run's "
                                         "samples and clients: AUC and an empirical epsilon lower bound next to the "
                                         "accountant's epsilon; writes audit.json (fedlit/audit.py).")
    add_audit_arguments(audited)
    audited.set_defaults(func=audit)
    _sweep_parser(sub)
    submitted = sub.add_parser("slurm", help="submit a sweep (array) or a run to Slurm with the packaged scripts",
                               description="sbatch with the packaged scripts; cluster settings from FEDLIT_PARTITION, "
                                           "FEDLIT_ACCOUNT, FEDLIT_TIME, FEDLIT_MEM, FEDLIT_CPUS, FEDLIT_GPUS, logs "
                                           "in FEDLIT_LOG_DIR (default slurm-logs).")
    submit_module.add_arguments(submitted)
    submitted.set_defaults(func=slurm)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlit``; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = [a for a in argv if a.startswith("-")]
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] == "train":
        from fedlit.cli import main as train_main

        return train_main(argv[:first] + argv[first + 1:], prog="fedlit train")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # bare ``fedlit``: what it can do
            parser.print_help()
            return 0
        return args.func(args)
    except KeyboardInterrupt:
        return interrupted()
    except UserError as err:
        if "--debug" in flags:
            import traceback

            traceback.print_exc()
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
