"""`moe-launch export`: a sharded EP checkpoint becomes one file a plain process can load."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from launcher.cli import main
from tests.parallel.harness import PARITY_MODEL, train_segment

pytestmark = pytest.mark.slow

LOAD_ON_ONE_PROCESS = """
import sys, torch
from omegaconf import OmegaConf
from framework.model.args import ModelArgs
from framework.loss import TrainingLoss
from framework.model.transformer import MoETransformer
cfg = OmegaConf.from_dotlist([o for o in sys.argv[2:] if o.startswith("model.")])
model = MoETransformer(ModelArgs.from_config(cfg.model))
weights = torch.load(sys.argv[1], weights_only=True)
model.load_state_dict(weights, strict=True)
batch = torch.randint(0, model.args.vocab_size, (2, model.args.seq_len + 1))
print("loss", float(TrainingLoss(0.0)(model(batch[:, :-1])[:1], batch[:, 1:])))
"""


def test_export_ep_checkpoint_to_safetensors_and_torch(tmp_path, capsys):
    train_segment(tmp_path, 2, ["parallel.ep=2", "train.steps=2"], 2)
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    assert main(["export", str(tmp_path), "--out", str(st)]) == 0
    assert main(["export", str(tmp_path), "--step", "2", "--out", str(pt)]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = load_file(str(st)), torch.load(pt, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["layers.1.ffn.experts.w1"].shape[0] == 8  # all experts, not one EP rank's half

    out = subprocess.run(
        [sys.executable, "-c", LOAD_ON_ONE_PROCESS, str(pt), *PARITY_MODEL], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 10


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "w.bin")]) == 2
    assert "allowed suffixes: .safetensors, .pt" in capsys.readouterr().err
