"""What a launch resumes from, and what may change on resume, decided before any rank starts.

The new config is compared with the config the checkpoint was trained with; each changed key is
either honoured (the new value wins; the ranks apply it) or refused (exit 2 naming the key).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from checkpoint.commit import (
    CHECKPOINTS_DIR,
    RUN_CONFIG,
    STEP_DIR,
    TRAINER_STATE,
    check_complete,
    read_checkpoint_config,
    step_dirs,
)
from framework.config import Config
from launcher.errors import ConfigError

NOT_COMPARED = ("run_dir", "resume")  # where the run lives and how it resumes: per launch by nature
# The checkpoint's weights, data position and data order belong to these; everything else
# (optim.*, train.steps and cadences, checkpoint.*, logging.*, launcher.*, parallel.*: DCP
# reshards) may change, and the new value is what the ranks use.
REFUSED_PREFIXES = ("model.", "data.")
REFUSED_KEYS = ("train.global_batch_size", "train.seed")
HONOURED_MODEL_KEYS = (
    "model.name",
    "model.bias_update_speed",
    "model.aux_loss_alpha",
    "model.mtp_weight",
    "model.init_std",
)
SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.schedule", "optim.min_lr_ratio")
UNUSED_DATA_KEY = {"synthetic": "data.path", "file": "data.synthetic_tokens"}  # the other source's key
NEW_RUN = "or start a new run (another run_dir, or resume=overwrite to delete this one's checkpoints)"


@dataclass
class ResumePlan:
    """The checkpoint a launch resumes from (None: a fresh start) and the lines to print."""

    checkpoint: Path | None = None
    step: int = 0
    overwrite: bool = False  # resume=overwrite found checkpoints to delete before the launch
    notes: list[str] = field(default_factory=list)


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """{"optim.lr": 0.001, ...} for every leaf; `extra` too, key by key."""
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def is_refused(key: str) -> bool:
    if key in HONOURED_MODEL_KEYS:
        return False
    return key in REFUSED_KEYS or key.startswith(REFUSED_PREFIXES)


def _same(old: object, new: object) -> bool:
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return math.isclose(old, new, rel_tol=1e-12, abs_tol=0.0) or old == new
    return old == new


def changed_keys(old_yaml: str, new: DictConfig) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, new value) for every key that differs. Keys the checkpoint's
    config lacks (added to the schema since) count as their default."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=True))
    old_cfg = OmegaConf.create(old_yaml)
    old = {**defaults, **flatten(OmegaConf.to_container(old_cfg, resolve=True))}
    new_flat = flatten(OmegaConf.to_container(new, resolve=True))
    unused = (
        UNUSED_DATA_KEY.get(new_flat.get("data.source"))
        if old.get("data.source") == new_flat.get("data.source")
        else None
    )
    changes = []
    for key, value in new_flat.items():
        if key in NOT_COMPARED or key not in old or key == unused:
            continue
        if not _same(old[key], value):
            changes.append((key, old[key], value))
    return changes


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at: its trainer state, else its directory name."""
    try:
        return int(json.loads((path / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = STEP_DIR.match(path.name)
        return int(match.group(1)) if match else 0


def _checkpoint_config(path: Path) -> tuple[str | None, str]:
    """The config a checkpoint was trained with, and where it came from. Checkpoints written
    before they held a config fall back to their run's config.yaml (the latest launch's)."""
    text = read_checkpoint_config(path)
    if text is not None:
        return text, str(path / RUN_CONFIG)
    run_config = path.parent.parent / RUN_CONFIG
    if path.parent.name == CHECKPOINTS_DIR and run_config.is_file():
        return run_config.read_text(), str(run_config)
    return None, ""


def _describe(value: object) -> str:
    return "''" if value == "" else str(value)


def _honoured_note(key: str, old: object, new: object, step: int) -> str:
    note = "the new value is applied"
    if key == "train.steps":
        note = f"the LR schedule is stretched to the new length from step {step}"
    elif key in SCHEDULE_KEYS:
        note = f"the LR schedule from step {step} follows the new value"
    elif key.startswith("optim."):
        note = "the new value is applied to the optimizer's parameter groups"
    return f"moe-launch: resume: {key} {_describe(old)} -> {_describe(new)} ({note})"


def _find_checkpoint(cfg: DictConfig) -> Path | None:
    if cfg.resume != "auto":
        return Path(cfg.resume)  # validation checked it is a committed checkpoint
    dirs = step_dirs(Path(cfg.run_dir) / CHECKPOINTS_DIR)
    for path in reversed(dirs):
        if check_complete(path) is None:
            return path
    if dirs:
        raise ConfigError(
            f"resume=auto: no usable checkpoint in {Path(cfg.run_dir) / CHECKPOINTS_DIR}: every one is "
            f"incomplete ({dirs[-1].name}: {check_complete(dirs[-1])}); allowed: resume=PATH of a good one, {NEW_RUN}"
        )
    return None


def plan_resume(cfg: DictConfig, fresh_run_dir: bool) -> ResumePlan:
    """Decide what this launch resumes from and check the new config against the checkpoint's.
    Raises ConfigError for a change the checkpoint cannot take."""
    run_checkpoints = step_dirs(Path(cfg.run_dir) / CHECKPOINTS_DIR) if not fresh_run_dir else []
    if cfg.resume in ("never", "overwrite"):
        if run_checkpoints and cfg.resume == "never":
            raise ConfigError(
                f"resume=never: run_dir={cfg.run_dir} already holds {len(run_checkpoints)} checkpoint(s) "
                f"(newest {run_checkpoints[-1].name}) that a new run would mix with; allowed: resume=auto to "
                "continue them, resume=overwrite to delete them and start over, or another run_dir"
            )
        return ResumePlan(overwrite=bool(run_checkpoints))
    if fresh_run_dir and cfg.resume == "auto":
        return ResumePlan()
    path = _find_checkpoint(cfg)
    if path is None:
        return ResumePlan()
    plan = ResumePlan(checkpoint=path, step=checkpoint_step(path))
    if cfg.train.steps <= plan.step:
        raise ConfigError(
            f"train.steps={cfg.train.steps}: the checkpoint {path} is already at step {plan.step}, so nothing "
            f"would train; allowed: train.steps > {plan.step}, {NEW_RUN}"
        )
    old_yaml, source = _checkpoint_config(path)
    if old_yaml is None:
        plan.notes.append(f"moe-launch: warning: {path} holds no config.yaml; cannot check what changed since")
        return plan
    try:
        changes = changed_keys(old_yaml, cfg)
    except (ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
        reason = " ".join(str(err).split())
        plan.notes.append(f"moe-launch: warning: cannot read {source} ({reason}); cannot check what changed since")
        return plan
    refused = [(k, old, new) for k, old, new in changes if is_refused(k)]
    if refused:
        key, old, new = refused[0]
        others = f" (also changed: {', '.join(k for k, _, _ in refused[1:])})" if refused[1:] else ""
        raise ConfigError(
            f"{key}={_describe(new)}: the checkpoint {path} was trained with {key}={_describe(old)} ({source}) and "
            f"it cannot change on resume{others}; allowed: {key}={_describe(old)}, {NEW_RUN}"
        )
    plan.notes.extend(_honoured_note(k, old, new, plan.step) for k, old, new in changes)
    return plan
