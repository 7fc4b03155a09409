"""Every bad config stops the launch with exit code 2 and one line naming the bad value."""

import subprocess
import sys

import pytest

from framework.config import load_run_config
from launcher.cli import main
from launcher.compose import compose_config
from launcher.run_dir import finalize_paths, write_resolved_config
from launcher.validation import validate
from parallel.layout import resolve_layout

SYNTH = ["data=synthetic", "train.device=cpu"]  # CPU process limits, also on a GPU node

BAD = [
    # (overrides, text the one-line message must contain)
    (["model.top_k=20"], "model.top_k=20"),
    (["model.dim=130"], "model.dim=130"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3"),
    (["model.topk_groups=3"], "model.topk_groups=3"),
    (["model.n_groups=3"], "model.n_groups=3"),
    (["model.score_func=relu"], "allowed: sigmoid, softmax"),
    (["model.dim=abc"], "model.dim"),
    (["model.bogus=1"], "model.bogus"),
    (["+foo=1"], "foo: unknown key"),
    (["model=nope"], "model/nope"),
    (["optim.lr=-1"], "optim.lr=-1"),
    (["optim.lr=inf"], "optim.lr=inf: must be a finite number"),
    (["optim.lr=nan"], "optim.lr=nan: must be a finite number"),
    (["optim.grad_clip=-inf"], "optim.grad_clip=-inf: must be a finite number"),
    (["optim.beta2=1.5"], "optim.beta2=1.5"),
    (["optim.schedule=step"], "allowed: cosine, linear, constant"),
    (["train.steps=0"], "train.steps=0"),
    (["train.steps=1.5"], "train.steps"),
    (["train.precision=fp16"], "allowed: fp32, bf16"),
    (["train.device=tpu"], "train.device=tpu: allowed: auto, cpu, cuda"),
    (["launcher.gpu_memory_gb=0"], "launcher.gpu_memory_gb=0"),
    (["train.activation_checkpointing=some"], "train.activation_checkpointing=some: allowed: none, full, selective"),
    (["train.micro_batch_size=5"], "train.micro_batch_size=5"),
    (["train.global_batch_size=15"], "train.global_batch_size=15"),
    (["launcher.nproc_per_node=1000"], "launcher.nproc_per_node=1000"),
    (["launcher.nproc_per_node=0"], "launcher.nproc_per_node=0"),
    (["launcher.nnodes=2"], "launcher.nnodes=2"),
    (["parallel.pp_schedule=bogus"], "allowed: 1f1b"),
    (["parallel.pp_overlap=maybe"], "parallel.pp_overlap: Value 'maybe' is not a valid bool"),
    (["parallel.dp_shard=3"], "parallel.dp_shard=3"),
    (["parallel.dp_replicate=x"], "parallel.dp_replicate=x"),
    (["parallel.ep=4"], "parallel.ep=4: must divide the 2 data-parallel ranks"),
    (["parallel.ep=2", "model.num_experts=7", "model.n_groups=1", "model.topk_groups=1"], "model.num_experts=7"),
    (["parallel.ep=4", "launcher.nproc_per_node=4", "parallel.ep_per_node=3"], "parallel.ep_per_node=3"),
    (
        ["parallel.ep=4", "launcher.nproc_per_node=4", "parallel.ep_per_node=1", "model.n_groups=2"],
        "model.n_groups=2: must be a multiple of the 4 nodes",
    ),
    (
        [
            "parallel.ep=2",
            "launcher.nproc_per_node=6",
            "parallel.dp_shard=3",
            "train.global_batch_size=6",
            "train.micro_batch_size=1",
        ],
        "parallel.ep=2: must divide parallel.dp_shard=3 or be a multiple",
    ),
    (
        ["parallel.pp=3", "parallel.pp_schedule=dualpipe", "launcher.nproc_per_node=3", "train.global_batch_size=12"],
        "dualpipe needs an even pp >= 2",
    ),
    (
        ["parallel.pp=2", "parallel.pp_schedule=dualpipe", "train.global_batch_size=12"],
        "parallel.pp_schedule=dualpipe with 3 micro-batches",
    ),
    (["parallel.pp=4", "parallel.pp_schedule=dualpipe", "launcher.nproc_per_node=4"], "even number >= 2*pp-2 = 6"),
    (
        ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "train.micro_batch_size=8", "model.mtp_depth=0"],
        "dualpipev needs >= 2*pp-1 = 3",
    ),
    (["launcher.stop_timeout_s=0"], "launcher.stop_timeout_s=0"),
    (  # 8 stages (2 per rank) from 4 blocks, the embedding and the head: the cut, not the micro-batches
        ["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b", "launcher.nproc_per_node=4"],
        "parallel.pp_schedule=interleaved_1f1b with parallel.pp=4 x pp_virtual_stages=2 and model.n_layers=4: "
        "8 stages: the model has only 6 pieces to cut",
    ),
    (["parallel.pp_virtual_stages=1"], "parallel.pp_virtual_stages=1: must be an integer >= 2"),
    (["parallel.pp_virtual_stages=x"], "parallel.pp_virtual_stages"),
    (  # 8 stages again, now from pp=2 x 4 stages per rank
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=4"],
        "with parallel.pp=2 x pp_virtual_stages=4 and model.n_layers=4: 8 stages: the model has only 6 pieces",
    ),
    (["checkpoint.write_threads=0"], "checkpoint.write_threads=0"),
    (["logging.wandb.mode=cloud"], "allowed: disabled, offline, online"),
    (["optim.lr=1e-3,3e-4"], "optim.lr=1e-3,3e-4: a sweep (several values); add -m"),
    (["data=stdlib", "data.path=/nonexistent/tokens"], "data.path=/nonexistent/tokens"),
    (["data.synthetic_tokens=10"], "data.synthetic_tokens=10"),
    (["config=nope"], "config=nope: unknown experiment"),
    (["config=/no/such/file.yaml"], "no such file"),
    (["notanoverride"], "notanoverride"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_exits_2_with_one_line(overrides, expected, capsys, tmp_path):
    code = main(["train", *SYNTH, f"run_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moe-launch: error: ")
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_valid_overrides_pass_validation(capsys, tmp_path):
    code = main(["train", *SYNTH, "--dry-run", "model.num_experts=16", "model.n_groups=4", "+extra.note=hi"])
    assert code == 0
    assert "num_experts: 16" in capsys.readouterr().out


def test_dp_replicate_as_a_string_reads_the_same_in_validation_and_on_the_ranks(tmp_path):
    """`parallel.dp_replicate="2"` stays a string in the resolved config; the launcher's check
    and the ranks' resolve_layout (framework/train.py) must read it the same way."""
    cfg = compose_config(
        "tiny", [*SYNTH, f"run_dir={tmp_path}", 'parallel.dp_replicate="2"', "launcher.nproc_per_node=4"]
    )
    finalize_paths(cfg)
    checked = validate(cfg)
    assert (checked.dp_replicate, checked.dp_shard) == (2, 2)
    p = load_run_config(write_resolved_config(cfg)).parallel  # what every rank reads
    assert p.dp_replicate == "2"
    assert resolve_layout(4, p.pp, p.dp_replicate, p.dp_shard, p.ep) == checked


@pytest.mark.slow
def test_ranks_start_with_a_string_dp_replicate(tmp_path):
    """End to end: validation passed this before, and then every rank refused it."""
    command = [sys.executable, "-m", "launcher.cli", "train", *SYNTH, f"run_dir={tmp_path}"]
    command += ['parallel.dp_replicate="2"', "train.steps=1", "train.eval_batches=1", "model.seq_len=16"]
    command += ["data.synthetic_tokens=4000", "train.global_batch_size=2", "train.micro_batch_size=1"]
    command += ["logging.wandb.mode=disabled"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(pp 1 x dp_replicate 2 x dp_shard 1, ep 1)" in out.stdout


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.pp_schedule=dualpipev"],
        ["parallel.pp_schedule=1f1b"],
        ["parallel.pp_schedule=interleaved_1f1b"],
        ["parallel.pp_schedule=dualpipe"],
    ],
    ids=["dualpipev", "1f1b", "interleaved_1f1b", "dualpipe"],
)
def test_runnable_pipelines_pass_validation(overrides, capsys):
    code = main(["train", *SYNTH, "--dry-run", "parallel.pp=2", *overrides])
    assert code == 0, capsys.readouterr().err


def test_device_switch_decides_what_the_process_count_is_checked_against(monkeypatch, capsys):
    """On a GPU node the process count is checked against the GPUs, unless train.device=cpu
    asks for gloo ranks on the CPU; train.device=cuda needs a GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # this node shows one GPU
    assert main(["train", "data=synthetic", "launcher.nproc_per_node=2", "train.device=auto", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "moe-launch: error: launcher.nproc_per_node=2: allowed: 1..1 (1 GPUs on this node); "
        "train.device=cpu runs CPU processes"
    )
    assert main(["train", "data=synthetic", "launcher.nproc_per_node=2", "train.device=cpu", "--dry-run"]) == 0
    assert main(["train", "data=synthetic", "launcher.nproc_per_node=1", "train.device=cuda", "--dry-run"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU
    assert main(["train", "data=synthetic", "launcher.nproc_per_node=1", "train.device=cuda", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("moe-launch: error: train.device=cuda: no GPU is visible on this node")
