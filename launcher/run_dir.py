"""The run directory: where the resolved config, metrics and logs of one run live."""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from framework.config import RESOLVED_CONFIG_NAME


def finalize_paths(cfg: DictConfig) -> None:
    """Make every path absolute, so ranks read the same files whatever their cwd."""
    if not cfg.run_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.run_dir = str(Path("runs") / cfg.experiment / stamp)
    cfg.run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())


def resolved_config_path(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) / RESOLVED_CONFIG_NAME


def write_resolved_config(cfg: DictConfig) -> Path:
    """Write config.yaml atomically (temp name + rename): a reader never sees half a file."""
    path = resolved_config_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)
    return path
