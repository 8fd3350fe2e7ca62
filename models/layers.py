"""What the networks share (networks.py, and the ladder's in ladder.py): the activations, registered by their
YAML name (``model.activation``), the geometry of the stride-2 convolutions, and the decoders' ``last_layer``."""

from __future__ import annotations

import math

from torch import nn

from utils.errors import UserError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,       # Burda et al. 2016's VAE and IWAE
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}


def conv_geometry(img_size: int, n_layers: int) -> tuple[int, int]:
    """(padding to add, bottom feature-map size): 28 px is padded to 32 so every layer halves exactly."""
    if 2**n_layers > img_size:
        raise UserError(f"model.channel_mults has {n_layers} stride-2 layers, too many for {img_size} px images: "
                        f"use at most {int(math.log2(img_size))}")
    pad = (-img_size) % (2**n_layers)
    bottom = (img_size + pad) // 2**n_layers
    return pad, bottom


class LastLayer:
    """A decoder's ``last_layer``: the weight of its last linear or convolutional layer (in the order of its
    modules, the one that makes the likelihood's parameters), on which an adversarial term's weight is balanced
    against the reconstruction term's (models/discriminator.py)."""

    @property
    def last_layer(self) -> nn.Parameter:
        kinds = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
        return [m for m in self.modules() if isinstance(m, kinds)][-1].weight
