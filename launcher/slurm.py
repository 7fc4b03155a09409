"""The SLURM backend: an sbatch script in the run directory, one srun task per node running torchrun.

Submits it, and answers for a submitted job (state, restarts) and cancels it; every value in the script is quoted.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from launcher.errors import ConfigError
from launcher.launch_log import JOB_FILE, LAUNCH_LOG
from launcher.local import REQUEUE_EXIT_CODE, TORCHRUN_ENV, TRAIN_ENTRY_MODULE
from launcher.run_dir import resolved_config_path

SCRIPT_NAME = "job.sbatch"
LOG_NAME = "slurm-%j.log"
STOP_SIGNAL = "USR1"  # what SLURM sends the batch shell ahead of the time limit or a preemption
RDZV_PORT_BASE, RDZV_PORT_SPAN = 20000, 10000  # below Linux's ephemeral ports (32768+)
NODE_ENTRY_MODULE = "launcher.slurm_node"


def script_path(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) / SCRIPT_NAME


def _directives(cfg: DictConfig) -> list[str]:
    """The #SBATCH lines. sbatch parses them with shell-like quoting, so each value is shlex-quoted."""
    launch, q = cfg.launcher, shlex.quote
    nodes = f"{launch.min_nodes}-{launch.nnodes}" if launch.min_nodes else str(launch.nnodes)
    lines = [
        f"--job-name={q(launch.job_name or cfg.experiment)}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
    ]
    if launch.gpus_per_node:
        lines.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.cpus_per_task:
        lines.append(f"--cpus-per-task={launch.cpus_per_task}")
    for key in ("partition", "account", "qos", "time", "constraint", "mem"):
        if launch[key] != "":
            lines.append(f"--{key}={q(str(launch[key]))}")
    if launch.exclusive:
        lines.append("--exclusive")
    if launch.min_nodes:
        lines.append("--no-kill")  # an elastic job keeps running when one of its nodes fails
    lines += [
        f"--chdir={q(os.getcwd())}",
        f"--output={q(str(Path(cfg.run_dir) / LOG_NAME))}",
        "--open-mode=append",  # a requeued job keeps appending to its log
        "--requeue",
        f"--signal=B:{STOP_SIGNAL}@{launch.signal_lead_s}",
    ]
    lines += [q(d) for d in launch.extra_directives]
    return [f"#SBATCH {line}" for line in lines]


class ShellExpanded(str):
    """A word the batch shell must expand ($SLURM_NNODES ...): double-quoted, never single-quoted."""


def torchrun_command(cfg: DictConfig, config_path: Path) -> list[str]:
    """torchrun on one node of the job; the $-words are expanded by the batch shell."""
    launch = cfg.launcher
    nnodes = f"{launch.min_nodes}:$SLURM_NNODES" if launch.min_nodes else "$SLURM_NNODES"
    x = ShellExpanded
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        x(f"--nnodes={nnodes}"),
        f"--nproc-per-node={launch.nproc_per_node}",
        "--rdzv-backend=c10d",
        x("--rdzv-endpoint=$head_node:$rdzv_port"),
        x("--rdzv-id=$SLURM_JOB_ID"),
        f"--max-restarts={launch.max_restarts}",
        "-m",
        TRAIN_ENTRY_MODULE,
        "--config",
        str(config_path),
    ]


def _shell_words(words: list[str]) -> str:
    """Quote each word; the few that name shell variables go in double quotes so they expand."""
    return " ".join(f'"{w}"' if isinstance(w, ShellExpanded) else shlex.quote(w) for w in words)


def render_script(cfg: DictConfig, config_path: Path) -> str:
    """The whole batch script: directives, then the body that runs on the first node of the allocation."""
    launch, q = cfg.launcher, shlex.quote
    env = {**TORCHRUN_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(launch.stop_timeout_s), "PYTHONUNBUFFERED": "1"}
    node_task = [sys.executable, "-m", NODE_ENTRY_MODULE, "--config", str(config_path), "--"]
    kill_on_bad_exit = 0 if launch.min_nodes else 1  # elastic: torchrun carries on without the failed node
    record = (
        'printf \'{"event": "%s", "job_id": %d, "restart_count": %d, "nodes": %d, "code": %d, '
        '"time": %d}\\n\' "$1" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" "$SLURM_NNODES" "$2" '
        '"$(date +%s)" >>"$run_dir"/' + LAUNCH_LOG
    )
    lines = [
        "#!/bin/bash",
        *_directives(cfg),
        "# Written by moe-launch. One srun task per node runs torchrun; the ranks meet by c10d rendezvous",
        "# on the first node. Ahead of the time limit SLURM sends this shell SIG" + STOP_SIGNAL + "; it passes",
        f"# it on, the ranks save a checkpoint and exit {REQUEUE_EXIT_CODE}, and the job requeues itself and resumes.",
        "set -uo pipefail",
        f"run_dir={q(cfg.run_dir)}",
        "export " + " ".join(f"{k}={q(v)}" for k, v in env.items()),
        f"record() {{ {record}; }}",
        "record start 0",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"rdzv_port=$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))",
        'echo "moe-launch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s),'
        ' rendezvous $head_node:$rdzv_port"',
        f'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit={kill_on_bad_exit} \\',
        f"    {_shell_words(node_task)} \\",
        f"    {_shell_words(torchrun_command(cfg, config_path))} &",
        "srun_pid=$!",
        # srun forwards SIGUSR1 to every process of the step; SIGTERM would make it kill them.
        f'trap \'echo "moe-launch: got SIG{STOP_SIGNAL}; the ranks save a checkpoint"; '
        f'kill -{STOP_SIGNAL} "$srun_pid" 2>/dev/null\' {STOP_SIGNAL}',
        "trap 'echo \"moe-launch: got SIGTERM; waiting for the ranks to save\"' TERM",
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done  # a trapped signal ends wait early',
        'wait "$srun_pid"',
        "code=$?",
        'record exit "$code"',
        f'if [ "$code" -eq {REQUEUE_EXIT_CODE} ]; then',
        '    echo "moe-launch: checkpoint saved; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def run_client(command: list[str], what: str) -> str:
    """Run a SLURM client; a failure becomes a one-line error."""
    if shutil.which(command[0]) is None:
        raise ConfigError(f"{command[0]}: not found; {what} needs the SLURM client tools on PATH")
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        message = " ".join((out.stderr or out.stdout).split()) or f"exit code {out.returncode}"
        raise ConfigError(f"{shlex.join(command)}: {message}")
    return out.stdout


def submit(cfg: DictConfig, config_path: Path, dependency: str = "") -> str:
    """Write the script, submit it, record the job in the run directory; returns the job id."""
    path = script_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_script(cfg, config_path))
    command = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(path)]
    job_id = run_client(command, "launcher=slurm").strip().split(";")[0]
    log = Path(cfg.run_dir) / LOG_NAME.replace("%j", job_id)
    record = {"job_id": job_id, "script": str(path), "log": str(log), "submitted": time.time()}
    (Path(cfg.run_dir) / JOB_FILE).write_text(json.dumps(record) + "\n")
    return job_id


class SlurmLauncher:
    """Same interface as LocalLauncher; launching means submitting, and returns at once."""

    def command(self, cfg: DictConfig, config_path: Path) -> list[str]:
        return ["sbatch", "--parsable", str(script_path(cfg))]

    def environment(self, cfg: DictConfig) -> dict[str, str]:
        return {}

    def preview(self, cfg: DictConfig, config_path: Path) -> str:
        submit = shlex.join(self.command(cfg, config_path))
        return f"# {script_path(cfg)}\n{render_script(cfg, config_path)}# submit: {submit}"

    def launch(self, cfg: DictConfig, command: list[str]) -> int:
        job_id = submit(cfg, resolved_config_path(cfg))
        print(f"moe-launch: submitted SLURM job {job_id}; log {Path(cfg.run_dir) / LOG_NAME.replace('%j', job_id)}")
        print(f"moe-launch: watch it with `moe-launch status {cfg.run_dir}`", flush=True)
        return 0


def read_job(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def job_state(job_id: str) -> dict[str, str] | None:
    """State, restarts and reason of a job slurmctld still knows (scontrol), else from sacct; None if neither."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            fields = dict(
                token.split("=", 1) for token in out.stdout.split() if "=" in token and not token.startswith("=")
            )
            return {
                "state": fields.get("JobState", "UNKNOWN"),
                "restarts": fields.get("Restarts", "0"),
                "reason": fields.get("Reason", "None"),
                "exit_code": fields.get("ExitCode", ""),
                "nodes": fields.get("NodeList", ""),
            }
    if shutil.which("sacct"):
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,NodeList"], capture_output=True, text=True
        )
        line = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
        if line:
            state, exit_code, nodes = (line[0].split("|") + ["", "", ""])[:3]
            return {
                "state": state.split()[0],
                "restarts": "?",
                "reason": "None",
                "exit_code": exit_code,
                "nodes": nodes,
            }
    return None


def cancel(job_id: str) -> None:
    run_client(["scancel", job_id], "moe-launch cancel")
