"""``fedlit train`` / ``fedlit-train`` / ``experiments/train.py``: a config file plus ``key=value`` overrides -> a
federated run. A ``--config`` that is not a file names a packaged config (``paper/table1_dtd``, see
:mod:`fedlit.packaged`). Warnings about a method whose defining feature is inert go to stderr before the run.

Exit codes: 0 success (or stopped and requeued under Slurm), 2 bad input (:class:`~fedlit.errors.UserError`, or a
write refused because the disk is full, read-only, over quota or not permitted): one line ``error: ...`` on
stderr, and nothing written when the input is bad. 3 stopped by SIGUSR1/SIGTERM (resume with ``run.resume=auto``).
4 training diverged (a non-finite loss or parameter; one line naming the round and client, the last good
checkpoint kept). 130 interrupted by Ctrl-C (one line; resume with ``run.resume=auto``, and an interrupted
``shapes-clip`` pretraining continues from its last saved step).
Any other exception is a bug: it keeps its traceback (exit 1). ``--debug`` shows the traceback of user errors too.

Only light modules are imported at the top (the stop-signal handlers go in first); the configuration, torch and
lightning load inside :func:`main`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from fedlit.errors import Diverged, UserError
from fedlit.federation.signals import STOP, Preempted, requeue_slurm_job

MAIN_KEYS = """main keys (any key of the config can be overridden as key=value):
  algorithm={algorithms}|all   seed=0
  backbone.name=shapes-clip|fashion-clip|tiny|RN50-quickgelu|ViT-B-16-quickgelu|...
  backbone.pretrained=openai|/path/to/file|random
  data.name=shapes|cifar10|cifar100|caltech101|oxford_pets|flowers102|food101|dtd|domainnet|office_caltech10
           |fashion_mnist|digits
  data.root=data  data.partition=pathological|dirichlet|domain|iid  data.num_clients=10  data.alpha=0.5
  data.shots=16  fed.rounds=10  fed.frac=1.0  fed.local_epochs=5  fed.eval_every=1
  method.num_experts=10  method.selection=knn|random  method.lam=0.5  method.mu=0.01  gate.top_k=null
  prompt.n_ctx=16  prompt.ctx_init=null  prompt.class_specific=false  optim.prompt_lr=0.002  optim.gate_lr=0.01
  trainer.devices=1  trainer.accelerator=auto|cpu|gpu|cuda|mps  trainer.precision=32-true|bf16-mixed|16-mixed
  run.name=default  run.out_dir=runs  run.resume=null|auto|<run dir>  run.quiet=false
  run.loggers=[csv]|[csv,tensorboard]|[wandb]|[]   (Lightning loggers under <run dir>/logs/)

run.name is one plain folder name (letters, digits, . _ - + = , @; at most 100 characters); runs are written to
run.out_dir/run.name/<algorithm>-<timestamp>/ (all-<timestamp>/<method>/ with algorithm=all). Bad input prints
one line and exits with code 2 before anything is written.
"""

# Write failures that are the machine's state, not a bug: reported as one line naming the path (exit code 2).
WRITE_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT)
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors (one line, exit code 2) instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def parse_args(argv: list[str] | None, prog: str = "fedlit-train") -> argparse.Namespace:
    """The command line: ``--config``, ``--debug`` and ``key=value`` overrides (usage errors are UserErrors);
    ``--help`` lists the main keys and every method."""
    from fedlit.config import ALGORITHMS  # after the stop-signal handlers: the config module loads omegaconf

    parser = _Parser(
        prog=prog,
        description="Federated prompt learning on CLIP (PromptFL, pFedMoAP and baselines).",
        epilog=MAIN_KEYS.format(algorithms="|".join(ALGORITHMS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config file, or a packaged one by name (paper/table1_dtd; default: typed defaults)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of bad-input errors too")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm=promptfl fed.rounds=5")
    return parser.parse_args(argv)


def one_line(text: str) -> str:
    """``text`` as a single line: its non-blank lines joined by spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def write_error(err: BaseException) -> OSError | None:
    """The OSError of a refused write (disk full, permission, read-only, quota) in ``err`` or what caused it, or
    None. torch.save on a full disk raises a C++ RuntimeError whose context holds the OSError."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current
        todo.extend([current.__cause__, current.__context__])
    return None


def write_error_message(err: OSError, out_dir: str, cache_dir: str) -> str:
    """One line for a refused write, naming the path the OSError carries, else the two places a run writes to."""
    reason = f"{err.strerror or errno.errorcode.get(err.errno or 0, 'error')} (errno {err.errno})"
    if err.filename:
        return f"cannot write {err.filename}: {reason}"
    return f"cannot write under run.out_dir={out_dir} or backbone.cache_dir={cache_dir}: {reason}"


def check_accelerator(accelerator: str, devices: int) -> None:
    """UserError when ``trainer.accelerator`` names a device this machine does not have, or more GPUs than are
    visible (Fabric would raise a RuntimeError after the imports); ``auto`` picks the GPU when one is visible."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (accelerator == "cuda" and not cuda) or (accelerator == "gpu" and not (cuda or mps)):
        raise UserError(f"trainer.accelerator={accelerator} but no GPU is available on this machine; "
                        "use trainer.accelerator=cpu or auto")
    if accelerator == "mps" and not mps:
        raise UserError("trainer.accelerator=mps but Apple's MPS is not available on this machine; "
                        "use trainer.accelerator=cpu or auto")
    if accelerator in ("gpu", "cuda", "auto") and cuda and devices > torch.cuda.device_count():
        raise UserError(f"trainer.devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible")


def is_first_process() -> bool:
    """Whether this is the first process of a run (launched DDP workers and Slurm tasks other than 0 are not)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def train(args: argparse.Namespace) -> int:
    """Load and validate the configuration, warn about inert methods, then run it; returns the exit code (0, or 3
    after a stop signal). A refused write (disk full, permission, read-only, quota) becomes a UserError."""
    from fedlit.config import load_config
    from fedlit.packaged import resolve_config
    from fedlit.summary import inert_warnings

    cfg = load_config(resolve_config(args.config), args.overrides)
    check_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    if is_first_process():
        for warning in inert_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)
    from fedlit.federation.experiment import run_experiment

    try:
        run_experiment(cfg)
    except Diverged as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as stop:
        requeued = requeue_slurm_job()
        print(f"fedlit: {stop}; {'requeued' if requeued else 'resume with run.resume=auto'}", file=sys.stderr)
        return 0 if requeued else EXIT_STOPPED
    except Exception as err:
        refused = write_error(err)
        if refused is None:
            raise
        raise UserError(write_error_message(refused, cfg.run.out_dir, cfg.backbone.cache_dir)) from err
    return 0


def _report(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {one_line(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def interrupted(resume_hint: bool = False) -> int:
    """Ctrl-C: one line on stderr (from the first process only: every process of a run gets the SIGINT) and exit
    code 130; the files written so far are whole (every write is atomic)."""
    if is_first_process():
        hint = "; resume with run.resume=auto" if resume_hint else ""
        print(f"fedlit: interrupted (Ctrl-C){hint}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None, prog: str = "fedlit-train") -> int:
    """Entry point; returns the process exit code (see the module docstring). A stop signal from this point on is
    recorded and honoured at the first round boundary; Ctrl-C stops at once (:func:`interrupted`)."""
    STOP.install()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return train(parse_args(argv, prog))
    except UserError as err:
        return _report(str(err), debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return interrupted(resume_hint=True)
    finally:
        STOP.uninstall()


if __name__ == "__main__":
    sys.exit(main())
