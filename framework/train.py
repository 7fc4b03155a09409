"""The training entry point every rank runs: build, loop, evaluate, log.

Started by torchrun as `python -m framework.train --config RUN_DIR/config.yaml`; the
config file the launcher wrote is the only input, the CLI is never re-parsed here.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import torch
import torch.distributed as dist

from checkpoint.manager import CheckpointManager, CommitError, NoCheckpointError
from checkpoint.state import AttributeState, ModelState, OptimizerState, RngState
from framework.config import load_run_config
from framework.data.build import build_data
from framework.distributed import DistContext, init_distributed, shutdown
from framework.flops import measure_peak_flops, train_flops_per_token
from framework.metrics import MetricsLogger
from framework.model.transformer import ModelArgs, MoETransformer
from framework.optim import build_lr_scheduler, build_optimizer
from parallel.expert_parallel import apply_expert_parallel
from parallel.fsdp import apply_fsdp
from parallel.grad_clip import clip_grad_norm
from parallel.layout import resolve_layout
from parallel.memory import memory_report
from parallel.mesh import build_expert_mesh, build_mesh, dp_mesh, dp_rank_and_size, expert_dp_mesh

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; run me again
NON_FINITE_EXIT_CODE = 3


class TrainingStopped(Exception):
    """A clean stop with a one-line reason (rank 0 prints it) and an exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Trainer:
    """Holds what one rank builds; `run()` reads top to bottom: loop, evaluate, log."""

    def __init__(self, cfg, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        p = cfg.parallel
        self.layout = resolve_layout(ctx.world_size, p.pp, p.dp_replicate, p.dp_shard, p.ep)
        self.mesh = build_mesh(self.layout, ctx.device)
        self.expert_mesh = build_expert_mesh(self.layout, ctx.device)
        self.dp_rank, self.dp_size = dp_rank_and_size(self.mesh)
        torch.manual_seed(cfg.train.seed)

        # Parallelism is applied to a plain model: init the full model identically on
        # every rank, keep this rank's experts, then shard.
        self.model = MoETransformer(ModelArgs.from_config(cfg.model))
        self.model.init_weights(cfg.train.seed)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # before EP splits experts
        self.model.to(ctx.device)
        ep_per_node = p.ep_per_node or cfg.launcher.nproc_per_node
        apply_expert_parallel(self.model, self.expert_mesh, ep_per_node)
        apply_fsdp(self.model, dp_mesh(self.mesh), expert_dp_mesh(self.expert_mesh), cfg.train.precision)
        expert_ids = {id(p) for m in self.model.moe_layers() for p in m.experts.parameters()}
        self.expert_params = [p for p in self.model.parameters() if id(p) in expert_ids]
        self.dense_params = [p for p in self.model.parameters() if id(p) not in expert_ids]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.train.steps)

        self.loader, self.val_batches = build_data(cfg, self.dp_rank, self.dp_size)
        self.step = 0
        self.stop_requested = False  # set by this rank's signal handler, at any moment
        self.stop_agreed = False  # set only from the all-reduced flags: every rank sees the same
        self.peak_memory: dict | None = None

        # Everything a resume needs, registered once: save and load walk this dict.
        self.wandb_run_id: str | None = None
        checkpointed = {
            "model": ModelState(self.model),
            "optim": OptimizerState(self.model, self.optimizer),
            "sampler": self.loader.sampler,
            "scheduler": self.scheduler,
            "trainer": AttributeState(self, "step", "wandb_run_id"),
            "rng": RngState(),
        }
        ck = cfg.checkpoint
        self.checkpoints = CheckpointManager(
            cfg.run_dir, checkpointed, ck.keep, ck["async"], ctx.rank, ctx.world_size, write_threads=ck.write_threads
        )
        self.resumed_from = self.checkpoints.find(cfg.resume)
        if self.resumed_from is not None:
            self.checkpoints.load(self.resumed_from)
        self.logger = MetricsLogger(cfg, enabled=ctx.is_main, wandb_run_id=self.wandb_run_id)
        self.wandb_run_id = self.logger.wandb_run_id

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over this rank's micro-batches, clip, step. -> (loss, grad norm)."""
        micro_batches = self.loader.next_step()
        loss_sum = torch.zeros((), device=self.ctx.device)
        for i, batch in enumerate(micro_batches):
            # Reduce gradients across ranks only once, after the last micro-batch.
            self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            out = self.model(batch.to(self.ctx.device, non_blocking=True))
            (out.loss / len(micro_batches)).backward()
            loss_sum += out.lm_loss
        grad_norm = clip_grad_norm(self.dense_params, self.expert_params, self.cfg.optim.grad_clip, self.ctx.device)
        # One small all-reduce carries both "someone saw a non-finite loss" and "someone got
        # SIGTERM", so every rank takes the same branch.
        flags = torch.tensor(
            [float(not torch.isfinite(loss_sum) or not torch.isfinite(grad_norm)), float(self.stop_requested)],
            device=self.ctx.device,
        )
        dist.all_reduce(flags)
        # Not stop_requested itself: a signal landing after this all-reduce on one rank only
        # would send that rank into save() while the others train on (a collective mismatch).
        self.stop_agreed = bool(flags[1] > 0)
        if flags[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            for moe in self.model.moe_layers():
                moe.tokens_per_expert.zero_()
            if self.cfg.train.on_nan == "stop":
                raise TrainingStopped(
                    f"non-finite loss or gradient at step {self.step + 1}; stopping without saving "
                    "(train.on_nan=skip skips such steps)",
                    NON_FINITE_EXIT_CODE,
                )
            self.scheduler.step()  # skip: the data and the schedule move on, the weights do not
            self.last_loads = []
            return loss_sum / len(micro_batches), grad_norm
        self.checkpoints.wait_staged()  # an async save may still be copying these weights
        self.optimizer.step()
        self.scheduler.step()
        if self.peak_memory is None:  # the one moment params, grads and optimizer state all exist
            self.peak_memory = memory_report(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.update_router_biases()
        return loss_sum / len(micro_batches), grad_norm

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Sum each MoE layer's expert load over all ranks, then nudge every rank's bias
        the same way, so the bias stays identical everywhere."""
        layers = self.model.moe_layers()
        if not layers:
            self.last_loads = []
            return
        loads = torch.stack([m.tokens_per_expert for m in layers])
        dist.all_reduce(loads)
        for moe, load in zip(layers, loads, strict=True):
            moe.router.update_bias(load, self.cfg.model.bias_update_speed)
            moe.tokens_per_expert.zero_()
        self.last_loads = loads

    def pop_cross_node_rows(self) -> torch.Tensor:
        rows = 0
        for moe in self.model.moe_layers():
            rows += moe.dispatcher.cross_node_rows
            moe.dispatcher.cross_node_rows = 0
        return torch.tensor(float(rows), device=self.ctx.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation LM loss over the fixed validation windows of all ranks."""
        self.model.eval()
        total = torch.zeros(2, device=self.ctx.device)
        for batch in self.val_batches:
            out = self.model(batch.to(self.ctx.device))
            total[0] += out.lm_loss * batch.shape[0]
            total[1] += batch.shape[0]
        dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def run(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        t = cfg.train
        tokens_per_step = t.global_batch_size * cfg.model.seq_len
        flops_per_token = train_flops_per_token(cfg.model)
        compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        peak = torch.tensor(measure_peak_flops(ctx.device, compute_dtype), device=ctx.device)
        dist.all_reduce(peak)  # the whole job's measured peak
        self.log_start()

        if self.resumed_from is not None:
            note = f" ({self.checkpoints.resume_note})" if self.checkpoints.resume_note else ""
            self.logger.console(f"resumed from {self.resumed_from.path} at step {self.step}{note}")
        first_val = self.evaluate()
        self.logger.console(f"step {self.step} | val {first_val:.4f}")
        self.logger.log({"step": self.step, "val_loss": first_val})
        val = first_val
        window_loss = torch.zeros((), device=ctx.device)
        window_steps, window_start = 0, time.perf_counter()
        first_step_here = True
        while self.step < t.steps:
            loss, grad_norm = self.train_step()
            self.step += 1
            if first_step_here:  # optimizer state exists only after a step
                self.log_memory()
                first_step_here = False
            window_loss += loss.detach()
            window_steps += 1
            last = self.step == t.steps
            record = {"step": self.step}
            if self.step % t.eval_every == 0 or last:
                val = self.evaluate()
                record["val_loss"] = val
            if self.step % t.log_every == 0 or last:
                stats = torch.stack([window_loss / window_steps, grad_norm.to(window_loss), self.pop_cross_node_rows()])
                dist.all_reduce(stats)
                stats[:2] /= ctx.world_size
                elapsed = time.perf_counter() - window_start
                tokens_per_s = tokens_per_step * window_steps / elapsed
                record.update(self.step_record(stats, tokens_per_s, flops_per_token, peak.item()))
                self.logger.progress(record)
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if len(record) > 1:
                self.logger.log(record)
            interval = cfg.checkpoint.interval
            if self.stop_agreed:
                self.save()
                self.checkpoints.close()
                raise TrainingStopped(
                    f"stopped by signal after step {self.step}; checkpoint saved, requeue to resume",
                    REQUEUE_EXIT_CODE,
                )
            if last or (interval and self.step % interval == 0):
                self.save()
        self.checkpoints.close()
        self.logger.console(f"validation loss: first {first_val:.4f} -> final {val:.4f}")
        self.logger.finish()

    def save(self) -> None:
        """Checkpoint the whole training state; refuses weights that are not finite."""
        finite = torch.tensor(
            float(
                all(
                    torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in self.model.parameters()
                )
            ),
            device=self.ctx.device,
        )
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            raise TrainingStopped(f"weights are not finite at step {self.step}; not saving", NON_FINITE_EXIT_CODE)
        try:
            self.checkpoints.save(self.step)
        except CommitError as err:
            raise TrainingStopped(f"checkpoint at step {self.step} failed, stopping: {err}", 1) from err

    def step_record(self, stats, tokens_per_s: float, flops_per_token: float, peak: float) -> dict:
        loads = self.last_loads
        record = {
            "loss": stats[0].item(),
            "grad_norm": stats[1].item(),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / peak,
            "tokens_seen": self.step * self.cfg.train.global_batch_size * self.cfg.model.seq_len,
            # routed (token, expert) rows that crossed nodes in the all-to-all, all ranks
            "cross_node_rows": int(stats[2].item()),
        }
        if len(loads):
            imbalance = (loads.max(dim=1).values / loads.float().mean(dim=1)).tolist()
            record["load_imbalance"] = imbalance
            record["max_load_imbalance"] = max(imbalance)
            record["expert_tokens"] = loads.long().tolist()
        else:
            record["max_load_imbalance"] = 1.0
        return record

    def log_start(self) -> None:
        lay = self.layout
        self.logger.console(
            f"moe-launch: {self.cfg.experiment} | world {lay.world_size} (pp {lay.pp} x dp_replicate "
            f"{lay.dp_replicate} x dp_shard {lay.dp_shard}, ep {lay.ep}) on {self.ctx.device.type} | "
            f"{self.n_params / 1e6:.2f}M params"
        )

    def log_memory(self) -> None:
        """Every rank's bytes of params, grads and optimizer state, as held after step 1."""
        gathered = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, self.peak_memory)
        mib = ", ".join(f"{v / 2**20:.2f}" for v in gathered[0].values())
        self.logger.console(f"memory per rank (MiB params, grads, optimizer state) rank 0: {mib}")
        self.logger.log({"step": self.step, "memory_per_rank": gathered})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="RUN_DIR/config.yaml written by moe-launch")
    args = parser.parse_args()
    cfg = load_run_config(args.config)
    ctx = init_distributed(cfg.train.collective_timeout_s)
    try:
        trainer = Trainer(cfg, ctx)
    except NoCheckpointError as err:
        if ctx.is_main:
            print(f"moe-launch: error: {err}", file=sys.stderr, flush=True)
        shutdown(2)

    def request_stop(signum, frame):  # SLURM sends SIGTERM/SIGUSR1 before preemption
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGUSR1, request_stop)
    try:
        trainer.run()
    except TrainingStopped as stop:
        if ctx.is_main:
            print(f"moe-launch: {stop}", file=sys.stderr, flush=True)
        trainer.logger.finish()
        shutdown(stop.exit_code)
    shutdown(0)


if __name__ == "__main__":
    main()
