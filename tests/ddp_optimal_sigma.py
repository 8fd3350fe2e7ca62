"""Run under `accelerate launch --num_processes N`: optimal σ of one fixed batch, split across processes.

Prints `processes=N sigma=<value>` on the main process. The batch is the first 64
MNIST test images and fixed decoder outputs; each process sees only its shard, and
the likelihood must all-reduce to recover the global batch's σ. The tests call
``optimal_sigma(root, 0, 1)`` in their own process for the one-process answer.
"""

from __future__ import annotations

import sys

import torch

from models.likelihoods import OptimalSigma
from utils.config import DataConfig
from utils.data.batching import shard
from utils.data.registry import load_data


def optimal_sigma(root: str, rank: int, world: int) -> float:
    """σ that process ``rank`` of ``world`` computes for its shard (all-reduced when the processes are joined)."""
    _, test, _ = load_data(DataConfig(name="mnist", root=root, download=False))
    x = test.batch(torch.arange(64))
    out = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    mine = shard(torch.arange(64), rank, world)
    return OptimalSigma()(x[mine], out[mine]).log_sigma.exp().item()


if __name__ == "__main__":
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from utils.errors import leave_process_group

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as train_vae.py: CPU processes join too
    sigma = optimal_sigma(sys.argv[1], state.process_index, state.num_processes)
    if state.is_main_process:
        print(f"processes={state.num_processes} sigma={sigma!r}")
    leave_process_group()  # as the scripts do on exit
