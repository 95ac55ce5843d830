"""The config files shipped with fedlit: ``configs/`` of the source tree, copied into the wheel as
``fedlit/configs/``, so that ``fedlit train --config paper/table1_dtd`` works from any directory."""

from __future__ import annotations

from pathlib import Path

CONFIG_PREFIX = "configs/"


def configs_dir() -> Path | None:
    """The packaged configs: ``fedlit/configs`` in an installed wheel, else ``configs/`` next to the ``fedlit``
    package in a source checkout (editable install); None when neither exists."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "default.yaml").is_file():
            return candidate
    return None


def packaged_configs() -> list[str]:
    """Every packaged config, as the name ``--config`` accepts (``default``, ``paper/table1_dtd``, ...)."""
    root = configs_dir()
    if root is None:
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(value: str | None) -> str | None:
    """``value`` when it is an existing file (or None); else the packaged config it names, with or without the
    ``configs/`` prefix and the ``.yaml`` suffix (``paper/table1_dtd``, ``configs/default.yaml``); else ``value``
    unchanged, so that loading it reports the missing file."""
    if value is None or Path(value).expanduser().is_file():
        return value
    root = configs_dir()
    if root is None:
        return value
    name = value.removeprefix(CONFIG_PREFIX)
    for candidate in (root / name, root / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return value
