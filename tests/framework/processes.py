"""Finding and signalling the processes of a job started in a test (via /proc)."""

import os
from pathlib import Path


def rank_pids(config_path: Path) -> list[int]:
    """PIDs of the training ranks started for this config (children of torchrun)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_agent = any(m in cmdline for m in (b"torch.distributed.run", b"launcher.torchrun", b"launcher.cli"))
        if b"framework.train" in cmdline and str(config_path).encode() in cmdline and not is_agent:
            pids.append(int(entry.name))
    return pids


def process_tree(root: int) -> list[int]:
    """root and every process below it (torchrun may put its workers in their own groups)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
