"""Typed configuration: dataclass defaults, OmegaConf merging of YAML files and ``key=value`` overrides,
and validation that turns every bad input into one :class:`ConfigError` line before anything is written.

:func:`validate` checks every key: numbers (type, finite, range), choices, the zero-shot template, names and
paths. The rules for names and paths:

- ``run.name`` is one plain directory name of at most 100 characters: ASCII letters, digits and ``. _ - + = , @``,
  starting with a letter, digit or ``_``. So it is never empty, ``.``, ``..``, hidden, absolute or nested, and
  every output (``run.out_dir/run.name/<timestamp>/...``) stays inside ``run.out_dir``. Sub-folders are refused
  rather than allowed because ``run.resume=auto`` takes the newest folder directly under ``run.out_dir/run.name``,
  where a nested run's folder would be mistaken for a run.
- ``run.out_dir`` (and ``data.root`` when ``data.download=true``) must be a directory or creatable: the nearest
  existing ancestor must be a writable directory. Nothing is created by the check.
- ``run.resume`` is null, ``auto``, or an existing writable fedlit run directory (it holds ``config.yaml`` or
  ``checkpoint.pt``); a resumed run keeps writing there.
- ``backbone.pretrained`` is refused with the built-in backbones (``tiny``, ``shapes-clip``); one that names a file
  (as :mod:`fedlit.backbone` decides: a path or a weights suffix) must exist. An open_clip model needs it: a tag, a
  file, or ``random`` for random weights, asked for by name (a forgotten tag would otherwise train for hours on
  random weights).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fedlit.errors import UserError
from fedlit.loggers import logger_kinds_problem

BASELINE_ORDER = ("zeroshot", "coop_local", "promptfl", "fedprox", "pfedmoap")  # first in algorithm=all


def algorithm_names() -> tuple[str, ...]:
    """Every method: one file ``fedlit/algorithms/<name>.py`` each (listed, not imported, so that validating a
    config does not load torch); the baselines first, then the rest by name."""
    folder = Path(__file__).with_name("algorithms")
    found = {p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "base")}
    return tuple(n for n in BASELINE_ORDER if n in found) + tuple(sorted(found - set(BASELINE_ORDER)))


ALGORITHMS = algorithm_names()
PARTITIONS = ("iid", "dirichlet", "pathological", "domain")
# The names of fedlit.data.registry.DATASET_NAMES (a test keeps them equal; importing it here would pull in torch).
DATASETS = ("shapes", "cifar10", "cifar100", "caltech101", "oxford_pets", "flowers102", "food101", "dtd",
            "domainnet", "office_caltech10")
DOMAIN_DATASETS = ("domainnet", "office_caltech10")
# The domains of each domain dataset (fedlit.data.datasets reads them from here).
DATASET_DOMAINS = {"domainnet": ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                   "office_caltech10": ("amazon", "caltech", "dslr", "webcam")}
PROTOCOLS = ("standard", "base2novel", "heldout", "transfer")
DEFAULT_HELDOUT_FRACTION = 0.2
CLASS_POSITIONS = ("end", "front", "middle")
SELECTIONS = ("knn", "random")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
# Lightning's precision strings and their short aliases; transformer-engine needs a package fedlit does not use.
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64")
# fedlit calls Fabric.launch() without a function and never wraps models: spawn, FSDP and DeepSpeed do not apply.
STRATEGIES = ("auto", "ddp")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")  # as fedlit.backbone: pretrained is a file
BUILTIN_BACKBONES = ("tiny", "shapes-clip")  # fedlit's own weights: backbone.pretrained does not apply
RANDOM_WEIGHTS = "random"  # backbone.pretrained of an open_clip model trained from random weights, on purpose
MAX_INT = 2**31 - 1  # integer keys above this only overflow C code (numpy, torch) further down
MAX_SEED = 2**32 - 1
MAX_NAME_LENGTH = 100
NAME_MAX_BYTES = 255  # one path component (Linux NAME_MAX)
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,@-]*")
RESUME_MARKERS = ("config.yaml", "checkpoint.pt")
BOOLEAN_WORDS = ("", "false", "true", "none", "null")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "geometric_median", "centered_clipping", "monna")
PRE_AGGREGATORS = ("none", "nnm", "bucketing", "clipping")
ATTACKS = ("none", "sign_flip", "gaussian", "label_flip", "alie", "zero")
UPLOAD_ATTACKS = ("sign_flip", "gaussian", "alie", "zero")  # the attacks that change what a client uploads


class ConfigError(UserError):
    """A configuration problem, reported to the user as one line (exit code 2 from the CLI)."""


@dataclass
class BackboneConfig:
    name: str = "shapes-clip"  # open_clip model name, "shapes-clip" (built offline) or "tiny" (random)
    pretrained: str | None = None  # open_clip tag (e.g. "openai"), a local weights file, or "random" (open_clip only)
    cache_dir: str | None = None  # built backbones and feature caches (None: $FEDLIT_CACHE or ~/.cache/fedlit)
    sanity_check: bool = True  # pretrained backbones: stop if zero-shot accuracy is at chance (misaligned names)


@dataclass
class PromptConfig:
    n_ctx: int = 16
    ctx_init: str | None = None  # e.g. "a photo of a"; then n_ctx is its token count
    class_specific: bool = False
    class_position: str = "end"  # end | front | middle
    init_std: float = 0.02
    # Prompts inside the image encoder (VPT, IVLP, MaPLe, FedMGP; ViT backbones only):
    vision_n_ctx: int = 2  # prompt tokens per prompted layer of the image tower (MaPLe/IVLP's public N_CTX)
    depth: int | None = None  # layers of each tower that hold prompts, from the first prompted one: 1 = shallow,
    # None = every layer (deep); checked against the backbone's layers when the run starts
    vision_start_layer: int = 0  # first image-tower block with prompts; the blocks below it are frozen and cached


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
    drop_last: bool = False  # drop each client's last partial train batch in every epoch (reference code's DataLoader)


@dataclass
class FederationConfig:
    rounds: int = 10
    frac: float = 1.0  # fraction of clients sampled per round
    local_epochs: int = 5
    eval_every: int = 1
    dropout: float = 0.0  # probability that a sampled client fails to upload (seeded per seed, round, client)


@dataclass
class EvalConfig:
    protocol: str = "standard"  # standard | base2novel (train on the first half of the classes, test base and novel)
    # | heldout (clients that never train) | transfer (the global prompt on other datasets)
    diagnostics: bool = False  # per client and evaluated round, the module diagnostics (pFedMoAP: expert attention)
    clients: str = "all"  # clients evaluated per round: all | sampled (the round's) | N (a seeded subset per round)
    final_all: bool = True  # the run's final round evaluates every client whatever eval.clients says
    heldout_fraction: float | None = None  # heldout: share of the clients that never train (null: 0.2)
    transfer_datasets: list[str] = field(default_factory=list)  # transfer: targets "name" or "name:domain"


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
    ft_epochs: int | None = None  # promptfl_ft: local fine-tuning epochs of P_g before evaluation (None: local_epochs)
    fedper_global_tokens: int | None = None  # fedper: leading prompt tokens aggregated, rest private (None: n_ctx//2)
    theta: float = 0.4  # promptfolio: local prompt's share of the feature mix (--frac_p 0.4 in PromptFolio's README)
    pgp_rank: int = 8  # fedpgp: rank of the private U V (BOTTLENECK=8 in FedPGP's scripts; argparse default 4)
    pgp_weight: float = 0.5  # fedpgp: weight of the prompt-wise contrastive loss (MU=0.5 in FedPGP's scripts)
    pgp_temp: float = 0.5  # fedpgp: temperature of the contrastive loss (TEMP=0.5 in FedPGP's scripts and argparse)
    ot_eps: float = 0.01  # fedotp: entropic regularisation of the transport (EPS=0.01 in fedotp_few_shot.sh)
    ot_top_percent: float = 0.8  # fedotp: mass the prompts receive from the patches (TOP_PERCENT=0.80, OT=COT)
    ot_max_iter: int = 100  # fedotp: Sinkhorn iterations at most (MAX_ITER=100 in FedOTP's scripts)
    ot_thresh: float = 1e-3  # fedotp: stop once the mean change of v is below this (THRESH=0.001)
    cocoop_chunk: int = 32  # cocoop: images whose B x C prompts share one text-tower pass (0: a whole batch)
    kg_weight: float = 8.0  # kgcoop: weight of the knowledge-guided term (W=8.0 in KgCoOp's scripts/run.sh)
    tpg_depth: int = 0  # fedtpg: self-attention blocks after the cross-attention (--model_depth 0 in Launch_FL.py)
    tpg_heads: int = 4  # fedtpg: attention heads of every block (cross_heads=4, self_heads=4 in PromptTranslator)
    tpg_client_classes: bool = True  # fedtpg: condition (and the softmax) on each client's own classes in training
    clip_adapter_lr: float = 1.0  # fedclip: adapter's SGD lr (fedlit's choice, docs/methods.md; the code: Adam 5e-5)
    clip_adapter_template: str = "a picture of a {}"  # fedclip: class prompt (prompt='a picture of a' in the code)
    # fedpha: local prompt lengths over contiguous blocks of clients (USER_PROMPT_LENGTHS of FedPHA's
    # configs/datasets/cifar10.yaml and cifar100.yaml: the first half of the clients 16, the second half 32)
    pha_lengths: list[int] = field(default_factory=lambda: [16, 32])
    pha_ratio: float = 0.8  # fedpha: share of the global prompt's singular directions kept (--ratio 0.8 in argparse)
    pha_alpha: float = 1.0  # fedpha: margin of the push term (--alpha 1.0 in FedPHA's federated_main.py)
    dpfpl_rank: int = 8  # dpfpl: rank of the local prompt's factorisation (--rank 8 in DP-FPL; capped at n_ctx)


@dataclass
class PrivacyConfig:
    clip: float | None = None  # client-level DP: L2 bound of each client's prompt update (None: DP off)
    noise_multiplier: float = 0.0  # z: Gaussian noise std z * clip on the sum of clipped updates
    delta: float = 1e-5  # the delta epsilon is reported at
    target_epsilon: float | None = None  # set z by the accountant so that the planned rounds spend this epsilon
    local: bool = False  # local DP: each client clips and noises its own update (the server sees noised prompts)


@dataclass
class RobustConfig:
    aggregator: str = "mean"  # mean | median | trimmed_mean | krum | multikrum | geometric_median |
    # centered_clipping | monna (byzfl, on the flattened prompt updates)
    pre: str = "none"  # none | nnm | bucketing | clipping (byzfl pre-aggregation)
    f: int = 0  # Byzantine clients the aggregator tolerates (trimmed_mean, krum, multikrum, nnm, monna)
    bucket_size: int = 2  # bucketing: updates averaged per bucket
    pre_clip: float = 0.1  # clipping: L2 bound of each update (offline default: honest updates 0.06-0.23)
    cc_tau: float = 0.1  # centered_clipping: clipping radius around the previous global prompt
    cc_iters: int = 3  # centered_clipping: iterations
    gm_nu: float = 1e-6  # geometric_median: smoothing (lower bound of the Weiszfeld distances)
    gm_iters: int = 10  # geometric_median: Weiszfeld iterations


@dataclass
class AttackConfig:
    kind: str = "none"  # none | sign_flip | gaussian | label_flip | alie | zero
    fraction: float = 0.0  # share of the clients that are Byzantine (chosen once per run from the seed)
    scale: float = 10.0  # sign_flip: an attacker uploads -scale times its own update
    sigma: float = 0.1  # gaussian: an attacker's update is N(0, sigma^2) per coordinate
    alie_z: float | None = None  # alie: mean + z * std of the honest updates (None: z of the ALIE paper)


@dataclass
class PerfConfig:
    cache_features: bool = True  # False: encode images at every step and evaluation (the straightforward path)
    cut_text: bool = True  # False: run full 77-token text sequences
    share_prefix: bool = True  # run the start token + context once per prompt, not once per class (needs cut_text)
    client_batch: int = 0  # G clients of a rank trained together (one text-encoder batch); 0 = auto (GPU: by
    # free memory; CPU: 1, which keeps 1 and N processes bitwise equal; set G for 1.2-1.6x there)
    augmented_views: int = 0  # > 0: precompute this many augmented views per train image (changes semantics)
    disk_cache: bool = False  # also keep image features on disk under backbone.cache_dir/features
    checkpoint_activations: bool = False  # image-side prompt methods: recompute the image tower's activations in
    # the backward pass (less memory, same numbers, about one more forward pass of time)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # the GPU when one is visible (CUDA, else Apple MPS), else the CPU
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
    on_nonfinite: str = "stop"  # a client's loss or parameters not finite: stop (exit 4) | skip_client
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # Lightning loggers: csv, tensorboard, wandb


@dataclass
class StoreConfig:
    backend: str = "memory"  # memory | disk (versioned shard files, incremental checkpoints) | auto
    memory_budget_mb: float = 1024.0  # auto: disk when every client's initial state would exceed this many MiB
    directory: str | None = None  # disk: where shard files live (None: <run dir>/store)
    shard_size: int = 1  # disk: clients per shard file (shard = client id // shard_size; see federation/store.py)


@dataclass
class Config:
    algorithm: str = "pfedmoap"  # one of ALGORITHMS, or "all" to run every method in turn
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    store: StoreConfig = field(default_factory=StoreConfig)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, e.g. ``["algorithm", "backbone.name", ...]``."""
    keys = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        section = _section_type(f)
        if section is not None:
            keys.extend(_all_keys(section, name + "."))
        else:
            keys.append(name)
    return keys


def _section_type(f: Any) -> type | None:
    """The dataclass of a section field, None for a leaf key."""
    if f.default_factory is MISSING:
        return None
    default = f.default_factory()
    return type(default) if is_dataclass(default) else None


@functools.cache
def _key_tuple() -> tuple[str, ...]:
    return tuple(_all_keys(Config))


def valid_keys() -> list[str]:
    """All dotted configuration keys."""
    return list(_key_tuple())


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help to list the keys"
    return f"unknown config key '{key}'{hint}"


def _section_message(origin: str, key: str, section: type, value: Any) -> str:
    first = fields(section)[0].name
    got = "" if value is ... else f" (got {value!r})"
    return (f"{origin}'{key}' is a section, not a value{got}; set its keys instead, e.g. {key}.{first}="
            f"{getattr(section(), first)}")


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(str(err.full_key))) from None
    except ValidationError as err:
        raise ConfigError(f"{origin}: bad value for '{err.full_key}': {_first_line(err.msg)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{origin}: {_first_line(err)}") from None


def _first_line(err: Any) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or _first_line(err)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _read_yaml(path: Path) -> dict:
    """The mapping of a YAML config file, interpolations unresolved; ConfigError for anything else."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file is not a regular file: {path}")
    not_a_mapping = f"{path}: expected a mapping of config keys at the top level (e.g. 'fed:' then '  rounds: 5')"
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse {path}: {_yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot parse {path}: not UTF-8 text") from None
    except OSError as err:
        if "Invalid loaded object type" in str(err):  # OmegaConf's word for a YAML scalar
            raise ConfigError(f"{not_a_mapping}, got a scalar") from None
        raise ConfigError(f"cannot read config file {path}: {err.strerror or _first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - OmegaConf re-parses a top-level string in many ways
        raise ConfigError(f"cannot parse {path}: {_first_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{not_a_mapping}, got a list")
    return _check_sections(OmegaConf.to_container(loaded, resolve=False), Config, "", f"{path}: ")  # type: ignore


def _check_sections(data: dict, cls: type, prefix: str, origin: str) -> dict:
    """``data`` with its keys checked against the dataclass ``cls``: unknown keys and scalars or lists where a
    section belongs are ConfigErrors; an empty section (``fed:`` with nothing below) is dropped."""
    by_name = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in by_name:
            raise ConfigError(origin + _unknown_key_message(full))
        section = _section_type(by_name[key])
        if section is None:
            _check_raw(full, str(by_name[key].type), value, origin)
            out[key] = value
        elif value is None:
            continue
        elif not isinstance(value, dict):
            raise ConfigError(_section_message(origin, full, section, value))
        else:
            out[key] = _check_sections(value, section, full + ".", origin)
    return out


def _check_raw(key: str, kind: str, value: Any, origin: str) -> None:
    """A value as written: not ``???``; a boolean key takes only true/false (OmegaConf would turn 2 or "no" into
    one) and a string key no boolean (``ctx_init: false`` is a mistake, not the word). Interpolations are checked
    once resolved."""
    if value == "???":  # merged over a default, OmegaConf's "missing" marker would silently keep the default
        raise ConfigError(f"{origin}'{key}' is ??? (OmegaConf's missing value); give it a value or leave it out")
    if isinstance(value, str) and "${" in value:
        return
    kinds = kind.replace(" ", "").split("|")
    if kinds[0].startswith("list[") and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{origin}bad value for '{key}': must be a list in brackets, e.g. {key}=[a,b] "
                          f"(got {value!r})")
    if "bool" in kinds and value is not None and not isinstance(value, bool):
        raise ConfigError(f"{origin}bad value for '{key}': must be true or false (got {value!r})")
    if "str" in kinds and isinstance(value, bool):
        raise ConfigError(f"{origin}bad value for '{key}': must be a string, not the boolean {str(value).lower()}; "
                          "quote it if you mean the word")


def _parse_override(item: str) -> dict:
    """One ``key=value`` override as a nested dict; ConfigError for a malformed item, an unknown key or a value
    that YAML cannot parse."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key = item.split("=", 1)[0]
    sections = {f.name: _section_type(f) for f in fields(Config)}
    if sections.get(key) is not None:
        raise ConfigError(_section_message("override: ", key, sections[key], ...))
    if key not in _key_tuple():
        raise ConfigError(_unknown_key_message(key))
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': {_yaml_problem(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"override '{item}': {_first_line(err)}") from None
    return _check_sections(parsed, Config, "", "override: ")  # type: ignore[arg-type]


def _deep_update(target: dict, source: dict) -> None:
    """Merge the nested dict ``source`` into ``target`` (later values win, as with successive merges)."""
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _to_object(merged: DictConfig) -> Config:
    """The typed Config of ``merged`` with every ``${...}`` interpolation resolved; ConfigError if one fails."""
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f"'{key}'" if key else "the config"
        raise ConfigError(f"cannot resolve {where}: {_first_line(err)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Typed defaults, then the YAML file ``path`` (if any), then ``key=value`` overrides; interpolations
    resolved, then validated. Every problem is a one-line :class:`ConfigError`."""
    merged: DictConfig = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), str(path))
    combined: dict = {}
    for item in overrides or []:
        _deep_update(combined, _parse_override(item))
    if combined:
        merged = _merge(merged, combined, "override")  # one merge: OmegaConf deep-copies the tree on each
    cfg = _to_object(merged)
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(obj: Any, prefix: str = "") -> None:
    """Every leaf of a (possibly hand-built) Config has its annotated type; strings hold no NUL character."""
    for f in fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if _section_type(f) is not None:
            _check(is_dataclass(value), f"{key} must be a section (got {value!r})")
            _check_types(value, key + ".")
            continue
        kinds = str(f.type).replace(" ", "").split("|")
        if not {"int", "float", "bool", "str"} & set(kinds):
            continue  # a type this walk does not know: its own check in validate covers it
        if value is None:
            _check("None" in kinds, f"{key} must not be null")
        elif isinstance(value, bool):
            _check("bool" in kinds, f"{key} must be {' or '.join(kinds)}, not a boolean (got {value!r})")
        elif isinstance(value, int):
            _check("int" in kinds or "float" in kinds, f"{key} must be {' or '.join(kinds)} (got {value!r})")
        elif isinstance(value, float):
            _check("float" in kinds, f"{key} must be {' or '.join(kinds)} (got {value!r})")
        elif isinstance(value, str):
            _check("str" in kinds, f"{key} must be {' or '.join(kinds)} (got {value!r})")
            _check("\x00" not in value, f"{key} contains a NUL character (got {value!r})")
        else:
            raise ConfigError(f"{key} must be {' or '.join(kinds)} (got {value!r})")


def _integer(key: str, value: int, low: int, high: int = MAX_INT) -> None:
    """``low <= value <= high`` for an integer key."""
    _check(value >= low, f"{key} must be >= {low} (got {value})")
    _check(value <= high, f"{key} must be <= {high} (got {value})")


def _number(key: str, value: float, low: float | None = None, high: float | None = None,
            open_low: bool = False, open_high: bool = False) -> None:
    """A finite number within ``[low, high]`` (either end open on request, either end absent)."""
    _check(_is_number(value) and math.isfinite(value), f"{key} must be a finite number (got {value!r})")
    above = low is None or (value > low if open_low else value >= low)
    below = high is None or (value < high if open_high else value <= high)
    if low is not None and high is not None:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        _check(above and below, f"{key} must be in {interval} (got {value})")
    elif low is not None:
        _check(above, f"{key} must be {'>' if open_low else '>='} {low} (got {value})")
    elif high is not None:
        _check(below, f"{key} must be {'<' if open_high else '<='} {high} (got {value})")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def _nonempty(key: str, value: str) -> None:
    _check(value.strip() != "", f"{key} must not be empty")


def _expand(key: str, value: str) -> Path:
    """``value`` with ``~`` expanded; ConfigError for ``~user`` of an unknown user (pathlib would raise later)."""
    expanded = os.path.expanduser(value)
    _check(not expanded.startswith("~"), f"{key}={value!r}: cannot expand {value.split('/', 1)[0]!r} (no such user)")
    return Path(expanded)


def _nearest_existing(path: Path) -> Path:
    """``path`` (absolute) or its nearest ancestor that exists (a dangling symlink counts as existing)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_creatable_dir(key: str, value: str) -> None:
    """``value`` is a writable directory or can be created as one; checked without creating anything."""
    _nonempty(key, value)
    path = Path(os.path.abspath(_expand(key, value)))
    existing = _nearest_existing(path)
    if existing == path:
        _check(path.is_dir(), f"{key}={value!r} exists and is not a directory")
    else:
        _check(existing.is_dir(), f"{key}={value!r} cannot be created: {existing} is not a directory")
        too_long = [p.name for p in [path, *path.parents] if len(p.name.encode()) > NAME_MAX_BYTES]
        _check(not too_long, f"{key}={value!r} cannot be created: a path component is longer than "
                             f"{NAME_MAX_BYTES} bytes")
    _check(os.access(existing, os.W_OK | os.X_OK), f"{key}={value!r} is not writable (no write permission on "
                                                   f"{existing})")


def _looks_like_file(pretrained: str) -> bool:
    """Whether ``pretrained`` names a weights file rather than an open_clip tag (fedlit.backbone's rule)."""
    return (pretrained.endswith(WEIGHT_SUFFIXES) or "/" in pretrained or os.sep in pretrained
            or pretrained.startswith(("~", ".")))


def _check_top(cfg: Config) -> None:
    _check(cfg.algorithm in ALGORITHMS + ("all",),
           f"unknown algorithm {cfg.algorithm!r}; choose one of {', '.join(ALGORITHMS)} or all")
    _integer("seed", cfg.seed, 0, MAX_SEED)


def weights_needed(name: str) -> str:
    """The one line refusing the open_clip model ``name`` without ``backbone.pretrained``."""
    return (f"backbone.name={name} needs backbone.pretrained: an open_clip pretrained tag (e.g. openai), a local "
            f"weights file, or {RANDOM_WEIGHTS} to train on random weights on purpose")


def _check_backbone(b: BackboneConfig) -> None:
    _nonempty("backbone.name", b.name)
    if b.cache_dir is not None:
        _nonempty("backbone.cache_dir", b.cache_dir)
        cache = _expand("backbone.cache_dir", b.cache_dir)
        _check(not cache.exists() or cache.is_dir(),
               f"backbone.cache_dir={b.cache_dir!r} exists and is not a directory")
    if b.pretrained is None:
        _check(b.name in BUILTIN_BACKBONES, weights_needed(b.name))
        return
    _check(b.pretrained.strip() != "", "backbone.pretrained must be null, an open_clip tag or a weights file "
                                       "(got '')")
    _check(b.name not in BUILTIN_BACKBONES,
           f"backbone.pretrained={b.pretrained} cannot be used with the built-in backbone '{b.name}'; unset "
           "backbone.pretrained, or set backbone.name to an open_clip model")
    if _looks_like_file(b.pretrained):
        file = _expand("backbone.pretrained", b.pretrained)
        _check(file.is_file(), f"backbone weights file not found: {file} (set backbone.pretrained to an existing "
                               "file, an open_clip tag or random)")


def _check_prompt(p: PromptConfig) -> None:
    _integer("prompt.n_ctx", p.n_ctx, 1)
    if p.ctx_init is not None:
        _check(p.ctx_init.replace("_", " ").strip().lower() not in BOOLEAN_WORDS,
               f"prompt.ctx_init={p.ctx_init!r} looks like a boolean or is empty; use null for a random context or "
               "words such as 'a photo of a'")
    _check(p.class_position in CLASS_POSITIONS,
           f"prompt.class_position must be end, front or middle (got {p.class_position!r})")
    _number("prompt.init_std", p.init_std, 0.0)
    _integer("prompt.vision_n_ctx", p.vision_n_ctx, 1)
    if p.depth is not None:
        _integer("prompt.depth", p.depth, 1)
    _integer("prompt.vision_start_layer", p.vision_start_layer, 0)


def _check_gate(g: GateConfig, cfg: Config) -> None:
    _integer("gate.d_gate", g.d_gate, 1)
    _integer("gate.num_heads", g.num_heads, 1)
    _check(g.d_gate % g.num_heads == 0,
           f"gate.d_gate={g.d_gate} must be divisible by gate.num_heads={g.num_heads}")
    _number("gate.scale", g.scale, 0.0, open_low=True)
    if g.top_k is not None:
        _integer("gate.top_k", g.top_k, 1)
        if _runs_experts(cfg):
            _check(g.top_k <= cfg.method.num_experts,
                   f"gate.top_k={g.top_k} exceeds method.num_experts={cfg.method.num_experts}; use null for all")


def _check_data(d: DataConfig) -> None:
    _choice("data.name", d.name, DATASETS)
    _nonempty("data.root", d.root)
    if d.download and d.name != "shapes":
        _check_creatable_dir("data.root", d.root)
    _choice("data.partition", d.partition, PARTITIONS)
    if d.partition == "domain":
        _check(d.name in DOMAIN_DATASETS, f"data.partition=domain needs a dataset with domains "
                                          f"({', '.join(DOMAIN_DATASETS)}); {d.name!r} has none")
    _integer("data.num_clients", d.num_clients, 1)
    _number("data.alpha", d.alpha, 0.0, open_low=True)
    _number("data.domain_alpha", d.domain_alpha, 0.0, open_low=True)
    if d.shots is not None:
        _integer("data.shots", d.shots, 1)
    _integer("data.min_size", d.min_size, 1)
    _integer("data.train_per_class", d.train_per_class, 1)
    _integer("data.test_per_class", d.test_per_class, 1)
    _number("data.shapes_brightness", d.shapes_brightness, 0.0, 1.0, open_low=True)
    _integer("data.batch_size", d.batch_size, 1)
    _integer("data.num_workers", d.num_workers, 0)


def heldout_count(num_clients: int, fraction: float) -> int:
    """Clients held out of training by ``eval.protocol=heldout``: ``floor(fraction * N + 1/2)`` (rounded half up)."""
    return math.floor(fraction * num_clients + 0.5)


def heldout_size(cfg: Config) -> int:
    """Clients of ``cfg`` that never train: :func:`heldout_count` under ``eval.protocol=heldout``, else 0."""
    if cfg.eval.protocol != "heldout":
        return 0
    fraction = cfg.eval.heldout_fraction if cfg.eval.heldout_fraction is not None else DEFAULT_HELDOUT_FRACTION
    return heldout_count(cfg.data.num_clients, fraction)


def training_pool_size(cfg: Config) -> int:
    """Clients that may be sampled for training: all but the held-out ones (``eval.protocol=heldout``)."""
    return cfg.data.num_clients - heldout_size(cfg)


def parse_transfer_target(entry: str) -> tuple[str, str | None]:
    """``"name"`` or ``"name:domain"`` of ``eval.transfer_datasets`` as (dataset, domain or None)."""
    name, _, domain = entry.partition(":")
    return name, (domain if ":" in entry else None)


def _check_transfer_target(entry: str, d: DataConfig) -> None:
    """One ``eval.transfer_datasets`` entry: a known dataset, a domain it has (a brightness in (0, 1] for shapes),
    and data the clients never train on."""
    key = "eval.transfer_datasets"
    name, domain = parse_transfer_target(entry)
    _check(name in DATASETS, f"unknown dataset {name!r} in {key}; choose one of {', '.join(DATASETS)} (a domain "
                             "dataset's domain as name:domain, shapes at a brightness as shapes:0.5)")
    if domain is not None and name == "shapes":
        try:
            level = float(domain)
        except ValueError:
            level = math.nan
        _check(0.0 < level <= 1.0, f"{key} entry {entry!r}: a shapes domain is a brightness in (0, 1], e.g. shapes:0.5")
        _check(name != d.name or level != d.shapes_brightness,
               f"{key} entry {entry!r} is the training data itself (data.shapes_brightness={d.shapes_brightness}); "
               "its number is acc_global")
        return
    if domain is not None:
        _check(name in DATASET_DOMAINS, f"{key} entry {entry!r}: {name} has no domains (domain datasets: "
                                        f"{', '.join(DATASET_DOMAINS)})")
        _check(domain in DATASET_DOMAINS[name], f"{key} entry {entry!r}: unknown domain {domain!r} of {name}; "
                                                f"choose one of {', '.join(DATASET_DOMAINS[name])}")
    if name == d.name:
        what = f"one of {name}'s domains, which the clients train on" if domain is not None else "the training data"
        _check(False, f"{key} entry {entry!r} is {what}; a transfer target must be data the clients never train "
                      "on (its number on the training data is acc_global)")


def _check_eval(e: EvalConfig, cfg: Config) -> None:
    _check(e.protocol in PROTOCOLS, f"eval.protocol must be one of {', '.join(PROTOCOLS)} (got {e.protocol!r})")
    clients = str(e.clients)
    _check(clients in ("all", "sampled") or (clients.isdigit() and int(clients) >= 1),
           f"eval.clients must be all, sampled or a positive number of clients (got {e.clients!r})")
    if e.heldout_fraction is not None:
        _check(e.protocol == "heldout", f"eval.heldout_fraction is read by eval.protocol=heldout only (got "
                                        f"eval.protocol={e.protocol}); unset it or set eval.protocol=heldout")
        _number("eval.heldout_fraction", e.heldout_fraction, 0.0, 1.0, open_low=True, open_high=True)
    if e.protocol == "heldout":
        n = cfg.data.num_clients
        held = heldout_size(cfg)
        fraction = e.heldout_fraction if e.heldout_fraction is not None else DEFAULT_HELDOUT_FRACTION
        _check(held >= 1, f"eval.heldout_fraction={fraction} of data.num_clients={n} holds out no client "
                          f"(round({fraction} x {n}) = 0); raise it to at least {0.5 / n:.3g}")
        _check(held <= n - 1, f"eval.heldout_fraction={fraction} of data.num_clients={n} holds out all {held} "
                              "clients and leaves none to train; lower it")
    if not isinstance(e.transfer_datasets, (list, tuple)):
        raise ConfigError(f"eval.transfer_datasets must be a list of dataset names (got {e.transfer_datasets!r})")
    if e.protocol == "transfer":
        _check(len(e.transfer_datasets) > 0, "eval.protocol=transfer needs eval.transfer_datasets, e.g. "
                                             "eval.transfer_datasets=[cifar10] or [office_caltech10:amazon]")
        _check(not cfg.prompt.class_specific, "eval.protocol=transfer moves the global prompt to other class names; "
                                              "it needs a prompt shared by all classes (prompt.class_specific=false)")
    else:
        _check(not e.transfer_datasets, f"eval.transfer_datasets is read by eval.protocol=transfer only (got "
                                        f"eval.protocol={e.protocol}); unset it or set eval.protocol=transfer")
    for entry in e.transfer_datasets:
        _check(isinstance(entry, str) and entry.strip() != "",
               f"eval.transfer_datasets entries must be dataset names (got {entry!r})")
        _check_transfer_target(entry, cfg.data)
    repeated = sorted({t for t in e.transfer_datasets if list(e.transfer_datasets).count(t) > 1})
    _check(not repeated, f"eval.transfer_datasets lists {', '.join(repeated)} more than once")


def _check_fed(f: FederationConfig) -> None:
    _integer("fed.rounds", f.rounds, 1)
    _check(_is_number(f.frac) and 0.0 < f.frac <= 1.0, f"fed.frac must be in (0, 1] (got {f.frac})")
    _integer("fed.local_epochs", f.local_epochs, 1)
    _integer("fed.eval_every", f.eval_every, 1)
    _number("fed.dropout", f.dropout, 0.0, 1.0, open_high=True)


def _check_optim(o: OptimConfig) -> None:
    _number("optim.prompt_lr", o.prompt_lr, 0.0)
    _number("optim.gate_lr", o.gate_lr, 0.0)
    _number("optim.momentum", o.momentum, 0.0, 1.0, open_high=True)
    _number("optim.weight_decay", o.weight_decay, 0.0)


def _runs_experts(cfg: Config) -> bool:
    """Whether a method with pFedMoAP's K + 1 experts runs (pfedmoap, its variants, or all)."""
    return cfg.algorithm == "all" or cfg.algorithm.startswith("pfedmoap")


def _check_method(m: MethodConfig, cfg: Config) -> None:
    _integer("method.num_experts", m.num_experts, 1)
    if _runs_experts(cfg):
        pool = training_pool_size(cfg)
        where = (f"data.num_clients={cfg.data.num_clients}" if pool == cfg.data.num_clients
                 else f"the {pool} clients that train (eval.protocol=heldout holds out the others)")
        _check(m.num_experts <= pool,
               f"method.num_experts={m.num_experts} exceeds {where}; "
               "the local expert plus K = num_experts - 1 other clients must exist")
    _check(m.selection in SELECTIONS, f"method.selection must be knn or random (got {m.selection!r})")
    _number("method.lam", m.lam, 0.0)
    _number("method.mu", m.mu, 0.0)
    if m.ft_epochs is not None:
        _integer("method.ft_epochs", m.ft_epochs, 0)
    if m.fedper_global_tokens is not None:
        _integer("method.fedper_global_tokens", m.fedper_global_tokens, 0)
    _number("method.theta", m.theta, 0.0, 1.0)
    _integer("method.pgp_rank", m.pgp_rank, 1)
    _number("method.pgp_weight", m.pgp_weight, 0.0)
    _number("method.pgp_temp", m.pgp_temp, 0.0, open_low=True)
    _number("method.ot_eps", m.ot_eps, 0.0, open_low=True)
    _number("method.ot_top_percent", m.ot_top_percent, 0.0, 1.0, open_low=True)  # the prompts' mass <= the patches'
    _integer("method.ot_max_iter", m.ot_max_iter, 1)
    _number("method.ot_thresh", m.ot_thresh, 0.0)
    _integer("method.cocoop_chunk", m.cocoop_chunk, 0)
    _number("method.kg_weight", m.kg_weight, 0.0)
    _check_template("method.template", m.template)
    _check_fedpha(m, cfg)
    _integer("method.dpfpl_rank", m.dpfpl_rank, 1)
    _integer("method.tpg_depth", m.tpg_depth, 0)
    _integer("method.tpg_heads", m.tpg_heads, 1)
    _number("method.clip_adapter_lr", m.clip_adapter_lr, 0.0, open_low=True)
    _check_template("method.clip_adapter_template", m.clip_adapter_template)


def _check_template(key: str, template: str) -> None:
    """A hand prompt with exactly one ``{}`` (the class name) and no other braces."""
    rest = template.replace("{}", "", 1)
    _check(template.count("{}") == 1 and "{" not in rest and "}" not in rest,
           f"{key} must contain exactly one {{}} (the class name) and no other braces (got {template!r})")


def _check_fedpha(m: MethodConfig, cfg: Config) -> None:
    lengths = list(m.pha_lengths)
    _check(len(lengths) >= 1 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths),
           f"method.pha_lengths must be a non-empty list of positive integers (got {lengths})")
    _check(len(lengths) <= cfg.data.num_clients,
           f"method.pha_lengths has {len(lengths)} lengths for data.num_clients={cfg.data.num_clients}; give at most "
           "one per client")
    _number("method.pha_ratio", m.pha_ratio, 0.0, 1.0)
    _number("method.pha_alpha", m.pha_alpha, 0.0)


def _check_privacy(p: PrivacyConfig, cfg: Config) -> None:
    if p.clip is not None:
        _number("privacy.clip", p.clip, 0.0, open_low=True)
    _number("privacy.noise_multiplier", p.noise_multiplier, 0.0)
    _number("privacy.delta", p.delta, 0.0, 1.0, open_low=True, open_high=True)
    if p.target_epsilon is not None:
        _number("privacy.target_epsilon", p.target_epsilon, 0.0, open_low=True)
    noised = p.noise_multiplier > 0 or p.target_epsilon is not None
    _check(p.clip is not None or not (noised or p.local),
           "privacy.noise_multiplier, privacy.target_epsilon and privacy.local need privacy.clip (the L2 bound "
           "of a client's update)")
    robust = cfg.robust.aggregator != "mean" or cfg.robust.pre != "none"
    _check(p.clip is None or p.local or not robust,
           f"central DP (privacy.clip) bounds the sum of updates, not robust.aggregator={cfg.robust.aggregator} / "
           f"robust.pre={cfg.robust.pre}; use robust.aggregator=mean and robust.pre=none, or privacy.local=true")


SYNCHRONOUS_ALGORITHMS = ("dpfpl",)  # methods on the synchronous mode (fedlit/federation/synchronous.py)
# Methods with prompts inside the image tower (their algorithm's image_feature_kind is "tokens"; a test keeps this
# equal to the algorithm files): ViT backbones only, images through the prompted tower at every step.
IMAGE_SIDE_ALGORITHMS = ("vpt", "ivlp", "maple")


def image_side_conflict(cfg: Config, name: str) -> str | None:
    """Why the image-side method ``name`` cannot run ``cfg`` (None: it can): a backbone whose image tower takes no
    prompt tokens, prompt.vision_start_layer / prompt.depth beyond its layers, or cached augmented views."""
    from fedlit.backbone import prompt_tower_layers  # torch: only when an image-side method is asked for

    b, p = cfg.backbone.name, cfg.prompt
    layers = prompt_tower_layers(b)
    if layers is None:
        return (f"algorithm={name} puts prompt tokens inside the image tower, which needs a ViT with class-token "
                f"pooling; backbone {b} has none (use e.g. backbone.name=ViT-B-16-quickgelu, shapes-clip or tiny)")
    if p.vision_start_layer >= layers:
        return (f"prompt.vision_start_layer={p.vision_start_layer} but backbone {b} has {layers} image-tower layers "
                f"(0..{layers - 1})")
    if p.depth is not None and p.vision_start_layer + p.depth > layers:
        return (f"prompt.depth={p.depth} layers from prompt.vision_start_layer={p.vision_start_layer} exceed the "
                f"{layers} image-tower layers of backbone {b}")
    if cfg.perf.augmented_views > 0:
        return (f"perf.augmented_views caches image features of augmented views, but algorithm={name} trains prompts "
                "inside the image tower (views of its tokens would take (1+P) x W floats each): set "
                "perf.augmented_views=0 (train images are then augmented at every step)")
    return None


DEEP_TEXT_PROMPT_RULE = ("replaces the context after the start token by deep text prompts: it needs a unified "
                         "context with the class name at the end (unset prompt.class_specific, "
                         "prompt.class_position=end)")


def deep_text_prompt_fits(p: PromptConfig) -> bool:
    """Whether IVLP's / MaPLe's deep text prompts can replace the context of ``p`` (unified, class at the end)."""
    return not p.class_specific and p.class_position == "end"


FEDPHA_PROMPT_RULE = ("draws unified random prompts with the class name at the end (the public code's only working "
                      "setting): unset prompt.ctx_init, prompt.class_specific and prompt.class_position")


def fedpha_prompt_fits(p: PromptConfig) -> bool:
    """Whether FedPHA can train prompts of ``p``: random, unified, the class name at the end."""
    return p.ctx_init is None and not p.class_specific and p.class_position == "end"


def method_conflict(cfg: Config, name: str) -> str | None:
    """Why method ``name`` cannot run ``cfg`` (None: it can): ``algorithm=<name>`` refuses such a config in this one
    line, and ``algorithm=all`` leaves the method out with a note (:func:`runnable_algorithms`)."""
    p = cfg.prompt
    if name == "fedtpg" and (p.ctx_init is not None or p.class_specific):
        return ("algorithm=fedtpg generates one shared context from the class names: prompt.ctx_init and "
                "prompt.class_specific do not apply (unset them)")
    if name == "fedpha" and not fedpha_prompt_fits(p):
        return f"algorithm=fedpha {FEDPHA_PROMPT_RULE}"
    if name in IMAGE_SIDE_ALGORITHMS and (why := image_side_conflict(cfg, name)) is not None:
        return why
    if name in ("ivlp", "maple") and not deep_text_prompt_fits(p):
        return f"algorithm={name} {DEEP_TEXT_PROMPT_RULE}"
    if name in SYNCHRONOUS_ALGORITHMS:
        robust = cfg.robust.aggregator != "mean" or cfg.robust.pre != "none"
        what = (f"robust.aggregator={cfg.robust.aggregator} / robust.pre={cfg.robust.pre}" if robust
                else f"attack.kind={cfg.attack.kind}" if cfg.attack.kind in UPLOAD_ATTACKS else None)
        if what is not None:
            return (f"{what} acts on round uploads, but algorithm={name} combines per-step gradients (synchronous "
                    "mode); use robust.aggregator=mean, robust.pre=none and attack.kind none or label_flip, or "
                    "another algorithm")
    return None


def runnable_algorithms(cfg: Config) -> list[str]:
    """The methods ``cfg`` runs, in order: ``cfg.algorithm``, or for ``algorithm=all`` every method that can run
    ``cfg`` (:func:`method_conflict`)."""
    if cfg.algorithm != "all":
        return [cfg.algorithm]
    return [name for name in ALGORITHMS if method_conflict(cfg, name) is None]


def skipped_algorithms(cfg: Config) -> dict[str, str]:
    """The methods ``algorithm=all`` leaves out of ``cfg`` (name -> why); empty for a single method."""
    if cfg.algorithm != "all":
        return {}
    return {name: why for name in ALGORITHMS if (why := method_conflict(cfg, name)) is not None}


def _check_method_fits(cfg: Config) -> None:
    if cfg.algorithm != "all":
        why = method_conflict(cfg, cfg.algorithm)
        _check(why is None, str(why))


def _check_robust(r: RobustConfig) -> None:
    _choice("robust.aggregator", r.aggregator, AGGREGATORS)
    _choice("robust.pre", r.pre, PRE_AGGREGATORS)
    _integer("robust.f", r.f, 0)
    _integer("robust.bucket_size", r.bucket_size, 1)
    _number("robust.pre_clip", r.pre_clip, 0.0)
    _number("robust.cc_tau", r.cc_tau, 0.0)
    _integer("robust.cc_iters", r.cc_iters, 0)
    _number("robust.gm_nu", r.gm_nu, 0.0, open_low=True)
    _integer("robust.gm_iters", r.gm_iters, 0)


def _check_attack(a: AttackConfig) -> None:
    _choice("attack.kind", a.kind, ATTACKS)
    _number("attack.fraction", a.fraction, 0.0, 1.0, open_high=True)
    _number("attack.scale", a.scale, 0.0)
    _number("attack.sigma", a.sigma, 0.0)
    if a.alie_z is not None:
        _number("attack.alie_z", a.alie_z, 0.0)


def _check_perf(p: PerfConfig) -> None:
    _integer("perf.client_batch", p.client_batch, 0)
    _integer("perf.augmented_views", p.augmented_views, 0)


def _check_store(s: StoreConfig) -> None:
    _choice("store.backend", s.backend, ("memory", "disk", "auto"))
    _number("store.memory_budget_mb", s.memory_budget_mb, 0)
    _integer("store.shard_size", s.shard_size, 1)
    if s.directory is not None:
        _check_creatable_dir("store.directory", s.directory)


def _check_trainer(t: TrainerConfig) -> None:
    _choice("trainer.accelerator", t.accelerator, ACCELERATORS)
    _integer("trainer.devices", t.devices, 1)
    _integer("trainer.num_nodes", t.num_nodes, 1)
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.strategy", t.strategy, STRATEGIES)


def _check_run(r: RunConfig) -> None:
    _check(len(r.name) <= MAX_NAME_LENGTH and RUN_NAME.fullmatch(r.name) is not None,
           f"run.name={r.name!r} must be a plain folder name of 1-{MAX_NAME_LENGTH} characters: letters, digits and "
           ". _ - + = , @ (starting with a letter, digit or _), no path separators")
    _check_creatable_dir("run.out_dir", r.out_dir)
    _check(r.on_nonfinite in ("stop", "skip_client"),
           f"run.on_nonfinite must be stop or skip_client (got {r.on_nonfinite!r})")
    problem = logger_kinds_problem(r.loggers)
    _check(problem is None, problem or "")
    if r.resume in (None, "auto"):
        return
    hint = "use run.resume=auto or the path of a run directory (one that holds config.yaml or checkpoint.pt)"
    path = _expand("run.resume", r.resume)
    _check(r.resume.strip() != "" and path.is_dir(), f"run.resume={r.resume!r} is not an existing directory; {hint}")
    _check(any((path / marker).is_file() for marker in RESUME_MARKERS),
           f"run.resume={r.resume!r} is not a fedlit run directory (no config.yaml or checkpoint.pt); {hint}")
    _check(os.access(path, os.W_OK | os.X_OK), f"run.resume={r.resume!r} is not writable")


def validate(cfg: Config) -> None:
    """Raise a one-line ConfigError naming the key for any value of the wrong type, out of range, not finite, not
    among the choices, or any impossible combination, name or path (see the module docstring for the rules)."""
    _check_types(cfg)
    _check_top(cfg)
    _check_backbone(cfg.backbone)
    _check_prompt(cfg.prompt)
    _check_gate(cfg.gate, cfg)
    _check_data(cfg.data)
    _check_fed(cfg.fed)
    _check_eval(cfg.eval, cfg)
    _check_optim(cfg.optim)
    _check_method(cfg.method, cfg)
    _check_perf(cfg.perf)
    _check_store(cfg.store)
    _check_robust(cfg.robust)
    _check_privacy(cfg.privacy, cfg)
    _check_attack(cfg.attack)
    _check_method_fits(cfg)
    _check_trainer(cfg.trainer)
    _check_run(cfg.run)
