"""LPIPS (Zhang, Isola, Efros, Shechtman & Wang 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR) as a reconstruction term, ``loss.lpips`` (see models/perceptual.py).

The distance is torchmetrics' LPIPS: each of five ReLU stages of a VGG16 or AlexNet, unit-normalised over
channels, the squared difference weighted by the linear heads that ship with torchmetrics (no download),
averaged over space and summed over stages. The backbone's ImageNet weights are *not* downloaded: the user
passes torchvision's file with ``loss.lpips_weights``, read with ``weights_only=True`` as evaluate.py reads
``--fid_weights``; without it the term is refused in one line.

The network is fixed: it is kept outside the VAE's module tree, so it is not trained, not written into
model.safetensors or checkpoints (a run does not carry the user's VGG weights), not broadcast by DDP, and it
follows the images to their device on first use. Grey images are repeated to three channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from utils.errors import UserError, torch_weights

if TYPE_CHECKING:
    from models.config import LossConfig

# loss.lpips_net -> (torchvision's network, its ImageNet weights file)
NETS = {"vgg": ("vgg16", "vgg16-397923af.pth"), "alex": ("alexnet", "alexnet-owt-7be5be79.pth")}


def verified_weights(path: str, key: str, expected: str) -> dict[str, torch.Tensor]:
    """A torch weights file's tensors (``utils.errors.torch_weights``), or a one-line error naming the config ``key``
    and the ``expected`` file."""
    _, state = torch_weights(path, key, expected)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key} {path} is not a state dict of tensors: pass {expected}")
    return state


def backbone_state(net: nn.Module, state: dict[str, torch.Tensor], path: str, net_name: str) -> dict:
    """torchvision's ``features.<i>.*`` tensors renamed to torchmetrics' ``net.slice<s>.<i>.*``, checked to be
    exactly the backbone's (the classifier's tensors, if present, are ignored)."""
    tv_name, expected = NETS[net_name]
    where = {name: f"net.{s}.{name}." for s, block in net.net.named_children() for name, _ in block.named_children()}
    mapped = {}
    for k, v in state.items():
        parts = k.split(".", 2)
        if parts[0] == "features" and len(parts) == 3 and parts[1] in where:
            mapped[where[parts[1]] + parts[2]] = v
    own = {k: tuple(v.shape) for k, v in net.state_dict().items() if k.startswith("net.")}
    if {k: tuple(v.shape) for k, v in mapped.items()} != own:
        raise UserError(f"loss.lpips_weights {path} is not torchvision's {tv_name} ({len(mapped)} of its "
                        f"{len(own)} feature tensors match): pass {expected}, or set loss.lpips_net to its network")
    return mapped


class LPIPS(nn.Module):
    """LPIPS per image (B,) with the user's backbone weights (``loss.lpips_net``, ``loss.lpips_weights``)."""

    log_name = "lpips"

    def __init__(self, img_shape: tuple[int, int, int], loss: LossConfig):
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        tv_name, expected = NETS[loss.lpips_net]
        if not loss.lpips_weights:
            raise UserError(f"loss.lpips needs the {tv_name} weights, which are not downloaded: download "
                            f"{expected} once (torchvision's release) and pass loss.lpips_weights=PATH")
        if img_shape[0] not in (1, 3):
            raise UserError(f"loss.lpips compares RGB (or grey) images, and these have {img_shape[0]} channels: "
                            f"set loss.lpips=0")
        state = verified_weights(loss.lpips_weights, "loss.lpips_weights", expected)
        net = _NoTrainLpips(pretrained=True, net=loss.lpips_net, pnet_rand=True)  # heads: torchmetrics' own file
        net.load_state_dict(backbone_state(net, state, loss.lpips_weights, loss.lpips_net), strict=False)
        try:
            with torch.no_grad():
                net(torch.zeros(1, 3, *img_shape[1:]), torch.zeros(1, 3, *img_shape[1:]))
        except RuntimeError:
            raise UserError(f"loss.lpips_net={loss.lpips_net} cannot take {img_shape[1]}x{img_shape[2]} images "
                            f"(its pooling leaves nothing): use loss.lpips_net=vgg or loss.lpips=0") from None
        self.held = [net]  # a list, so the fixed network stays outside the module tree (see the module's note)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        net = self.held[0]
        if next(net.parameters()).device != x.device:
            net.to(x.device)
        if x.shape[1] == 1:
            x, x_hat = x.expand(-1, 3, -1, -1), x_hat.expand(-1, 3, -1, -1)
        return net(x_hat, x, normalize=True).view(-1)
