"""Which images each training step sees, and how they become the model's input.

Data order is a pure function of (seed, step) (``BatchOrder``), so a resumed run
sees exactly the batches an unbroken run would, with no sampler state to save,
and each step's global batch is the same for any number of processes: each
process takes a contiguous share of it (``shard``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from utils.data.splits import ImageSplit, cpu_workers
from utils.errors import UserError

if TYPE_CHECKING:
    from utils.data.config import DataConfig


def to_inputs(batch: torch.Tensor, data: DataConfig, memory_format: torch.memory_format) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1], with the configured augmentation, on the batch's device.

    ``data.binarize`` draws each pixel from a Bernoulli of its intensity, anew at every
    step (dynamically binarised MNIST); ``data.hflip`` flips a random half of the images.
    """
    x = batch.float().div_(255.0).contiguous(memory_format=memory_format)
    if data.binarize:
        x = torch.bernoulli(x)
    if data.hflip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    return x


class BatchOrder:
    """Global batch indices for any step: shuffled epochs, last partial batch dropped."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise UserError(f"train.batch_size={batch_size} is larger than the training set ({n}): lower it")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    return indices.tensor_split(world)[rank]


class _StepSampler(torch.utils.data.Sampler):
    """This process's share of each step's global batch, from ``start`` to ``steps``: for DataLoader workers."""

    def __init__(self, order: BatchOrder, start: int, steps: int, rank: int, world: int):
        self.order, self.start, self.steps, self.rank, self.world = order, start, steps, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield shard(self.order.indices(step), self.rank, self.world).tolist()

    def __len__(self) -> int:
        return self.steps - self.start


def _shelter_worker(worker_id: int) -> None:
    """Keep a worker out of the trainer's process group: a Ctrl-C or a SIGTERM sent to the group is the
    trainer's to handle (finish the step, checkpoint); a worker killed by it would crash the DataLoader
    first. Its own SIGTERM still ends it, so shutdown and Python's exit work as usual."""
    if hasattr(os, "setpgrp"):  # POSIX
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_batches(data: ImageSplit, order: BatchOrder, start: int, steps: int, rank: int, world: int,
                  device: torch.device, num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(uint8 images (B/world, C, H, W), labels (B/world,) or None) on ``device`` for steps start..steps-1, in
    the order ``order`` fixes. Labels are indexed here, in the main process, from the same order."""
    if not data.workers_needed:
        for step in range(start, steps):
            idx = shard(order.indices(step), rank, world).to(device)
            yield data.get(idx), data.labels_at(idx)
        return
    workers = cpu_workers(num_workers)
    loader = torch.utils.data.DataLoader(
        # the sampler runs ahead of the loop (prefetch): its own copy of the order, so the two do not evict each
        # other's cached permutation at every epoch boundary
        data, batch_sampler=_StepSampler(BatchOrder(order.n, order.batch_size, order.seed), start, steps, rank, world),
        num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, worker_init_fn=_shelter_worker,
        generator=torch.Generator().manual_seed(order.seed))  # its own: starting it must not draw from the global
        # RNG, or a resumed run's noise would be one draw off the unbroken run's
    for step, batch in zip(range(start, steps), loader):
        labels = None if data.labels is None else data.labels_at(shard(order.indices(step), rank, world).to(device))
        yield batch.to(device, non_blocking=True), labels
