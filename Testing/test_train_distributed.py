"""Training with torchrun (DistributedDataParallel, gloo on this CPU): the loss curve of one process, rank 0's
files, resumption with another number of processes; and the split of each global batch between ranks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import SYNOMALY_CLI, synomaly_env
from synomaly.modelio import load_model, read_card
from synomaly.train import Distributed, distributed_from_environment, load_checkpoint

# Why this tolerance: every rank draws the whole global batch from the same RNG streams and computes its
# share, so the inputs, noise and timesteps are exactly those of one process; what differs is only the order
# of floating-point sums (the batch's gradient as two halves added by the all-reduce, the loss as two partial
# sums). fp32 rounding is 6e-8 relative; measured here over 8 steps: at most 1.2e-7 relative (2 ulp).
# 1e-5 relative leaves a factor of 100; another batch changes the loss by 1e-2 to 1e-1 (consecutive steps here).
LOSS_RTOL = 1e-5


def _train(tmp_path, name: str, processes: int, iterations: int, *extra: str) -> subprocess.CompletedProcess:
    from synomaly.sampledata import br35h_images

    data = [str(p) for p in br35h_images("no", 0, 12)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "synomaly.cli"] if processes > 1 else SYNOMALY_CLI
    cmd = [*launcher, "train", "--data", *data, "-o", str(tmp_path / f"{name}.safetensors"),
           "--iterations", str(iterations), "--batch-size", "4", "--grid", "32", "--channels", "32", "32",
           "--lr", "1e-3", "--checkpoint-every", "4", "--device", "cpu", "--precision", "fp32",
           "--no-calibrate", "--val-fraction", "0", "--progress", "none", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=synomaly_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(path) -> np.ndarray:
    return np.array([v for _, v in load_checkpoint(path)["history"]])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Eight steps of one process with a global batch of 4."""
    tmp = tmp_path_factory.mktemp("one")
    _train(tmp, "one", 1, 8)
    return tmp


def test_two_processes_give_the_loss_curve_of_one(one_process, tmp_path):
    r = _train(tmp_path, "two", 2, 8)
    assert "world size 2" in r.stderr
    one, two = _losses(one_process / "one.ckpt"), _losses(tmp_path / "two.ckpt")
    assert one.shape == two.shape == (8,)
    np.testing.assert_allclose(two, one, rtol=LOSS_RTOL, atol=0)
    model = load_model(tmp_path / "two.safetensors", device="cpu")  # rank 0 wrote a model file that loads
    assert read_card(tmp_path / "two.safetensors").training["processes"] == 2
    ref = load_model(one_process / "one.safetensors", device="cpu").network.state_dict()
    assert all(torch.allclose(v, ref[k], rtol=1e-4, atol=1e-6) for k, v in model.network.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.ckpt", "two.safetensors"], "only rank 0 writes"


def test_a_run_of_one_process_resumes_on_two(one_process, tmp_path):
    _train(tmp_path, "part", 1, 4)
    assert load_checkpoint(tmp_path / "part.ckpt")["world_size"] == 1
    _train(tmp_path, "part", 2, 8, "--resume", str(tmp_path / "part.ckpt"))
    state = load_checkpoint(tmp_path / "part.ckpt")
    assert state["iteration"] == 8 and state["world_size"] == 2
    np.testing.assert_allclose(_losses(tmp_path / "part.ckpt"), _losses(one_process / "one.ckpt"),
                               rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("batch", [4, 5, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_rank_takes_a_balanced_share_of_the_global_batch(batch, world):
    shares = [Distributed(rank, world).share(batch) for rank in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:])), "contiguous, no slice twice"
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1


def test_the_torchrun_environment_is_read():
    assert distributed_from_environment({}) == Distributed(0, 1, 0)
    assert distributed_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Distributed(3, 4, 1)
