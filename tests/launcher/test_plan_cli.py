"""`moe-launch plan` as a user runs it: the tables, the verdict, bad input, no torch, no GPU."""

import subprocess
import sys

from launcher.cli import main
from launcher.plan import piece_list, rank_ranges

CLI = [sys.executable, "-m", "launcher.cli"]
DEEPSEEK_ON_32_NODES = ["plan", "config=deepseek_v3", "launcher.nnodes=32", "parallel.ep=64"]


def test_plan_prints_memory_per_rank_and_communication(capsys):
    assert main(["plan", "config=tiny", "parallel.ep=2", "launcher.nproc_per_node=4"]) == 0
    out = capsys.readouterr().out
    assert (
        "world 4 = 1 node x 4 (pp 1 x dp_replicate 1 x dp_shard 4, ep 2; experts: edp_replicate 1 x edp_shard 2)" in out
    )
    assert "model tiny: 1.82M params" in out
    header = next(line for line in out.splitlines() if line.startswith("ranks"))
    for column in ("params", "grads", "optimizer", "FSDP unsharded", "accumulated grads", "activations", "total"):
        assert column in header
    assert any(line.startswith("0-3 ") for line in out.splitlines())  # identical ranks share one row
    assert "EP all-to-all: dispatch + combine, fwd + bwd  ep 2" in out
    assert "FSDP all-gather: expert params" in out and "HSDP all-reduce: dense grads" in out
    assert out.rstrip().splitlines()[-1].startswith("fits: the largest rank needs 0.")


def test_deepseek_v3_on_32_nodes_of_80_gb_with_ep_64(capsys):
    """The README's question: not without checkpointing, yes with full checkpointing (77 GB of 80:
    the embedding, its own FSDP unit, is not held gathered at the peak), more easily with 2K."""
    assert main(DEEPSEEK_ON_32_NODES) == 1  # exit code 1: does not fit
    out = capsys.readouterr().out
    assert "world 256 = 32 nodes x 8" in out and "does NOT fit" in out
    full = [*DEEPSEEK_ON_32_NODES, "train.activation_checkpointing=full"]
    assert main(full) == 0
    assert "fits: the largest rank needs 77.24 of 80 GB (97%)" in capsys.readouterr().out
    assert main([*full, "model.seq_len=2048"]) == 0
    assert "fits: the largest rank needs 68.56 of 80 GB (86%)" in capsys.readouterr().out
    # Gradient accumulation: FSDP2 keeps unsharded gradients between micro-batches.
    assert main([*full, "model.seq_len=2048", "train.global_batch_size=512"]) == 1


def test_bad_values_are_the_same_one_liners_as_train(capsys):
    for args in (["model.top_k=12"], ["parallel.ep=3"]):
        assert main(["plan", "config=tiny", *args]) == 2
        plan_err = capsys.readouterr().err
        assert main(["train", "config=tiny", "--dry-run", *args]) == 2
        assert plan_err == capsys.readouterr().err
        assert plan_err.count("\n") == 1 and plan_err.startswith("moe-launch: error: ")
    assert main(["plan", "config=tiny", "train.activation_checkpointing=some"]) == 2
    err = capsys.readouterr().err
    assert err == "moe-launch: error: train.activation_checkpointing=some: allowed: none, full, selective\n"
    assert main(["plan", "config=tiny", "launcher.gpu_memory_gb=0"]) == 2
    assert "launcher.gpu_memory_gb=0.0: must be > 0" in capsys.readouterr().err


def test_plan_ignores_this_machines_gpus_and_node_count(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU visible here, the plan is for 8 per node
    overrides = ["config=tiny", "launcher.nproc_per_node=8", "launcher.nnodes=2", "train.global_batch_size=64"]
    assert main(["train", "--dry-run", *overrides]) == 2
    assert main(["plan", *overrides]) == 0
    assert "world 16 = 2 nodes x 8" in capsys.readouterr().out


def test_plan_needs_no_torch():
    code = (
        "import sys; from launcher.cli import main; rc = main(['plan', 'config=tiny']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "False"


def test_plan_help():
    out = subprocess.run([*CLI, "plan", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "launcher.gpu_memory_gb" in out.stdout


def test_rank_ranges():
    assert rank_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert rank_ranges([3]) == "3"
    assert (
        piece_list(("embed", "layers.0", "layers.1", "layers.3", "head", "mtp.0"))
        == "embed, layers.0-1,layers.3, head, mtp.0"
    )


def test_pipeline_plan_prints_each_pipeline_ranks_stages_and_its_sends(capsys):
    args = ["plan", "config=tiny", "launcher.nproc_per_node=4", "parallel.pp=2", "parallel.ep=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "world 4 = 1 node x 4 (pp 2 x dp_replicate 1 x dp_shard 2, ep 2;" in lines[0]
    # 1F1B: the first stage holds both of its micro-batches' activations, the last one at a time
    assert "  pp rank 0 (ranks 0-1): stage 0: embed, layers.0-2 (2 in flight)" in lines
    assert (
        "  pp rank 1 (ranks 2-3): stage 1: layers.3, head, mtp.0 (1 in flight); + the embedding for the MTP modules"
        in lines
    )
    assert any(line.startswith("0-1 ") for line in lines) and any(line.startswith("2-3 ") for line in lines)
    # 2 micro-batches of [4, 128, 128] fp32 each way: 0.52 MB
    assert "pipeline send: activations + grads, fwd + bwd  pp 2                    0.52" in out
    assert "pipeline all-reduce: MTP embedding copy grads" in out
    assert main([*args, "parallel.pp_schedule=dualpipe"]) == 0
    out = capsys.readouterr().out
    assert "DualPipe all-reduce: mirror copy grads" in out
    assert "  pp rank 1 (ranks 2-3): stage 0: embed, layers.0-2 (1 in flight); stage 1: layers.3, head, mtp.0" in out
    assert main([*args, "parallel.pp_schedule=dualpipev"]) == 2  # 2 micro-batches: dualpipev needs 3
    assert "dualpipev needs >= 2*pp-1 = 3" in capsys.readouterr().err


def test_pipeline_plan_cuts_pp_virtual_stages_per_rank_for_interleaved_1f1b(capsys):
    args = [
        "plan",
        "config=tiny",
        "launcher.nproc_per_node=2",
        "parallel.pp=2",
        "parallel.pp_schedule=interleaved_1f1b",
    ]
    assert main([*args, "parallel.pp_virtual_stages=3", "train.global_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert (
        "  pp rank 0 (rank 0): stage 0: embed (4 in flight); stage 2: layers.1 (3 in flight); stage 4: layers.3" in out
    )
    assert (
        "  pp rank 1 (rank 1): stage 1: layers.0 (4 in flight); stage 3: layers.2 (2 in flight); stage 5: head" in out
    )
    assert main([*args, "parallel.pp_virtual_stages=1"]) == 2
    assert "parallel.pp_virtual_stages=1: must be an integer >= 2" in capsys.readouterr().err
