"""Run under `accelerate launch --num_processes 2`: one training step of a deterministic autoencoder with an
image discriminator, through DDP, each process on its own half of a batch.

Prints `processes=N same=<bool> moved=<bool> weight_same=<bool> weight_global=<bool>` on the main process:
whether the discriminators of all processes are equal after their step, whether the step changed them, whether
the adaptive weight λ is the same on every process, and whether it equals the λ one process computes on the
whole batch (an autoencoder with per-image networks: the halves' mean gradients average to the batch's).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env

from models.vae import VAE
from utils.config import load_config
from utils.errors import leave_process_group

KEYS = ["model.net=mlp", "model.hidden=[32]", "model.z_dim=4", "model.likelihood=gaussian", "loss.objective=ae",
        "loss.regulariser=none", "loss.disc_weight=0.5", "loss.disc_layers=1", "loss.disc_channels=8"]


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


if __name__ == "__main__":
    acc = Accelerator(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cfg = load_config(None, KEYS)
    torch.manual_seed(0)  # the same initial weights on every process, as set_seed gives the trainer
    vae = VAE(cfg.model, cfg.loss, (1, 16, 16))
    whole = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    alone = VAE(cfg.model, cfg.loss, (1, 16, 16))
    alone.load_state_dict(vae.state_dict())
    global_weight = alone(whole, 10)["d_weight"]  # one process, the whole batch
    start = flat(vae.discriminator.net)
    model = acc.prepare(vae)
    mine = whole[4 * acc.process_index: 4 * acc.process_index + 4]
    terms = model(mine, 10)
    acc.backward(terms["loss"])
    vae.after_step(acc, torch.zeros(()))
    ranks = acc.gather(flat(vae.discriminator.net)[None])
    weights = acc.gather(terms["d_weight"][None])
    if acc.is_main_process:
        print(f"processes={acc.num_processes} same={bool((ranks == ranks[0]).all())} "
              f"moved={not torch.equal(ranks[0], start)} weight_same={bool((weights == weights[0]).all())} "
              f"weight_global={bool(torch.allclose(weights[0], global_weight, rtol=1e-5))}")
    leave_process_group()  # as the scripts do on exit
