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

from checkpoint.manager import CheckpointError, CheckpointManager, CommitError, NoCheckpointError
from checkpoint.state import AttributeState, ModelState, OptimizerState, RngState
from framework.build import build_sharded_model
from framework.config import load_run_config
from framework.data.build import build_data
from framework.distributed import DistContext, init_distributed, shutdown
from framework.exit_codes import CONFIG_ERROR_EXIT_CODE, NON_FINITE_EXIT_CODE, REQUEUE_EXIT_CODE
from framework.flops import measure_peak_flops, train_flops_per_token
from framework.host_sync import step_flags
from framework.loss import TrainingLoss, token_cross_entropy
from framework.metrics import MetricsLogger
from framework.model.args import ModelArgs
from framework.model.moe.aux_loss import set_aux_loss_scale
from framework.model.moe.layer import MoE
from framework.model.moe.load_balance import ExpertLoadBalancer
from framework.optim import build_lr_scheduler, build_optimizer
from framework.resume_changes import apply_resume_changes
from parallel.all_to_all import TIMES, AllToAllTimes
from parallel.grad_clip import clip_grad_norm
from parallel.layout import resolve_layout
from parallel.memory import memory_report, setup_memory
from parallel.mesh import build_expert_mesh, build_groups, build_mesh, dp_rank_and_size, warm_up
from parallel.pipeline import build_schedule, model_pieces, mtp_needs_embedding, plan_stages
from parallel.pipeline.runtime import PipelineRuntime
from parallel.pipeline.stage import fsdp_units, mirror_rank, rank_stage_pieces
from parallel.shards import local_shard


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
        self.groups = build_groups(self.mesh)
        self.dp_rank, self.dp_size = dp_rank_and_size(self.mesh)
        torch.manual_seed(cfg.train.seed)

        self.embed_copy_group = None  # the two ranks that hold the embedding when MTP needs a copy
        self.mirror_group = None  # DualPipe: this rank and the one holding its stages in the other copy
        self.mirror_second = False  # this rank's copy is the one the gradient norm does not count
        same_layers_group = self.groups.dp  # the ranks that hold this rank's MoE layers
        keep = None
        if p.pp > 1:  # keep this rank's pipeline stages only (same parameter names), before sharding
            plan = plan_stages(model_pieces(cfg.model), p.pp_schedule, p.pp, p.pp_virtual_stages)
            if mtp_needs_embedding(plan):
                self.embed_copy_group = self._rank_pairs([(plan.rank_of_piece("embed"), plan.rank_of_piece("head"))])
            pp_rank = self.mesh.get_local_rank("pp")
            mirror = mirror_rank(plan, pp_rank)
            if mirror is not None:
                mirrors = [(r, m) for r in range(p.pp) if r < (m := mirror_rank(plan, r))]
                self.mirror_group = self._rank_pairs(mirrors)
                same_layers_group = self._mirror_replicas(mirrors)
                self.mirror_second = pp_rank > mirror
            self.stage_pieces = rank_stage_pieces(plan, pp_rank)
            self.rank_pieces = keep = frozenset().union(*self.stage_pieces.values())
        # Parallelism is applied to a plain model built on the meta device; each rank
        # materialises only its own shards (framework/build.py).
        self.model, self.n_params = build_sharded_model(
            ModelArgs.from_config(cfg.model),
            cfg.train.seed,
            self.mesh,
            self.expert_mesh,
            cfg.train.precision,
            ctx.device,
            p.ep_per_node or cfg.launcher.nproc_per_node,
            keep_pieces=keep,
            compile_blocks=cfg.train.compile,
            activation_checkpointing=cfg.train.activation_checkpointing,
        )
        expert_ids = {id(p) for m in self.model.moe_layers() for p in m.experts.parameters()}
        self.expert_params = [p for p in self.model.parameters() if id(p) in expert_ids]
        self.dense_params = [p for p in self.model.parameters() if id(p) not in expert_ids]
        # The pipeline-ready view: a list of the model chunks this rank runs (one when pp=1).
        self.model_parts = [self.model]
        self.loss_fn = TrainingLoss(cfg.model.mtp_weight)
        self.pipeline = self._build_pipeline() if p.pp > 1 else None
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.load_balancer = ExpertLoadBalancer(self.model.moe_layers(), cfg.model.bias_update_speed, same_layers_group)
        self.load_balancer.install(self.optimizer)

        self.loader, self.val_batches = build_data(cfg, self.dp_rank, self.dp_size)
        self.step = 0
        self.last_step_skipped = False
        self.last_a2a = AllToAllTimes()  # the last step's expert all-to-alls, this rank
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
        apply_resume_changes(self.resumed_from, self.model, self.optimizer, self.scheduler, cfg.optim, self.logger)

    def _rank_pairs(self, pp_pairs: list[tuple[int, int]]) -> dist.ProcessGroup | None:
        """Groups of two ranks, one per (pipeline pair, data-parallel position): the two hold copies
        of the same parameters, sharded alike, and sum their gradients over this group so the copies
        stay identical. The MTP modules on the last stage embed the next tokens with their own copy
        of the embedding; under DualPipe ranks r and pp-1-r hold the same stages of the two model
        copies. -> this rank's group (None when it is in no pair)."""
        ranks_PRS = self.mesh.mesh
        _, R, S = ranks_PRS.shape
        pairs = [
            [int(ranks_PRS[a, r, s]), int(ranks_PRS[b, r, s])] for a, b in pp_pairs for r in range(R) for s in range(S)
        ]
        group, _ = dist.new_subgroups_by_enumeration(pairs)  # collective: every rank, same order
        return group

    def _mirror_replicas(self, pp_pairs: list[tuple[int, int]]) -> dist.ProcessGroup:
        """DualPipe: every rank that holds the same MoE layers (the data-parallel ranks of both
        mirror stages), over which the expert loads are summed, as over dp without a pipeline."""
        ranks_PRS = self.mesh.mesh
        replicas = [ranks_PRS[a].flatten().tolist() + ranks_PRS[b].flatten().tolist() for a, b in pp_pairs]
        group, _ = dist.new_subgroups_by_enumeration(replicas)  # collective: every rank, same order
        return group

    def _build_pipeline(self) -> PipelineRuntime:
        """This rank's schedule executor; its stages run the one pruned model, piece by piece."""
        t = self.cfg.train
        microbatches = t.global_batch_size // self.dp_size // t.micro_batch_size
        p = self.cfg.parallel
        schedule = build_schedule(p.pp_schedule, self.layout.pp, microbatches, p.pp_virtual_stages)

        def run_stage(stage: int, tokens_BS: torch.Tensor, h_BSD: torch.Tensor | None):
            return self.model(tokens_BS, h_BSD, self.stage_pieces[stage])

        units = {s: fsdp_units(self.model, pieces) for s, pieces in self.stage_pieces.items()}
        pp_rank = self.mesh.get_local_rank("pp")
        overlap = self.cfg.parallel.pp_overlap and self.layout.ep > 1  # F&B overlaps at the expert all-to-alls
        # Each group the pipeline's step uses: a first collective there with every member (mesh.py).
        warm_up([self.groups.pp, self.mirror_group, self.embed_copy_group], self.ctx.device)
        return PipelineRuntime(
            schedule, pp_rank, self.groups.pp, run_stage, self.loss_fn, self.cfg.model.dim, units, overlap
        )

    def embedding_copy(self) -> list[torch.nn.Parameter]:
        """The embedding held by the last stage for its MTP modules: the first stage's is counted."""
        if self.embed_copy_group is None or self.model.embed is None or "embed" in self.rank_pieces:
            return []
        return [self.model.embed.weight]

    def mirror_copy(self) -> list[torch.nn.Parameter]:
        """DualPipe: the parameters of the higher rank of a mirror pair, which the lower rank
        holds too (the gradient norm counts them there)."""
        return list(self.model.parameters()) if self.mirror_second else []

    @torch.no_grad()
    def sum_mirror_grads(self, bucket_numel: int = 1 << 24) -> None:
        """DualPipe: each copy's gradients come from its half of the micro-batches; their sum
        over the mirror pair is the whole step's, so both copies take the same optimizer step.
        The local shards (sharded alike on both ranks) travel in flat buckets of `bucket_numel`."""
        grads = []
        for p in self.model.parameters():  # the same names in the same order on both ranks
            if p.grad is None:  # unused by this copy in this step: it takes the other copy's gradient
                p.grad = torch.zeros_like(p)
            grads.append(local_shard(p.grad))
        start = 0
        while start < len(grads):
            end, numel = start + 1, grads[start].numel()
            while end < len(grads) and numel + grads[end].numel() <= bucket_numel:
                numel += grads[end].numel()
                end += 1
            bucket = grads[start:end]
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=self.mirror_group)
            for g, summed in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(summed.view_as(g))
            start = end

    @property
    def last_loads(self) -> torch.Tensor:
        """[MoE layers, experts] tokens routed in the last optimizer step, all ranks."""
        return self.load_balancer.last_loads_LE

    def forward_backward_step(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; -> the mean main LM loss.

        The one seam between the loop and the model: without a pipeline it runs the model
        parts and the loss here; a pipeline schedule takes the micro-batches and
        `self.loss_fn` and calls the loss on its last stage instead.
        """
        n = len(micro_batches)
        set_aux_loss_scale(1.0 / n)  # each micro-batch's loss enters the step's mean with 1/n
        if self.pipeline is not None:
            self.pipeline.step([b.to(self.ctx.device, non_blocking=True) for b in micro_batches])
            if self.embed_copy_group is not None and self.model.embed is not None:
                grad = self.model.embed.weight.grad  # this rank's shard, reduced over dp
                dist.all_reduce(local_shard(grad), group=self.embed_copy_group)
            if self.mirror_group is not None:
                self.sum_mirror_grads()
            # The loss lives on the rank of the last stage (of each copy); every pipeline rank gets it.
            if self.pipeline.holds_last_stage:
                loss = self.loss_fn.pop_lm_loss() * self.pipeline.loss_share
            else:
                loss = torch.zeros((), device=self.ctx.device)
            dist.all_reduce(loss, group=self.groups.pp)
            return loss
        for i, batch_BS1 in enumerate(micro_batches):
            batch_BS1 = batch_BS1.to(self.ctx.device, non_blocking=True)
            inputs_BS, targets_BS = batch_BS1[:, :-1], batch_BS1[:, 1:]
            for part in self.model_parts:
                # Reduce gradients across ranks only once, after the last micro-batch.
                part.set_requires_gradient_sync(i == n - 1)
            outputs = self.model_parts[0](inputs_BS)
            (self.loss_fn(outputs, targets_BS) / n).backward()
        return self.loss_fn.pop_lm_loss()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over this rank's micro-batches, clip, step. -> (loss, grad norm)."""
        TIMES.reset()  # this step's expert all-to-alls (host clock, no sync), read by the loop's window
        loss = self.forward_backward_step(self.loader.next_step())
        self.last_a2a = TIMES.snapshot()
        grad_norm = clip_grad_norm(
            self.dense_params,
            self.expert_params,
            self.cfg.optim.grad_clip,
            self.ctx.device,
            pp_group=self.groups.pp if self.pipeline is not None else None,  # each stage holds its own grads
            uncounted=self.embedding_copy() + self.mirror_copy(),
            dp_group=self.groups.dp,  # every gradient's mesh spans this stage's data-parallel ranks
        )
        # One small all-reduce carries both "someone saw a non-finite loss" and "someone got
        # SIGTERM", so every rank takes the same branch.
        flags = step_flags(loss, grad_norm, self.stop_requested)
        dist.all_reduce(flags, group=self.groups.world)
        # The step's one host sync, kept: every rank must take the same branch now.
        non_finite, stop = flags.tolist()
        # Not stop_requested itself: a signal landing after this all-reduce on one rank only
        # would send that rank into save() while the others train on (a collective mismatch).
        self.stop_agreed = stop > 0
        self.last_step_skipped = non_finite > 0
        if self.last_step_skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.load_balancer.discard()
            if self.cfg.train.on_nan == "stop":
                raise TrainingStopped(
                    f"non-finite loss or gradient at step {self.step + 1}; stopping without saving "
                    "(train.on_nan=skip skips such steps)",
                    NON_FINITE_EXIT_CODE,
                )
            self.scheduler.step()  # skip: the data and the schedule move on, the weights do not
            return loss, grad_norm
        self.checkpoints.wait_staged()  # an async save may still be copying these weights
        self.optimizer.step()  # its pre-step hook moves the router biases (load_balance.py)
        self.scheduler.step()
        if self.peak_memory is None:  # the one moment params, grads and optimizer state all exist
            self.peak_memory = memory_report(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def pop_cross_node_rows(self) -> torch.Tensor:
        rows = 0
        for moe in self.model.moe_layers():
            rows += moe.dispatcher.cross_node_rows
            moe.dispatcher.cross_node_rows = 0
        return torch.tensor(float(rows), device=self.ctx.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation LM loss over the fixed validation windows of all data-parallel ranks.
        Every rank runs the same number of forwards; padding rows carry weight zero."""
        for part in self.model_parts:
            part.eval()
        total = torch.zeros(2, device=self.ctx.device)
        for val in self.val_batches:
            batch_BS1 = val.tokens_BS1.to(self.ctx.device)
            if self.pipeline is not None:
                outputs = self.pipeline.forward_only(batch_BS1[:, :-1])
                if outputs is None:  # not the last stage: the sums come from the rank that holds it
                    continue
            else:
                outputs = self.model_parts[0](batch_BS1[:, :-1])
            logits_BSV = outputs[0]
            per_row_B = token_cross_entropy(logits_BSV, batch_BS1[:, 1:]).mean(dim=1)
            total[0] += per_row_B[: val.valid_rows].sum()
            total[1] += val.valid_rows
        dist.all_reduce(total, group=self.groups.dp)
        if self.pipeline is not None:
            dist.all_reduce(total, group=self.groups.pp)
        for part in self.model_parts:
            part.train()
        return (total[0] / total[1]).item()  # host sync: the value is logged

    def run(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        t = cfg.train
        tokens_per_step = t.global_batch_size * cfg.model.seq_len
        flops_per_token = train_flops_per_token(cfg.model)
        compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        peak = torch.tensor(measure_peak_flops(ctx.device, compute_dtype), device=ctx.device)
        dist.all_reduce(peak, group=self.groups.world)  # the whole job's measured peak
        peak_flops = peak.item()  # once, before the loop
        self.log_start()

        if self.resumed_from is not None:
            note = f" ({self.checkpoints.resume_note})" if self.checkpoints.resume_note else ""
            self.logger.console(f"resumed from {self.resumed_from.path} at step {self.step}{note}")
        setup = self.gather(setup_memory(ctx.device))  # peak host RSS / device memory after building
        first_val = self.evaluate()
        self.logger.console(f"step {self.step} | val {first_val:.4f}")
        self.logger.log({"step": self.step, "val_loss": first_val, "setup_memory_per_rank": setup})
        val = first_val
        window_loss = torch.zeros((), device=ctx.device)
        window_steps, window_skipped, window_start = 0, 0, time.perf_counter()
        window_a2a = [0.0, 0.0]  # expert all-to-all seconds this rank, exposed and total, over the window
        memory_logged = False
        while self.step < t.steps:
            loss, grad_norm = self.train_step()
            self.step += 1
            window_a2a[0] += self.last_a2a.exposed_s
            window_a2a[1] += self.last_a2a.in_flight_s
            if not memory_logged and self.peak_memory is not None:  # after the first step that stepped
                self.log_memory()
                memory_logged = True
            if self.last_step_skipped:  # a skipped step's loss is not finite: keep it out of the mean
                window_skipped += 1
            else:
                window_loss += loss.detach()
                window_steps += 1
            last = self.step == t.steps
            record = {"step": self.step}
            if self.step % t.eval_every == 0 or last:
                val = self.evaluate()
                record["val_loss"] = val
            if self.step % t.log_every == 0 or last:
                # The loss is averaged over the data-parallel ranks; the grad norm is already
                # global (clip_grad_norm reduces it), so it is not reduced again.
                mean_loss = window_loss / window_steps if window_steps else torch.full_like(window_loss, float("nan"))
                stats = torch.stack([mean_loss, self.pop_cross_node_rows()])
                dist.all_reduce(stats, group=self.groups.dp)
                stats[0] /= self.dp_size
                if self.pipeline is not None:  # each stage counts its own layers' rows
                    dist.all_reduce(stats[1:], group=self.groups.pp)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = tokens_per_step * (window_steps + window_skipped) / elapsed
                record.update(self.step_record(stats, grad_norm, tokens_per_s, flops_per_token, peak_flops))
                if window_skipped:
                    record["skipped_steps"] = window_skipped
                if self.layout.ep > 1:
                    record.update(self.a2a_record(window_a2a, window_steps + window_skipped))
                self.logger.progress(record)
                window_loss.zero_()
                window_steps, window_skipped, window_start = 0, 0, time.perf_counter()
                window_a2a = [0.0, 0.0]
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
            float(all(torch.isfinite(local_shard(p)).all() for p in self.model.parameters())),
            device=self.ctx.device,
        )
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.groups.world)
        if finite.item() < 1:
            raise TrainingStopped(f"weights are not finite at step {self.step}; not saving", NON_FINITE_EXIT_CODE)
        try:
            self.checkpoints.save(self.step)
        except CommitError as err:
            raise TrainingStopped(f"checkpoint at step {self.step} failed, stopping: {err}", 1) from err

    def model_loads(self) -> torch.Tensor:
        """[MoE layers, experts] of the whole model: under a pipeline each rank holds some layers,
        so they are gathered over the pipeline group (collective there) and put in model order."""
        if self.pipeline is None:
            return self.last_loads
        names = [name for name, m in self.model.named_modules() if isinstance(m, MoE)]
        mine = {name: row for name, row in zip(names, self.last_loads.tolist(), strict=False)}  # host sync
        gathered = [None] * self.layout.pp
        dist.all_gather_object(gathered, mine, group=self.groups.pp)
        merged = {name: row for part in gathered for name, row in part.items()}

        def model_order(name: str) -> tuple[int, int]:  # layers.i.ffn first, then mtp.k.block.ffn
            kind, index = name.split(".")[:2]
            return (kind == "mtp", int(index))

        return torch.tensor([merged[name] for name in sorted(merged, key=model_order)])

    def step_record(self, stats, grad_norm, tokens_per_s: float, flops_per_token: float, peak: float) -> dict:
        loads = self.model_loads()
        record = {
            "loss": stats[0].item(),
            "grad_norm": grad_norm.item(),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / peak,
            "tokens_seen": self.step * self.cfg.train.global_batch_size * self.cfg.model.seq_len,
            # routed (token, expert) rows that crossed nodes in the all-to-all, all ranks
            "cross_node_rows": int(stats[1].item()),
        }
        if len(loads):
            imbalance = (loads.max(dim=1).values / loads.float().mean(dim=1)).tolist()
            record["load_imbalance"] = imbalance
            record["max_load_imbalance"] = max(imbalance)
            record["expert_tokens"] = loads.long().tolist()
        else:
            record["max_load_imbalance"] = 1.0
        return record

    def a2a_record(self, window_a2a: list[float], steps: int) -> dict:
        """Expert all-to-all milliseconds per step over the logging window (parallel/all_to_all.py
        TIMES): exposed (blocked waiting) and total (post to end of wait), mean and max over all
        ranks. One small all-reduce each for the sum and the max, at the logging cadence only."""
        per_step_ms = torch.tensor(window_a2a, dtype=torch.float64) * (1000.0 / max(steps, 1))
        total = per_step_ms.to(self.ctx.device)
        peak = total.clone()
        dist.all_reduce(total, group=self.groups.world)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.groups.world)
        mean_exposed, mean_total = (total / self.ctx.world_size).tolist()  # host sync, logging cadence
        max_exposed, max_total = peak.tolist()
        return {
            "a2a_exposed_ms": mean_exposed,
            "a2a_total_ms": mean_total,
            "a2a_exposed_ms_max": max_exposed,
            "a2a_total_ms_max": max_total,
        }

    def log_start(self) -> None:
        lay = self.layout
        self.logger.console(
            f"moe-launch: {self.cfg.experiment} | world {lay.world_size} (pp {lay.pp} x dp_replicate "
            f"{lay.dp_replicate} x dp_shard {lay.dp_shard}, ep {lay.ep}) on {self.ctx.device.type} | "
            f"{self.n_params / 1e6:.2f}M params"
        )

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (a small object; pickled through the world group)."""
        gathered = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, obj, group=self.groups.world)
        return gathered

    def log_memory(self) -> None:
        """Every rank's bytes of params, grads and optimizer state, as held after step 1."""
        gathered = self.gather(self.peak_memory)
        mib = ", ".join(f"{v / 2**20:.2f}" for v in gathered[0].values())
        self.logger.console(f"memory per rank (MiB params, grads, optimizer state) rank 0: {mib}")
        self.logger.log({"step": self.step, "memory_per_rank": gathered})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="RUN_DIR/config.yaml written by moe-launch")
    args = parser.parse_args()
    cfg = load_run_config(args.config)
    ctx = init_distributed(cfg.train.collective_timeout_s, cfg.train.device)
    try:
        trainer = Trainer(cfg, ctx)
    except NoCheckpointError as err:
        if ctx.is_main:
            print(f"moe-launch: error: {err}", file=sys.stderr, flush=True)
        shutdown(CONFIG_ERROR_EXIT_CODE)

    def request_stop(signum, frame):  # SLURM sends SIGTERM/SIGUSR1 before preemption
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGUSR1, request_stop)
    shutdown(run_to_the_end(trainer))


def run_to_the_end(trainer: Trainer) -> int:
    """Run the loop; -> the exit code. Every clean stop (a signal, a non-finite step) first
    lets an async save in flight commit (it holds the finite weights of an earlier step), so
    no exit path abandons a checkpoint half-way; a save that failed is one line, not a trace."""
    try:
        trainer.run()
        return 0
    except TrainingStopped as stop:
        trainer.checkpoints.close(raise_errors=False)
        message, code = str(stop), stop.exit_code
    except CheckpointError as err:  # an async save's commit failed (raised on every rank alike)
        trainer.checkpoints.close(raise_errors=False)
        message, code = f"stopping: {err}", 1
    if trainer.ctx.is_main:
        print(f"moe-launch: {message}", file=sys.stderr, flush=True)
    trainer.logger.finish()
    return code


if __name__ == "__main__":
    main()
