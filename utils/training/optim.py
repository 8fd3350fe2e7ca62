"""The optimizer, and the guard that skips steps whose loss or gradients are not finite.

Why on the device: deciding on the host would need a GPU->CPU synchronisation every
step, which stalls the GPU's queue (the training loop has none). The fused
Adam kernel takes a ``found_inf`` tensor, as it does from AMP's GradScaler: when it is
1 the kernel leaves weights, moments and step count untouched. The guard sets that
tensor from the loss and the gradient norm, counts bad steps on the device, and the
trainer reads the counts only at its logging steps.
"""

from __future__ import annotations

import torch

from utils.training.config import TrainConfig


def make_optimizer(params, t: TrainConfig) -> torch.optim.Adam:
    """Adam with the fused kernel (one launch per step on GPU; needed to skip a step on the device)."""
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)


class StepGuard:
    """Skips non-finite steps and counts them: ``total`` skipped, ``worst`` run of them in a row.

    Batch-norm running statistics are updated during the forward pass, before the loss
    is known, so they are restored too: a NaN batch must not poison the eval-mode model.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        zero = torch.zeros((), device=device)
        self.total, self.streak, self.worst = zero.clone(), zero.clone(), zero.clone()
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.saved: list[torch.Tensor] = []

    def before_forward(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, accelerator,
              skip_above: float = 0.0) -> torch.Tensor:
        """1.0 when this step must be skipped (the same on every process), else 0.0; no host sync. With
        ``skip_above`` > 0 a gradient norm above it is skipped too (``train.grad_skip``: Child 2021 skips the rare
        huge updates that make deep hierarchies diverge)."""
        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
            if skip_above > 0:
                bad = bad | (grad_norm > skip_above)
        bad = bad.float()
        if accelerator.num_processes > 1:  # a local NaN must stop every process's step, or the weights diverge
            bad = (accelerator.reduce(bad, "sum") > 0).float()
        self.total += bad
        self.streak = (self.streak + 1) * bad
        self.worst = torch.maximum(self.worst, self.streak)
        for b, s in zip(self.buffers, self.saved):
            b.copy_(torch.where(bad > 0, s, b))
        return bad

    @staticmethod
    def skip_if(optimizer, bad: torch.Tensor, scaler) -> None:
        """Hand ``bad`` to the fused Adam kernel. Under fp16 the GradScaler sets it instead, from the gradients."""
        if scaler is None:
            inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
            inner.found_inf = bad


def clip_and_norm(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of ``params`` to ``max_norm`` (0: no clipping) and return their global norm for the
    guard.

    None under fp16: overflowing gradients are normal while the GradScaler calibrates its
    scale, and it skips those steps itself.
    """
    norm = accelerator.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
    if accelerator.scaler is not None:
        return None
    return norm if norm is not None else grad_norm(params)


def grad_norm(parameters) -> torch.Tensor:
    """Global L2 norm of the gradients (inf or nan when any gradient is)."""
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
