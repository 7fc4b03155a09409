"""`moe-launch`: the command users type; parses arguments and hands off to the backend."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from framework.exit_codes import CONFIG_ERROR_EXIT_CODE, INTERRUPTED_EXIT_CODE
from launcher import launch_log, run_commands
from launcher import schedule as schedule_command
from launcher.compose import available_experiments, compose_config
from launcher.errors import ConfigError
from launcher.local import StopSignals
from launcher.resume_check import plan_resume
from launcher.run_dir import (
    check_run_dir,
    claim_run_dir,
    clear_previous_run,
    finalize_paths,
    resolved_config_path,
    write_resolved_config,
)
from launcher.slurm import SlurmLauncher
from launcher.validation import validate

MAIN_HELP = """\
Train Mixture-of-Experts language models with expert, data and pipeline parallelism.

commands:
  train     compose a config, validate it, and start the ranks with torchrun
  export    write a checkpoint's weights to one .safetensors or .pt file
  schedule  print or draw a simulated pipeline schedule (timeline, bubbles)
  plan      per-rank memory and per-step communication of a config (no GPU, starts nothing)
  status    a run's state (SLURM job or local), restarts and last step; a sweep's table
  cancel    cancel a run's SLURM job (or every job of a sweep)
  sweep-status  a sweep's summary table: overrides, final losses, tokens/s, status per point
  report    a run's (or sweep's) summary from metrics.jsonl; --png draws the curves

examples:
  moe-launch train config=tiny                       # the embedded default: CPU, 2 processes
  moe-launch train config=tiny optim.lr=1e-3 train.steps=50
  moe-launch train config=my_experiment.yaml model.num_experts=16 --dry-run
  moe-launch export runs/tiny/20261125-094203 --out tiny.safetensors
  moe-launch schedule --schedule dualpipev --pp 4 --microbatches 10
  moe-launch train config=tiny launcher=slurm launcher.nnodes=2 launcher.partition=gpu
  moe-launch train config=tiny optim.lr=1e-3,3e-4 model.num_experts=4,8 -m   # a sweep of 4 runs

Run `moe-launch train --help` for the config syntax.
"""

TRAIN_HELP = """\
config=NAME     an experiment under configs/experiment/ ({experiments}), or a path to a
                YAML file shaped like one; default: tiny
OVERRIDES       Hydra overrides, applied after the experiment, last one wins:
                  optim.lr=3e-4 model.num_experts=16   set a value
                  model=small parallel=default         pick a config group option
                  +extra.note=baseline                 add a free-form value
                Unknown keys, wrong types and impossible values stop the launch with
                exit code 2 before any process starts.
-m              a sweep (Hydra multirun): optim.lr=1e-3,3e-4 model.num_experts=4,8 runs the
                cross product; range(1,4), choice(a,b) work as in Hydra. Local points run
                launcher.parallel_runs at a time; with launcher=slurm each is its own job.
launcher=slurm  submit an sbatch job: launcher.nnodes, .nproc_per_node, .partition, .account,
                .qos, .time, .constraint, .exclusive, .mem, .job_name, .gpus_per_node,
                .cpus_per_task, .min_nodes (elastic), .signal_lead_s, .extra_directives=[...]

The resolved config is written to RUN_DIR/config.yaml (default runs/EXPERIMENT/TIMESTAMP,
or run_dir=PATH; relative paths start at the project directory) and every rank reads that
file; RUN_DIR/config.segment-N.yaml keeps each launch's copy.

resume=auto     continue from RUN_DIR's newest checkpoint (the default); the new config is
                compared with the checkpoint's and each changed key is listed: optimizer,
                schedule length, cadences, layout are honoured; model, data, global batch
                and seed changes are refused (exit code 2)
resume=never    start from scratch; refused if RUN_DIR holds checkpoints
resume=overwrite  delete RUN_DIR's checkpoints and metrics, then start from scratch
resume=PATH     continue from that checkpoint (RUN_DIR/checkpoints/step-N)

examples:
  moe-launch train config=tiny
  moe-launch train config=tiny launcher.nproc_per_node=1 train.steps=20 data=synthetic
  moe-launch train config=tiny --dry-run
  moe-launch train config=tiny launcher=slurm launcher.nnodes=16 --dry-run   # prints the sbatch script
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-launch", description=MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a model",
        description=TRAIN_HELP.format(experiments=", ".join(available_experiments())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="moe-launch train [config=NAME|PATH] [OVERRIDES ...] [--dry-run] [-m]",
    )
    train.add_argument("--dry-run", action="store_true", help="print the torchrun command and config, start nothing")
    train.add_argument("-m", "--multirun", action="store_true", help="run every point of the swept overrides")
    train.add_argument("overrides", nargs="*", metavar="OVERRIDES", help=argparse.SUPPRESS)
    export = sub.add_parser(
        "export",
        help="consolidate a checkpoint into one file",
        description="Write the model weights of a run's newest complete checkpoint (or --step N) to one "
        "file that loads on one process with no distributed setup: .safetensors or .pt (torch.save).",
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    export.add_argument("--out", required=True, metavar="FILE", help="output path ending in .safetensors or .pt")
    schedule_command.add_parser(sub)
    plan = sub.add_parser(
        "plan",
        help="memory per rank and communication per step of a config",
        description="Take the same config and overrides as `train` and print, per rank, the bytes of "
        "parameters, gradients, optimizer state, FSDP's unsharded copies and activations against "
        "launcher.gpu_memory_gb, and the bytes each collective sends per step. Needs no GPU; exit code 1 "
        "when a rank does not fit. Example: moe-launch plan config=deepseek_v3 launcher.nnodes=32 parallel.ep=64",
        usage="moe-launch plan [config=NAME|PATH] [OVERRIDES ...]",
    )
    plan.add_argument("overrides", nargs="*", metavar="OVERRIDES", help=argparse.SUPPRESS)
    run_commands.add_parsers(sub)
    return parser


def _split_config(overrides: list[str]) -> tuple[str, list[str]]:
    config, rest = "tiny", []
    for ov in overrides:
        if ov.startswith("config="):
            config = ov.split("=", 1)[1]
        else:
            rest.append(ov)
    return config, rest


def train(overrides: list[str], dry_run: bool, multirun: bool = False) -> int:
    config, overrides = _split_config(overrides)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{ov}: not an override; expected KEY=VALUE (e.g. optim.lr=3e-4)")
    if multirun:
        return run_commands.sweep(config, overrides, dry_run)
    cfg = compose_config(config, overrides)
    fresh_run_dir = finalize_paths(cfg)
    check_run_dir(cfg)
    validate(cfg)
    plan = plan_resume(cfg, fresh_run_dir)  # before anything is written: a refusal leaves the run as it was
    launcher = run_commands.launcher_for(cfg)
    if dry_run:
        for note in plan.notes:
            print(note, file=sys.stderr)
        print(launcher.preview(cfg, resolved_config_path(cfg)))
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    if isinstance(launcher, SlurmLauncher):
        return _prepare_run_dir(cfg, fresh_run_dir, plan, launcher)
    stop = StopSignals()
    with stop.catching():  # from here on a stop signal is reported, never a silent kill
        return _prepare_run_dir(cfg, fresh_run_dir, plan, launcher, stop)


def _prepare_run_dir(cfg, fresh_run_dir, plan, launcher, stop: StopSignals | None = None) -> int:
    """Write the run dir (claim it, apply resume=overwrite, the resolved config), then launch."""
    claim_run_dir(cfg, fresh_run_dir)
    print(f"moe-launch: run dir {cfg.run_dir}", flush=True)
    if cfg.resume == "overwrite":
        if plan.overwrite:
            removed = clear_previous_run(cfg)
            print(f"moe-launch: resume=overwrite: deleted the previous run's {', '.join(removed)}", flush=True)
    if cfg.resume in ("never", "overwrite"):
        # The run dir holds no checkpoint now (never is refused where one exists, overwrite
        # deleted them), so the ranks start from scratch with `auto` too; and a restarted
        # torchrun round or a requeued SLURM job then resumes from this run's own checkpoints.
        cfg.resume = "auto"
    for note in plan.notes:
        print(note, flush=True)
    config_path = write_resolved_config(cfg)
    command = launcher.command(cfg, config_path)
    if isinstance(launcher, SlurmLauncher):
        return launcher.launch(cfg, command)
    launch_log.record(cfg.run_dir, "start")
    code = launcher.launch(cfg, command, stop)
    launch_log.record(cfg.run_dir, "exit", code)
    return code


def export_weights(run_dir: str, out: str, step: int | None) -> int:
    from checkpoint.export import ExportError, export  # torch is only needed here

    if Path(out).is_dir():  # checked here: export would write OUT.tmp, then fail to rename it
        print(
            f"moe-launch: error: --out {out}: is a directory; allowed: a file path ending in .safetensors or .pt",
            file=sys.stderr,
        )
        return CONFIG_ERROR_EXIT_CODE
    try:
        checkpoint, count = export(run_dir, out, step)
    except ExportError as err:
        print(f"moe-launch: error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    except OSError as err:
        print(f"moe-launch: error: --out {out}: cannot write it ({err.strerror or err})", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    print(f"moe-launch: wrote {count} tensors from {checkpoint} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the ranks started (the launcher handles it after)
        print("moe-launch: interrupted; no rank was started", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    # Overrides may come before or after --dry-run; argparse leaves the later ones unknown.
    args, unknown = parser.parse_known_args(argv)
    if args.command == "schedule":
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return schedule_command.run(args)
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        parser.error(f"unknown option {flags[0]}; see moe-launch train --help")
    if args.command is None:
        parser.print_help()
        return CONFIG_ERROR_EXIT_CODE
    if args.command == "plan":
        from launcher.plan import run_plan

        try:
            return run_plan(*_split_config(args.overrides + unknown))
        except ConfigError as err:
            print(f"moe-launch: error: {err}", file=sys.stderr)
            return CONFIG_ERROR_EXIT_CODE
    if args.command == "export":
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return export_weights(args.run_dir, args.out, args.step)
    if args.command in run_commands.COMMANDS:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return run_commands.dispatch(args)
    try:
        return train(args.overrides + unknown, args.dry_run, args.multirun)
    except ConfigError as err:
        print(f"moe-launch: error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
