"""Hydra composition: experiment name or YAML path + overrides -> one typed config.

Uses Hydra's compose API (not `@hydra.main`) so the CLI owns argument parsing, and
turns every Hydra/OmegaConf failure into a one-line ConfigError.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.config import Config
from launcher.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


def _one_line(err: Exception) -> str:
    """The most specific message in the exception chain, squeezed onto one line."""
    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    omega = [e for e in chain if isinstance(e, OmegaConfBaseException)]
    keyed = [e for e in omega if getattr(e, "full_key", None)]
    best = (keyed or omega or chain)[0]
    msg = str(best).split("\n")[0].strip()
    msg = msg.split(" Config search path")[0]
    key = getattr(best, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return " ".join(msg.split())


def _reject_unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> None:
    """Hydra lets `+key=value` add keys the schema lacks; only `extra` is free-form."""
    for key in cfg:
        full = f"{prefix}{key}"
        if key not in schema:
            allowed = ", ".join(str(k) for k in schema)
            hint = " (free-form values go under +extra.)" if not prefix else ""
            raise ConfigError(f"{full}: unknown key; allowed under '{prefix or '.'}': {allowed}{hint}")
        if key != "extra" and isinstance(cfg[key], DictConfig):
            _reject_unknown_keys(cfg[key], schema[key], f"{full}.")


def _check_yaml_syntax(path: Path, text: str) -> None:
    """A syntax error names the user's file and line (Hydra would name its staged copy, one line off)."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).split("\n")[0]
        raise ConfigError(f"config={path}:{where}: YAML syntax error: {problem}; fix the file") from None


def _experiment_override(config: str, tmp: Path) -> tuple[list[str], str]:
    """`config=NAME` picks configs/experiment/NAME.yaml; a path is staged as one."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config={config}: no such file; give an experiment name or a YAML path")
        text = path.read_text()
        _check_yaml_syntax(path, text)
        if "@package" not in text.split("\n", 1)[0]:
            text = "# @package _global_\n" + text
        (tmp / "experiment").mkdir()
        (tmp / "experiment" / path.name).write_text(text)
        return [f"hydra.searchpath=[file://{tmp}]", f"+experiment={path.stem}"], path.stem
    if config not in available_experiments():
        allowed = ", ".join(available_experiments())
        raise ConfigError(f"config={config}: unknown experiment; allowed: {allowed}, or a path to a YAML file")
    return [f"+experiment={config}"], config


def expand_sweep(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """Hydra's multirun expansion (a,b / range() / choice() / glob()): one override list per
    point of the cross product, and the keys that vary (what a sweep's summary shows)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        points = [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    return points, [o.key_or_group for o in parsed if o.is_sweep_override()]


def compose_config(config: str, overrides: list[str]) -> DictConfig:
    """Compose the primary config, the experiment, then the user's overrides (last wins)."""
    _, swept = expand_sweep(overrides)
    if swept:
        sweep = next(ov for ov in overrides if ov.split("=", 1)[0].lstrip("+~") in swept)
        raise ConfigError(f"{sweep}: a sweep (several values); add -m to run every point, or give one value")
    _register_schema()
    tmp = Path(tempfile.mkdtemp(prefix="moe-launch-"))
    try:
        experiment_ov, name = _experiment_override(config, tmp)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=experiment_ov + list(overrides))
        _reject_unknown_keys(cfg, OmegaConf.structured(Config))
        if cfg.experiment == "default":
            cfg.experiment = name
        OmegaConf.resolve(cfg)
        return cfg
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    finally:
        GlobalHydra.instance().clear()
        shutil.rmtree(tmp, ignore_errors=True)
