"""``fedlit-train`` / ``experiments/train.py``: a config file plus ``key=value`` overrides -> a federated run."""

from __future__ import annotations

import argparse
import sys

from fedlit.config import ConfigError, load_config

MAIN_KEYS = """main keys (any key of the config can be overridden as key=value):
  algorithm=pfedmoap|promptfl|fedprox|coop_local|zeroshot|all   seed=0
  backbone.name=shapes-clip|tiny|RN50-quickgelu|ViT-B-16-quickgelu|...  backbone.pretrained=openai|/path/to/file
  data.name=shapes|cifar10|cifar100|caltech101|oxford_pets|flowers102|food101|dtd|domainnet|office_caltech10
  data.root=data  data.partition=pathological|dirichlet|domain|iid  data.num_clients=10  data.alpha=0.5
  data.shots=16  fed.rounds=10  fed.frac=1.0  fed.local_epochs=5  fed.eval_every=1
  method.num_experts=10  method.selection=knn|random  method.lam=0.5  method.mu=0.01  gate.top_k=null
  prompt.n_ctx=16  prompt.ctx_init=null  prompt.class_specific=false  optim.prompt_lr=0.002  optim.gate_lr=0.01
  trainer.devices=1  trainer.accelerator=cpu|gpu  trainer.precision=32-true|bf16-mixed|16-mixed
  run.name=default  run.out_dir=runs  run.resume=null|auto|<run dir>  run.quiet=false
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedlit-train",
        description="Federated prompt learning on CLIP (PromptFL, pFedMoAP and baselines).",
        epilog=MAIN_KEYS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", default=None, help="YAML config file (default: typed defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm=promptfl fed.rounds=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for bad input, 0 on success or requeue)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fedlit.federation.experiment import Preempted, requeue_slurm_job, run_experiment
    from fedlit.federation.signals import STOP

    STOP.install()  # a stop signal during start-up is honoured at the first round boundary
    try:
        run_experiment(cfg)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except Preempted as stop:
        requeued = requeue_slurm_job()
        print(f"fedlit: {stop}; {'requeued' if requeued else 'resume with run.resume=auto'}", file=sys.stderr)
        return 0 if requeued else 3
    finally:
        STOP.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
