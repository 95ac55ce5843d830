"""Configuration validation: every key's type and range, choices, run names, paths (checked without creating
anything), resume targets, YAML files and interpolations."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from fedlit.config import (
    DATASETS,
    MAX_INT,
    MAX_SEED,
    PRECISIONS,
    Config,
    ConfigError,
    FederationConfig,
    load_config,
    valid_keys,
    validate,
)
from fedlit.errors import UserError
from tests.helpers import FAST


def key_kinds() -> dict[str, str]:
    """Every leaf key with its annotated type, e.g. ``{"fed.rounds": "int", "gate.top_k": "int | None"}``."""
    kinds = {}
    for section in dataclasses.fields(Config):
        default = getattr(Config(), section.name)
        if dataclasses.is_dataclass(default):
            kinds.update({f"{section.name}.{f.name}": str(f.type) for f in dataclasses.fields(default)})
        else:
            kinds[section.name] = str(section.type)
    return kinds


def fast(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, FAST + [f"run.out_dir={tmp_path / 'runs'}", *overrides])


def refused(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        fast(tmp_path, *overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_config_error_is_the_user_error_type():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)


def test_dataset_names_are_the_registry_names():
    from fedlit.data.registry import DATASET_NAMES

    assert DATASETS == DATASET_NAMES


def test_key_table_covers_every_key():
    assert sorted(key_kinds()) == sorted(valid_keys()) and len(valid_keys()) >= 60


INT_KEYS = [k for k, kind in key_kinds().items() if kind.split(" |")[0] == "int"]
FLOAT_KEYS = [k for k, kind in key_kinds().items() if kind == "float"]
BOOL_KEYS = [k for k, kind in key_kinds().items() if kind.split(" |")[0] == "bool"]


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_integer_key_refuses_negative_and_overflowing_values(tmp_path, key):
    assert f"{key} must be >= " in refused(tmp_path, f"{key}=-5")
    high = MAX_SEED if key == "seed" else MAX_INT
    assert f"{key} must be <= {high} (got {high + 1})" in refused(tmp_path, f"{key}={high + 1}")


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_non_finite_values(tmp_path, key, value):
    message = refused(tmp_path, f"{key}={value}")
    assert message.startswith(key) and value.lstrip("-") in message


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_negative_values(tmp_path, key):
    assert refused(tmp_path, f"{key}=-0.5").startswith(f"{key} must be ")


@pytest.mark.parametrize("key", BOOL_KEYS)
def test_every_boolean_key_takes_only_true_or_false(tmp_path, key):
    assert f"'{key}': must be true or false (got 2)" in refused(tmp_path, f"{key}=2")
    assert f"'{key}': must be true or false (got 'maybe')" in refused(tmp_path, f"{key}=maybe")


def test_boundary_values_are_accepted(tmp_path):
    cfg = fast(tmp_path, "seed=4294967295", "optim.prompt_lr=0", "optim.momentum=0", "optim.weight_decay=0",
               "method.lam=0", "method.mu=0", "fed.frac=1", "data.shapes_brightness=1", "gate.top_k=3",
               "gate.scale=1e-6", "prompt.init_std=0", "perf.client_batch=0", "data.num_workers=0",
               "data.shots=null", "method.template='{}'", "run.quiet=yes", "method.num_experts=4")
    assert (cfg.seed, cfg.optim.momentum, cfg.fed.frac, cfg.gate.top_k, cfg.run.quiet) == (MAX_SEED, 0.0, 1.0, 3, True)


@pytest.mark.parametrize("key, good, bad", [
    ("algorithm", "all", "fedsgd"),
    ("data.name", "cifar10", "imagenet"),
    ("data.partition", "dirichlet", "powerlaw"),
    ("prompt.class_position", "middle", "back"),
    ("method.selection", "random", "best"),
    ("trainer.accelerator", "auto", "tpu"),
    ("trainer.precision", "bf16-mixed", "transformer-engine"),
    ("trainer.strategy", "ddp", "ddp_spawn"),
    ("robust.aggregator", "geometric_median", "average"),
    ("robust.pre", "bucketing", "nnm2"),
    ("attack.kind", "alie", "flip"),
])
def test_choices(tmp_path, key, good, bad):
    assert fast(tmp_path, f"{key}={good}") is not None
    assert f"'{bad}'" in refused(tmp_path, f"{key}={bad}")


def test_every_lightning_precision_string_is_accepted(tmp_path):
    for precision in PRECISIONS:
        assert fast(tmp_path, f"trainer.precision={precision}").trainer.precision == precision


@pytest.mark.parametrize("template, ok", [
    ("a photo of a {}.", True), ("{}", True), ("a {} texture", True),
    ("a photo", False), ("a {} and {}", False), ("a {0}", False), ("a {name}", False), ("a {} }", False),
    ("a {{}}", False), ("a {} {x}", False),
])
def test_template_needs_exactly_one_slot_and_no_other_braces(tmp_path, template, ok):
    override = f"method.template='{template}'"  # quoted: a bare {} is a YAML mapping
    if ok:
        assert fast(tmp_path, override).method.template == template
    else:
        assert refused(tmp_path, override).startswith("method.template must contain exactly one")


@pytest.mark.parametrize("name", ["default", "abl-0", "lr=0.01,mu@2", "_x.y+z", "A" * 100, "2026", "x..y"])
def test_run_names_that_are_plain_folder_names_are_accepted(tmp_path, name):
    assert fast(tmp_path, f"run.name={name}").run.name == name


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "../up", "a/b", "/abs", "a\\b", "a b", "-x", "A" * 101,
                                  "caf\u00e9", "a:b", "a*"])
def test_run_names_that_could_leave_out_dir_or_confuse_are_refused(tmp_path, name):
    assert refused(tmp_path, f"run.name={name}").startswith(f"run.name={name!r} must be a plain folder name")


def test_out_dir_is_checked_without_creating_anything(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    assert fast(tmp_path, f"run.out_dir={deep}").run.out_dir == str(deep)
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in refused(tmp_path, f"run.out_dir={tmp_path / 'file'}")
    assert f"cannot be created: {tmp_path / 'file'} is not a directory" in refused(
        tmp_path, f"run.out_dir={tmp_path / 'file' / 'runs'}")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert "exists and is not a directory" in refused(tmp_path, f"run.out_dir={tmp_path / 'dangling'}")
    assert "run.out_dir must not be empty" in refused(tmp_path, "run.out_dir=' '")


@pytest.mark.skipif(os.access("/proc/self", os.W_OK), reason="/proc/self is writable here")
def test_out_dir_under_a_directory_without_write_permission_is_refused(tmp_path):
    assert refused(tmp_path, "run.out_dir=/proc/self/runs") == (
        "run.out_dir='/proc/self/runs' is not writable (no write permission on /proc/self)")


def test_data_root_must_be_creatable_only_when_downloading(tmp_path):
    (tmp_path / "file").write_text("x")
    root = tmp_path / "file" / "data"
    assert fast(tmp_path, "data.name=cifar10", f"data.root={root}").data.root == str(root)
    assert "data.root=" in refused(tmp_path, "data.name=cifar10", "data.download=true", f"data.root={root}")


def test_resume_takes_auto_or_a_fedlit_run_directory(tmp_path):
    assert fast(tmp_path, "run.resume=auto").run.resume == "auto"
    for marker in ("config.yaml", "checkpoint.pt"):
        run = tmp_path / marker.split(".")[0]
        run.mkdir()
        (run / marker).write_text("")
        assert fast(tmp_path, f"run.resume={run}").run.resume == str(run)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text("{}")
    assert "is not a fedlit run directory" in refused(tmp_path, f"run.resume={tmp_path / 'other'}")
    assert "is not an existing directory" in refused(tmp_path, f"run.resume={tmp_path / 'missing'}")


def test_local_weights_must_exist(tmp_path):
    weights = tmp_path / "w.pt"
    assert refused(tmp_path, "backbone.name=RN50", f"backbone.pretrained={weights}") == (
        f"backbone weights file not found: {weights} (set backbone.pretrained to an existing file, an open_clip tag "
        "or random)")
    weights.write_bytes(b"")
    assert fast(tmp_path, "backbone.name=RN50", f"backbone.pretrained={weights}").backbone.pretrained == str(weights)
    # an open_clip tag is not a file: whether it exists is the backbone's business
    assert fast(tmp_path, "backbone.name=RN50", "backbone.pretrained=openai").backbone.pretrained == "openai"


def test_an_open_clip_model_needs_weights_or_random_by_name(tmp_path):
    # Today's bug: ViT-B-16 without backbone.pretrained trained for minutes on random weights without a word.
    assert refused(tmp_path, "backbone.name=ViT-B-16") == (
        "backbone.name=ViT-B-16 needs backbone.pretrained: an open_clip pretrained tag (e.g. openai), a local weights "
        "file, or random to train on random weights on purpose")
    assert fast(tmp_path, "backbone.name=ViT-B-16", "backbone.pretrained=random").backbone.pretrained == "random"
    assert fast(tmp_path, "backbone.name=tiny").backbone.pretrained is None  # the built-ins need nothing


@pytest.mark.parametrize("name", ["tiny", "shapes-clip", "fashion-clip"])
def test_pretrained_is_refused_with_the_built_in_backbones(tmp_path, name):
    (tmp_path / "w.pt").write_bytes(b"weights")
    for pretrained in ("openai", tmp_path / "w.pt", "random"):
        assert refused(tmp_path, f"backbone.name={name}", f"backbone.pretrained={pretrained}").startswith(
            f"backbone.pretrained={pretrained} cannot be used with the built-in backbone '{name}'")


def test_yaml_files_empty_or_with_empty_sections_give_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "sections.yaml").write_text("fed:\ngate:\n")
    for name in ("empty.yaml", "sections.yaml"):
        assert load_config(tmp_path / name) == load_config(None)


def test_interpolations_that_resolve_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLIT_TEST_OUT", str(tmp_path / "from-env"))
    (tmp_path / "c.yaml").write_text("fed:\n  rounds: 4\n  eval_every: ${fed.rounds}\n"
                                     "run:\n  out_dir: ${oc.env:FEDLIT_TEST_OUT}\n  name: exp-${fed.rounds}\n")
    cfg = load_config(tmp_path / "c.yaml", ["fed.rounds=6"])
    assert (cfg.fed.eval_every, cfg.run.out_dir, cfg.run.name) == (6, str(tmp_path / "from-env"), "exp-6")


def test_later_overrides_win(tmp_path):
    cfg = fast(tmp_path, "fed.rounds=5", "gate.top_k=1", "fed.rounds=7", "gate.top_k=null")
    assert (cfg.fed.rounds, cfg.gate.top_k, cfg.gate.d_gate) == (7, None, 16)


@pytest.mark.parametrize("change, message", [
    (dict(fed=FederationConfig(rounds=True)), "fed.rounds must be int, not a boolean (got True)"),
    (dict(fed=FederationConfig(rounds="3")), "fed.rounds must be int (got '3')"),
    (dict(fed=FederationConfig(frac=None)), "fed.frac must not be null"),
    (dict(fed=3), "fed must be a section (got 3)"),
    (dict(seed=1.0), "seed must be int (got 1.0)"),
])
def test_hand_built_configs_are_type_checked(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(dataclasses.replace(Config(), **change))


def test_algorithm_all_leaves_out_the_methods_a_config_excludes_and_says_why():
    from fedlit.config import ALGORITHMS, runnable_algorithms, skipped_algorithms
    from fedlit.summary import inert_warnings

    worded = load_config(None, ["algorithm=all", "prompt.ctx_init=a photo of a"])
    assert runnable_algorithms(worded) == [a for a in ALGORITHMS if a not in ("fedpha", "fedtpg")]
    assert sorted(skipped_algorithms(worded)) == ["fedpha", "fedtpg"]
    attacked = load_config(None, ["algorithm=all", "attack.kind=sign_flip", "attack.fraction=0.2"])
    assert runnable_algorithms(attacked) == [a for a in ALGORITHMS if a != "dpfpl"]
    [line] = [w for w in inert_warnings(attacked) if "leaves out" in w]
    assert line.startswith("algorithm=all leaves out dpfpl: attack.kind=sign_flip acts on round uploads")
    assert runnable_algorithms(load_config(None, ["algorithm=all"])) == list(ALGORITHMS)
    for name, override in (("fedtpg", "prompt.class_specific=true"), ("fedpha", "prompt.class_position=front"),
                           ("dpfpl", "robust.aggregator=median")):
        with pytest.raises(ConfigError, match=f"algorithm={name} "):
            load_config(None, [f"algorithm={name}", override])


def test_fedmgp_keys_are_checked_in_one_line(tmp_path):
    cfg = fast(tmp_path, "method.mgp_groups=1", "method.mgp_upload=1", "method.mgp_diversity_weight=0",
               "method.mgp_temperature=1e-6")
    assert (cfg.method.mgp_groups, cfg.method.mgp_upload, cfg.method.mgp_diversity_weight) == (1, 1, 0.0)
    assert refused(tmp_path, "method.mgp_groups=3", "method.mgp_upload=4") == (
        "method.mgp_upload=4 exceeds method.mgp_groups=3: a client uploads some of its own prompt groups")
    assert refused(tmp_path, "method.mgp_upload=0") == "method.mgp_upload must be >= 1 (got 0)"
    assert refused(tmp_path, "method.mgp_groups=0") == "method.mgp_groups must be >= 1 (got 0)"
    assert refused(tmp_path, "method.mgp_temperature=0") == "method.mgp_temperature must be > 0.0 (got 0.0)"


def test_fedmgp_refuses_deep_prompts_in_one_line(tmp_path):
    message = refused(tmp_path, "algorithm=fedmgp", "prompt.depth=2")
    assert message == ("algorithm=fedmgp prompts the first layer of each tower only (the public code's PROMPT_DEPTH "
                       "1), not prompt.depth=2: unset prompt.depth or set it to 1")
    assert fast(tmp_path, "algorithm=fedmgp", "prompt.depth=1").prompt.depth == 1
    from fedlit.config import skipped_algorithms

    assert "fedmgp" in skipped_algorithms(fast(tmp_path, "algorithm=all", "prompt.depth=3"))
    assert refused(tmp_path, "algorithm=fedmgp", "backbone.name=RN50", "backbone.pretrained=random").startswith(
        "algorithm=fedmgp puts prompt tokens inside the image tower, which needs a ViT")
