"""Export a checkpoint's model weights to one file that loads on one process, no distributed.

DCP stores every tensor with its global shape (experts included), so reading the whole
checkpoint without a process group yields the single-process state dict.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from checkpoint.commit import CHECKPOINTS_DIR, check_checkpoint, step_dir_name, step_dirs

FORMATS = (".safetensors", ".pt")


class ExportError(ValueError):
    """A bad run dir, step or output path; the message names it."""


def pick_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step`, or the newest one that verifies (sizes and checksums): a broken
    one is skipped with a one-line warning, as resume does."""
    root = run_dir / CHECKPOINTS_DIR
    if step is not None:
        path = root / step_dir_name(step)
        problem = check_checkpoint(path)
        if problem:
            raise ExportError(f"--step {step}: {path}: {problem}")
        return path
    for path in reversed(step_dirs(root)):
        problem = check_checkpoint(path)
        if problem is None:
            return path
        print(f"moe-launch: warning: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    raise ExportError(f"{run_dir}: no complete checkpoint under {root}")


def load_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The `model` part of a DCP checkpoint as plain, full tensors."""
    state: dict = {}
    _load_state_dict(
        state, storage_reader=FileSystemReader(str(checkpoint)), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return {name: t.contiguous() for name, t in state["model"].items()}


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> tuple[Path, int]:
    """-> (the checkpoint used, number of tensors written)."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise ExportError(f"--out {out}: unknown format; allowed suffixes: {', '.join(FORMATS)}")
    checkpoint = pick_checkpoint(Path(run_dir), step)
    weights = load_model_weights(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(tmp), metadata={"source": str(checkpoint)})
    else:
        torch.save(weights, tmp)
    tmp.replace(out)  # never a half-written file under the final name
    return checkpoint, len(weights)
