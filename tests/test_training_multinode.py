"""The multi-node path on one machine: two `accelerate launch` commands as two machines of one process each
(gloo, rendezvous on 127.0.0.1), trained, checkpointed and resumed, end on the weights of one machine with two
processes trained without a break."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU, DATA, REPO, THREADS, accel_2, free_port

pytestmark = pytest.mark.slow  # two launches of two processes each

TRAIN = [str(REPO / "train_vae.py")]
SETTINGS = ["model.hidden=32", "train.batch_size=32", "train.log_every=1", "train.eval_every=0",
            "train.sample_every=0", "train.keep_checkpoints=0", f"data.root={DATA}"]


def two_machines(args: list[str]) -> list[subprocess.CompletedProcess]:
    """The same command as machine 0 and machine 1 of two, one process each, started together."""
    port = free_port()
    env = {**os.environ, **CPU, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS)}
    procs = []
    for rank in (0, 1):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                  "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                  "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
        procs.append(subprocess.Popen(launch + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_machines_resume_to_the_weights_of_one_machine_with_two_processes(tmp_path, real_data):
    one = tmp_path / "one-machine"
    p = subprocess.run([*accel_2(), *TRAIN, "-c", str(REPO / "configs/mnist.yaml"), "-e", str(one), *SETTINGS,
                        "train.steps=4", "train.save_every=4"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **CPU, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS)},
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]

    two = tmp_path / "two-machines"
    first = two_machines([*TRAIN, "-c", str(REPO / "configs/mnist.yaml"), "-e", str(two), *SETTINGS,
                          "train.steps=2", "train.save_every=2"])
    assert all(r.returncode == 0 for r in first), first[0].stderr[-2000:] + first[1].stderr[-2000:]
    assert "processes=2" in first[0].stdout
    assert sorted(p.name for p in (two / "checkpoints" / "step_0000002").glob("rng_*")) == [
        "rng_0.safetensors", "rng_1.safetensors"]  # each machine's process saved its random state
    resumed = two_machines([*TRAIN, "-r", "latest", "-e", str(two), "train.steps=4"])
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr[-2000:] + resumed[1].stderr[-2000:]
    assert "at step 2" in resumed[0].stdout

    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
