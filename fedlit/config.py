"""Typed configuration: dataclass defaults, OmegaConf merging of YAML files and ``key=value`` overrides,
and validation that turns every bad input into one :class:`ConfigError` line.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fedlit.errors import UserError

ALGORITHMS = ("zeroshot", "coop_local", "promptfl", "fedprox", "pfedmoap")
PARTITIONS = ("iid", "dirichlet", "pathological", "domain")


class ConfigError(UserError):
    """A configuration problem, reported to the user as one line (exit code 2 from the CLI)."""


@dataclass
class BackboneConfig:
    name: str = "shapes-clip"  # open_clip model name, "shapes-clip" (built offline) or "tiny" (random)
    pretrained: str | None = None  # open_clip pretrained tag (e.g. "openai") or a local weights file
    cache_dir: str = "~/.cache/fedlit"  # where built backbones and feature caches live
    sanity_check: bool = True  # pretrained backbones: stop if zero-shot accuracy is at chance (misaligned names)


@dataclass
class PromptConfig:
    n_ctx: int = 16
    ctx_init: str | None = None  # e.g. "a photo of a"; then n_ctx is its token count
    class_specific: bool = False
    class_position: str = "end"  # end | front | middle
    init_std: float = 0.02


@dataclass
class GateConfig:
    d_gate: int = 128
    num_heads: int = 8
    scale: float = 10.0
    top_k: int | None = None  # None: all experts; k >= 1: top-k routing (k = 1 is hard routing)


@dataclass
class DataConfig:
    name: str = "shapes"
    root: str = "data"
    download: bool = False
    augment: bool | None = None  # None: the dataset's own default (CLIP datasets: on, CIFAR/shapes: off)
    use_split_file: bool = True  # use CoOp's split_zhou_<Name>.json when it is present
    partition: str = "pathological"
    num_clients: int = 10
    alpha: float = 0.5  # Dirichlet concentration (dirichlet; domain uses its own, default 0.3)
    domain_alpha: float = 0.3
    shots: int | None = 16  # few-shot train images per owned class (pathological); None = all
    min_size: int = 10  # dirichlet/domain: minimum train and test samples per client
    train_per_class: int = 64  # shapes only: generated train images per class
    test_per_class: int = 32  # shapes only: generated test images per class
    shapes_brightness: float = 1.0  # shapes only: < 1 darkens the images (a domain shift from the pretraining data)
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class FederationConfig:
    rounds: int = 10
    frac: float = 1.0  # fraction of clients sampled per round
    local_epochs: int = 5
    eval_every: int = 1


@dataclass
class OptimConfig:
    prompt_lr: float = 0.002
    gate_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    persistent_state: bool = False  # keep each client's optimiser state across rounds


@dataclass
class MethodConfig:
    num_experts: int = 10  # pFedMoAP: counts the local expert too (K = num_experts - 1)
    selection: str = "knn"  # knn | random
    lam: float = 0.5  # weight of the local logits in pFedMoAP
    mu: float = 0.01  # FedProx proximal weight
    aggregate_gate: bool = False  # pFedMoAP ablation: FedAvg the gates too
    template: str = "a photo of a {}."  # zero-shot hand prompt


@dataclass
class PerfConfig:
    cache_features: bool = True  # False: encode images at every step and evaluation (the straightforward path)
    cut_text: bool = True  # False: run full 77-token text sequences
    share_prefix: bool = True  # run the start token + context once per prompt, not once per class (needs cut_text)
    client_batch: int = 0  # G clients of a rank trained together (one text-encoder batch); 0 = auto (GPU: by
    # free memory; CPU: 1, which keeps 1 and N processes bitwise equal; set G for 1.2-1.6x there)
    augmented_views: int = 0  # > 0: precompute this many augmented views per train image (changes semantics)
    disk_cache: bool = False  # also keep image features on disk under backbone.cache_dir/features


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    strategy: str = "auto"


@dataclass
class RunConfig:
    name: str = "default"
    out_dir: str = "runs"
    resume: str | None = None  # None | "auto" | path of a run directory
    quiet: bool = False


@dataclass
class Config:
    algorithm: str = "pfedmoap"  # one of ALGORITHMS, or "all" to run every method in turn
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FederationConfig = field(default_factory=FederationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, e.g. ``["algorithm", "backbone.name", ...]``."""
    keys = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_all_keys(type(default), name + "."))
        else:
            keys.append(name)
    return keys


def valid_keys() -> list[str]:
    """All dotted configuration keys."""
    return _all_keys(Config)


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help to list the keys"
    return f"unknown config key '{key}'{hint}"


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(str(err.full_key))) from None
    except ValidationError as err:
        raise ConfigError(f"{origin}: bad value for '{err.full_key}': {err.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{origin}: {str(err).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Typed defaults, then the YAML file ``path`` (if any), then ``key=value`` overrides; validated."""
    merged: DictConfig = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # noqa: BLE001 - YAML syntax errors of many kinds
            raise ConfigError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
        merged = _merge(merged, loaded, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        if key not in valid_keys():
            raise ConfigError(_unknown_key_message(key))
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from None
        merged = _merge(merged, dotlist, "override")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(data: dict) -> Config:
    """A Config from a plain nested dict (e.g. one stored in a checkpoint)."""
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), data, "dict"))  # type: ignore[return-value]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Raise ConfigError for impossible values or combinations."""
    _check(cfg.algorithm in ALGORITHMS + ("all",),
           f"unknown algorithm '{cfg.algorithm}'; choose one of {', '.join(ALGORITHMS)} or all")
    _check(cfg.data.partition in PARTITIONS,
           f"unknown data.partition '{cfg.data.partition}'; choose one of {', '.join(PARTITIONS)}")
    _check(cfg.prompt.n_ctx >= 1, f"prompt.n_ctx must be >= 1 (got {cfg.prompt.n_ctx})")
    _check(cfg.prompt.class_position in ("end", "front", "middle"),
           f"prompt.class_position must be end, front or middle (got '{cfg.prompt.class_position}')")
    _check(cfg.data.num_clients >= 1, f"data.num_clients must be >= 1 (got {cfg.data.num_clients})")
    _check(0.0 < cfg.fed.frac <= 1.0, f"fed.frac must be in (0, 1] (got {cfg.fed.frac})")
    _check(cfg.fed.rounds >= 1, f"fed.rounds must be >= 1 (got {cfg.fed.rounds})")
    _check(cfg.fed.local_epochs >= 1, f"fed.local_epochs must be >= 1 (got {cfg.fed.local_epochs})")
    _check(cfg.fed.eval_every >= 1, f"fed.eval_every must be >= 1 (got {cfg.fed.eval_every})")
    _check(cfg.data.batch_size >= 1, f"data.batch_size must be >= 1 (got {cfg.data.batch_size})")
    _check(cfg.data.shots is None or cfg.data.shots >= 1, f"data.shots must be >= 1 (got {cfg.data.shots})")
    _check(cfg.method.num_experts >= 1, f"method.num_experts must be >= 1 (got {cfg.method.num_experts})")
    if cfg.algorithm == "pfedmoap":
        _check(cfg.method.num_experts <= cfg.data.num_clients,
               f"method.num_experts={cfg.method.num_experts} exceeds data.num_clients={cfg.data.num_clients}; "
               "the local expert plus K = num_experts - 1 other clients must exist")
    _check(cfg.method.selection in ("knn", "random"),
           f"method.selection must be knn or random (got '{cfg.method.selection}')")
    _check(cfg.gate.top_k is None or cfg.gate.top_k >= 1, f"gate.top_k must be >= 1 (got {cfg.gate.top_k})")
    _check(cfg.gate.d_gate % cfg.gate.num_heads == 0,
           f"gate.d_gate={cfg.gate.d_gate} must be divisible by gate.num_heads={cfg.gate.num_heads}")
    _check(cfg.perf.client_batch >= 0, f"perf.client_batch must be >= 0 (got {cfg.perf.client_batch})")
    _check(cfg.perf.augmented_views >= 0, f"perf.augmented_views must be >= 0 (got {cfg.perf.augmented_views})")
    _check(cfg.trainer.devices >= 1 and cfg.trainer.num_nodes >= 1, "trainer.devices and num_nodes must be >= 1")
    _check(cfg.run.resume in (None, "auto") or Path(str(cfg.run.resume)).is_dir(),
           f"run.resume must be auto or an existing run directory (got '{cfg.run.resume}')")
