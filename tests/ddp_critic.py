"""Run under `accelerate launch --num_processes 2`: one FactorVAE critic step on each process's own codes.

Prints `processes=N same=<bool> moved=<bool> local_same=<bool>` on the main process: whether the critics of
all processes are equal after the step (their gradients averaged), whether the step changed them, and, for
contrast, whether critics stepped on local gradients alone would be equal (they are not).
"""

from __future__ import annotations

import copy
import types

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env

from models.priors import StandardNormal
from models.regularisers import FactorVAE, PosteriorSample
from utils.config import load_config
from utils.errors import leave_process_group


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


if __name__ == "__main__":
    acc = Accelerator(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    loss = load_config(None, ["loss.regulariser=factorvae", "loss.factor_critic_hidden=[16, 16]"]).loss
    torch.manual_seed(0)  # the same initial critic on every process, as set_seed gives the trainer
    joined = FactorVAE(loss, 3)
    alone = copy.deepcopy(joined)
    start = flat(joined.critic)
    z = torch.randn(32, 3, generator=torch.Generator().manual_seed(100 + acc.process_index))  # this process's codes
    for reg, accelerator in ((joined, acc), (alone, types.SimpleNamespace(num_processes=1))):
        torch.manual_seed(7 + acc.process_index)  # each process's own permutation
        reg(torch.zeros(32), PosteriorSample(z, z, z), StandardNormal(3), 0)
        reg.after_step(accelerator, torch.zeros(()))
    ranks = acc.gather(flat(joined.critic)[None])
    local = acc.gather(flat(alone.critic)[None])
    if acc.is_main_process:
        print(f"processes={acc.num_processes} same={bool((ranks == ranks[0]).all())} "
              f"moved={not torch.equal(ranks[0], start)} local_same={bool((local == local[0]).all())}")
    leave_process_group()  # as the scripts do on exit
