"""A network trained by its own optimizer after each step of the VAE's, on that step's outputs, detached: the
machinery that FactorVAE's critic, the AAE's discriminator on codes (adversarial.py) and the image
discriminator (discriminator.py) share.

The network stays out of the VAE's optimizer (its owner lists it in ``auxiliary_parameters``) and is trained
by its own Adam (β = (0.5, 0.9), as the GAN literature since Gulrajani et al. 2017); the step is skipped on
the device when the VAE's was, or when the network's loss is not finite, without a host sync; its gradients
are averaged over processes, so every process keeps the same network; and the optimizer's moments are plain
tensors for a checkpoint (``state_tensors``), so a resume is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class CriticTrainer:
    """The optimizer and training step of one network. A plain object, not a module: the network belongs to its
    owner (its weights stay under the owner's names in the model's state)."""

    def __init__(self, network: nn.Module, lr: float):
        self.network = network
        self.optimizer = torch.optim.Adam(network.parameters(), lr=lr, betas=(0.5, 0.9), fused=True)

    def step(self, accelerator, bad: torch.Tensor,
             loss_fn: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """One step on the loss ``loss_fn()`` returns, computed in fp32, with the terms it returns to log."""
        self.optimizer.zero_grad(set_to_none=True)  # drops what the VAE's backward left on the network
        device = next(self.network.parameters()).device
        with torch.autocast(device_type=device.type, enabled=False):
            loss, logs = loss_fn()
        loss.backward()
        if accelerator.num_processes > 1:
            for p in self.network.parameters():
                p.grad = accelerator.reduce(p.grad, "mean")
        # skipped on the device, as the VAE's step: when the VAE's step was, or the network's loss is not finite
        self.optimizer.found_inf = ((bad > 0) | ~torch.isfinite(loss)).float()
        self.optimizer.step()
        return logs

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's moments, ``"<param index>.<name>"``."""
        return {f"{i}.{k}": v for i, st in self.optimizer.state_dict()["state"].items() for k, v in st.items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        own = self.optimizer.state_dict()
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in state.items():
            i, k = key.split(".", 1)
            moments.setdefault(int(i), {})[k] = v
        self.optimizer.load_state_dict({"state": moments, "param_groups": own["param_groups"]})
