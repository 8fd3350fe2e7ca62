"""Run under `accelerate launch --num_processes N`: optimal σ of one fixed batch, split across processes.

Prints `sigma=<value>` on the main process. The batch is the first 64 MNIST test
images and fixed decoder outputs; each process sees only its shard, and the
likelihood must all-reduce to recover the global batch's σ.
"""

from __future__ import annotations

import sys

import torch
from accelerate import PartialState

from models.likelihoods import OptimalSigma
from utils.batching import shard
from utils.config import DataConfig
from utils.data import load_data

state = PartialState()
_, test, _ = load_data(DataConfig(name="mnist", root=sys.argv[1], download=False))
x = test.batch(torch.arange(64))
out = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
mine = shard(torch.arange(64), state.process_index, state.num_processes)
sigma = OptimalSigma()(x[mine], out[mine]).log_sigma.exp().item()
if state.is_main_process:
    print(f"processes={state.num_processes} sigma={sigma!r}")
