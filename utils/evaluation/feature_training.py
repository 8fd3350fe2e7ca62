"""Training a feature network (utils/evaluation/features.py) on a data set's training split alone.

Two ways, chosen by the data: a split with class labels trains a classifier (cross-entropy); a split without
trains a SimCLR encoder (Chen et al. 2020): two augmented views of each image, the NT-Xent loss pulls the views
of one image together and pushes those of the other images apart. Every random draw (initial weights, batch
order, augmentation) comes from the seed, and training runs with deterministic algorithms on a fixed thread
count, so one seed gives the same weights, bit for bit, on a CPU.

The augmentations are tensor operations drawn from one ``torch.Generator`` (not torchvision's transforms, whose
randomness comes from the global generator): a random resized crop and a horizontal flip as one affine
resampling, then colour jitter (brightness, contrast, saturation) and random greyscale.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.data.batching import BatchOrder
from utils.data.splits import ImageSplit

TEMPERATURE = 0.5      # NT-Xent temperature: SimCLR's value for small batches (its CIFAR-10 runs)
CROP_SCALE = (0.25, 1.0)   # area fraction of the random crop; SimCLR's 0.08 loses too much of a 28-64 px image
JITTER = 0.4           # colour-jitter strength of brightness, contrast and saturation (SimCLR's 0.8 x 0.5)


@dataclass
class Trained:
    """What a training left: the weights' module and the numbers to report and keep."""

    net: torch.nn.Module
    losses: list[float]
    report: dict[str, float]


def labelled(split: ImageSplit) -> bool:
    """Whether a split can train a classifier: it has labels, every image is in a class, and there are two
    classes at least (an image folder with one sub-folder has labels, all 0, that teach nothing)."""
    y = split.labels
    return y is not None and len(y) > 0 and int(y.min()) >= 0 and int(y.unique().numel()) >= 2


def fingerprint(split: ImageSplit) -> tuple[str, str]:
    """(sha256, what it covers) of the images a training saw. In-memory sets: their uint8 pixels (60,000 MNIST
    images are 47 MB, hashed in a fraction of a second); file-backed sets: the file names and sizes (decoding
    a large folder only to hash it would cost more than the training)."""
    h = hashlib.sha256()
    images = getattr(split, "images", None)
    paths = getattr(split, "paths", None)
    if isinstance(images, torch.Tensor):
        h.update(repr(tuple(images.shape)).encode())
        h.update(images.contiguous().cpu().numpy().tobytes())
        return h.hexdigest(), "pixels"
    if paths is not None:
        for p in paths:
            h.update(f"{p.name}\t{p.stat().st_size}\n".encode())
        return h.hexdigest(), "file names and sizes"
    for start in range(0, len(split), 1024):
        h.update(split.get(torch.arange(start, min(start + 1024, len(split)))).numpy().tobytes())
    return h.hexdigest(), "pixels"


@contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Deterministic algorithms, one thread and the seed for the weights' initialisation, restored after."""
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(threads)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One SimCLR view of images ``x`` in [0, 1], (N, C, H, W): random resized crop (area ``CROP_SCALE``,
    aspect 3/4-4/3) with a horizontal flip at p = 0.5, as one bilinear affine resampling; colour jitter at
    p = 0.8; greyscale at p = 0.2 (the last two change nothing in a greyscale image but its brightness and
    contrast)."""
    n = x.shape[0]
    u = torch.rand(n, 8, generator=g)
    area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 0]
    aspect = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
    sw = torch.sqrt(area * aspect).clamp(max=1.0)   # crop width and height as fractions of the image
    sh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - sw) * (2 * u[:, 2] - 1)               # centre, within the image (normalised -1..1 coordinates)
    cy = (1 - sh) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw * flip, cx, sh, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    f = 1 + JITTER * (2 * torch.rand(n, 3, generator=g) - 1)        # brightness, contrast, saturation factors
    jitter = (torch.rand(n, generator=g) < 0.8).view(n, 1, 1, 1)
    grey = lambda t: t.mean(1, keepdim=True) if t.shape[1] == 1 else (  # noqa: E731
        0.299 * t[:, :1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3])
    j = (v * f[:, 0].view(n, 1, 1, 1)).clamp(0, 1)
    m = grey(j).mean((1, 2, 3), keepdim=True)
    j = ((j - m) * f[:, 1].view(n, 1, 1, 1) + m).clamp(0, 1)
    gj = grey(j)
    j = ((j - gj) * f[:, 2].view(n, 1, 1, 1) + gj).clamp(0, 1)
    v = torch.where(jitter, j, v)
    to_grey = (torch.rand(n, generator=g) < 0.2).view(n, 1, 1, 1)
    return torch.where(to_grey, grey(v).expand_as(v), v)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1) averaged over the 2N views: for each view, cross-entropy of picking its
    partner among the other 2N - 1 views by cosine similarity / temperature."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def _train(net: torch.nn.Module, split: ImageSplit, steps: int, batch_size: int, seed: int, lr: float, log,
           loss_of, name: str) -> list[float]:
    """The loop both kinds share: Adam on ``loss_of(step indices)`` over the seeded data order; the losses."""
    order = BatchOrder(len(split), batch_size, seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    net.train()
    for step in range(steps):
        loss = loss_of(order.indices(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}  {name} {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    net.eval()
    return losses


def train_classifier(net: torch.nn.Module, split: ImageSplit, steps: int, batch_size: int, seed: int,
                     lr: float = 1e-3, log=print) -> Trained:
    """Cross-entropy on the training split's labels; ``net(x)`` returns (embedding, logits)."""
    losses = _train(net, split, steps, batch_size, seed, lr, log,
                    lambda idx: F.cross_entropy(net(split.batch(idx))[1], split.labels_at(idx)), "loss")
    return Trained(net, losses, {"final_loss": sum(losses[-50:]) / len(losses[-50:])})


def train_simclr(net: torch.nn.Module, split: ImageSplit, steps: int, batch_size: int, seed: int,
                 lr: float = 1e-3, log=print) -> Trained:
    """SimCLR: two views of each image of a batch, NT-Xent on the projection head's output."""
    g = torch.Generator().manual_seed(seed * 7_919 + 1)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = split.batch(idx)
        _, p1 = net(augment(x, g))
        _, p2 = net(augment(x, g))
        return nt_xent(p1, p2)

    losses = _train(net, split, steps, batch_size, seed, lr, log, loss_of, "NT-Xent")
    report = {"final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "initial_loss": sum(losses[:10]) / len(losses[:10])}
    report.update(pair_agreement(net, split, seed))
    return Trained(net, losses, report)


@torch.no_grad()
def pair_agreement(net: torch.nn.Module, split: ImageSplit, seed: int, n: int = 256) -> dict[str, float]:
    """How well the embedding (not the projection head) ties two views of one training image together, on
    ``n`` images and fresh views: the mean cosine of positive pairs and of negative pairs, and the pair
    accuracy, the fraction of views whose nearest other view is their partner (chance: 1 / (2n - 1)). An
    encoder that learned nothing scores pair accuracy near chance and equal cosines."""
    g = torch.Generator().manual_seed(seed * 7_919 + 2)
    n = min(n, len(split))
    x = split.batch(torch.randperm(len(split), generator=g)[:n])
    e = F.normalize(torch.cat([net(augment(x, g))[0], net(augment(x, g))[0]]), dim=1)
    sim = e @ e.T
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    pos = sim[torch.arange(2 * n), partner]
    off = ~torch.eye(2 * n, dtype=torch.bool)
    off[torch.arange(2 * n), partner] = False
    nearest = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf")).argmax(1)
    return {"positive_cosine": pos.mean().item(), "negative_cosine": sim[off].mean().item(),
            "pair_accuracy": (nearest == partner).float().mean().item(), "pair_chance": 1 / (2 * n - 1)}


@torch.no_grad()
def accuracy(net: torch.nn.Module, split: ImageSplit, batch_size: int = 500) -> float:
    """Top-1 accuracy of the classifier head on ``split`` (the held-out split, read after training only)."""
    right = 0
    for start in range(0, len(split), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(split)))
        right += (net(split.batch(idx))[1].argmax(1) == split.labels_at(idx)).sum().item()
    return right / len(split)
