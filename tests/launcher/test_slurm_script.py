"""The generated sbatch script, line by line, and its quoting; the SLURM keys' validation. No SLURM needed."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.compose import compose_config
from launcher.errors import ConfigError
from launcher.run_dir import finalize_paths, resolved_config_path
from launcher.slurm import render_script
from launcher.validation import validate

PY = sys.executable


def slurm_config(*overrides: str, run_dir: str = "/runs/ds/1"):
    cfg = compose_config("deepseek_small", ["launcher=slurm", "data=synthetic", f"run_dir={run_dir}", *overrides])
    finalize_paths(cfg)
    validate(cfg)
    return cfg


def test_sixteen_nodes_of_eight_gpus_line_by_line():
    cfg = slurm_config(
        "launcher.nnodes=16",
        "launcher.partition=gpu",
        "launcher.account=proj-42",
        "launcher.qos=high",
        "launcher.time=2-00:00:00",
        "launcher.constraint=h100",
        "launcher.exclusive=true",
        "launcher.mem=0",
        "launcher.cpus_per_task=96",
        "launcher.max_restarts=3",
        "launcher.extra_directives=['--mail-type=END']",
        "train.global_batch_size=1024",
    )
    lines = render_script(cfg, resolved_config_path(cfg)).splitlines()
    cwd = shlex.quote(str(Path.cwd()))
    torchrun = (
        f"    {PY} -m torch.distributed.run"
        ' "--nnodes=$SLURM_NNODES"'  # every node of the allocation; the batch shell expands it
        " --nproc-per-node=8"  # one rank per GPU
        " --rdzv-backend=c10d"
        ' "--rdzv-endpoint=$head_node:$rdzv_port"'  # the first node, a port from the job id
        ' "--rdzv-id=$SLURM_JOB_ID"'  # the same id on every node, and again after a requeue
        " --max-restarts=3"
        " -m framework.train --config /runs/ds/1/config.yaml &"
    )
    expected = [
        "#!/bin/bash",
        "#SBATCH --job-name=deepseek_small",
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=1",  # one torchrun per node, which starts the 8 ranks
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-42",
        "#SBATCH --qos=high",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --constraint=h100",
        "#SBATCH --mem=0",
        "#SBATCH --exclusive",
        f"#SBATCH --chdir={cwd}",
        "#SBATCH --output=/runs/ds/1/slurm-%j.log",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",  # the batch shell, 300 s ahead of the time limit
        "#SBATCH --mail-type=END",
        "# Written by moe-launch. One srun task per node runs torchrun; the ranks meet by c10d rendezvous",
        "# on the first node. Ahead of the time limit SLURM sends this shell SIGUSR1; it passes",
        "# it on, the ranks save a checkpoint and exit 75, and the job requeues itself and resumes.",
        "set -uo pipefail",
        "run_dir=/runs/ds/1",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 PYTHONUNBUFFERED=1",
        'record() { printf \'{"event": "%s", "job_id": %d, "restart_count": %d, "nodes": %d, '
        '"code": %d, "time": %d}\\n\' "$1" "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" "$SLURM_NNODES" "$2" '
        '"$(date +%s)" >>"$run_dir"/launches.jsonl; }',
        "record start 0",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "rdzv_port=$((20000 + SLURM_JOB_ID % 10000))",
        'echo "moe-launch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s),'
        ' rendezvous $head_node:$rdzv_port"',
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        f"    {PY} -m launcher.slurm_node --config /runs/ds/1/config.yaml -- \\",
        torchrun,
        "srun_pid=$!",
        'trap \'echo "moe-launch: got SIGUSR1; the ranks save a checkpoint"; kill -USR1 "$srun_pid" 2>/dev/null\' USR1',
        "trap 'echo \"moe-launch: got SIGTERM; waiting for the ranks to save\"' TERM",
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done  # a trapped signal ends wait early',
        'wait "$srun_pid"',
        "code=$?",
        'record exit "$code"',
        'if [ "$code" -eq 75 ]; then',
        '    echo "moe-launch: checkpoint saved; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$code"',
    ]
    assert len(lines) == len(expected)
    for got, want in zip(lines, expected, strict=True):
        assert got == want


def test_elastic_job_asks_for_a_node_range_and_torchrun_min_max():
    elastic = ["launcher.nnodes=16", "launcher.min_nodes=15", "train.micro_batch_size=1"]
    cfg = slurm_config(*elastic, "train.global_batch_size=1920")  # divides 15 x 8 and 16 x 8 ranks
    script = render_script(cfg, resolved_config_path(cfg))
    assert "#SBATCH --nodes=15-16\n" in script and "#SBATCH --no-kill\n" in script
    assert '"--nnodes=15:$SLURM_NNODES"' in script and "--kill-on-bad-exit=0" in script
    with pytest.raises(ConfigError, match=r"global_batch_size=1024: .* 120 data-parallel .* \(on 15 nodes, which"):
        slurm_config(*elastic, "train.global_batch_size=1024")


def test_every_value_is_quoted_a_nasty_name_and_path_run_no_command(tmp_path):
    nasty = "x y'z\"; touch pwned; $(touch pwned2) `touch pwned3`"
    run_dir = tmp_path / nasty.replace("/", "")
    quoted = "'" + nasty.replace("'", "\\'") + "'"
    cfg = slurm_config(f"launcher.job_name={quoted}", f"run_dir='{str(run_dir).replace(chr(39), chr(92) + chr(39))}'")
    assert cfg.run_dir == str(run_dir)
    script = render_script(cfg, resolved_config_path(cfg))
    directives = {line.split("=", 1)[0]: line for line in script.splitlines() if line.startswith("#SBATCH --job-name")}
    # sbatch reads #SBATCH lines with shell-like quoting: the shell's reading is the value itself.
    assert shlex.split(directives["#SBATCH --job-name"])[1] == f"--job-name={nasty}"
    # Run the script's own lines that hold the values in bash, with the SLURM commands as no-ops.
    body = script.replace("srun ", "true ").replace("scontrol ", "true ")
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1"}
    probe = body.replace('record exit "$code"', 'record exit "$code"; printf "%s" "$run_dir" > "$run_dir/seen"')
    (run_dir).mkdir(parents=True)
    out = subprocess.run(["bash", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (run_dir / "seen").read_text() == str(run_dir)
    assert not [p for p in tmp_path.rglob("pwned*")]


@pytest.mark.parametrize(
    "override,message",
    [
        ("launcher.min_nodes=3", "launcher.min_nodes=3: allowed: 0 (not elastic) or 1..launcher.nnodes=2"),
        ("launcher.signal_lead_s=60", "launcher.signal_lead_s=60: must be > launcher.stop_timeout_s=120"),
        ("launcher.time=4h", "launcher.time=4h: allowed: MINUTES, HH:MM:SS, D-HH, D-HH:MM:SS or UNLIMITED"),
        ("launcher.mem=lots", "launcher.mem=lots: allowed: e.g. 0, 4000, 480G"),
        ("launcher.extra_directives=['mail']", "launcher.extra_directives[0]=mail: must be an sbatch option"),
        ("launcher.job_name=a\\b", "launcher.job_name='a\\\\b': must not hold control characters or backslashes"),
        ("launcher.gpus_per_node=-1", "launcher.gpus_per_node=-1: must be >= 0"),
        ("launcher.parallel_runs=0", "launcher.parallel_runs=0: must be > 0"),
        ("launcher.gpus_per_node=4", "launcher.nproc_per_node=8: must be <= launcher.gpus_per_node=4"),
    ],
)
def test_bad_slurm_keys_exit_2_with_one_line(override, message, capsys, tmp_path):
    code = main(["train", "launcher=slurm", "launcher.nnodes=2", "data=synthetic", f"run_dir={tmp_path}/r", override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"moe-launch: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_the_script_and_submits_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "launcher=slurm", "launcher.nproc_per_node=2", "data=synthetic", f"run_dir={run_dir}"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {run_dir}/job.sbatch\n#!/bin/bash\n#SBATCH --job-name=tiny\n")
    assert f"# submit: sbatch --parsable {run_dir}/job.sbatch\n" in out
    assert "launcher:\n  name: slurm\n" in out  # then the resolved config
    assert not run_dir.exists()


def test_sweep_points_are_planned_and_validated_before_anything_starts(capsys, tmp_path):
    args = ["train", "data=synthetic", f"run_dir={tmp_path}/sw", "optim.lr=1e-3,3e-4", "model.top_k=range(1,3)", "-m"]
    assert main([*args, "--dry-run"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# point")]
    assert headers == [
        f"# point 1/4 [optim.lr=0.001 model.top_k=1] in {tmp_path}/sw/0",
        f"# point 2/4 [optim.lr=0.001 model.top_k=2] in {tmp_path}/sw/1",
        f"# point 3/4 [optim.lr=0.0003 model.top_k=1] in {tmp_path}/sw/2",
        f"# point 4/4 [optim.lr=0.0003 model.top_k=2] in {tmp_path}/sw/3",
    ]
    # One impossible point stops the whole sweep before any point starts.
    assert main(["train", "data=synthetic", f"run_dir={tmp_path}/bad", "model.top_k=2,9", "-m"]) == 2
    err = capsys.readouterr().err
    assert err == "moe-launch: error: sweep point 2/2 [model.top_k=9]: model.top_k=9: must be <= model.num_experts=8\n"
    assert not (tmp_path / "bad").exists()
