"""Sample quality in a feature space the toolkit trains itself: a model's samples against held-out images.

The feature network (utils/evaluation/features.py, trained by ``python -m utils.inference.features``) saw only
the training split; the scores (utils/evaluation/quality.py: Fréchet distance, KID, precision, recall, density,
coverage, a classifier two-sample test) compare the features of the first n held-out images with those of n
decoded samples, or of those images' reconstructions (the set-up of latent-diffusion autoencoders' rFID). Every
number is named by the network's identity: numbers of two networks do not compare, and none of them compares with
a paper's Inception FID.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from models.vae import VAE
from utils.data.splits import ImageSplit
from utils.errors import UserError
from utils.evaluation import quality
from utils.evaluation.features import load_feature_net

Generate = Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]  # (images, labels, g)
FEATURES = Path("features")  # where python -m utils.inference.features writes by default


def default_features(data_name: str) -> Path:
    return FEATURES / f"{data_name}.safetensors"


def feature_net_for(path: str | Path | None, data_name: str, shape: tuple[int, int, int]):
    """The feature network for a model of ``data_name`` images of ``shape``; a one-line refusal when there is none,
    or it is another data set's (its space says nothing of these images)."""
    path = Path(path) if path else default_features(data_name)
    net = load_feature_net(path, shape)
    if net.data_name != data_name:
        raise UserError(f"{path} is the feature network of {net.data_name} ({net.identity}), and this model is of "
                        f"{data_name}: train one for {data_name} with python -m utils.inference.features -c CONFIG "
                        f"and pass it with --features FILE")
    return net


def sampled(vae: VAE, draw: Callable[[int, torch.Generator], torch.Tensor]) -> Generate:
    """Samples: codes from ``draw`` decoded to the decoder's means; a conditional model decodes each sample with the
    class of the held-out image it stands beside."""
    return lambda images, labels, g: vae.decode(draw(len(images), g).to(images.device), labels)


def reconstructed(vae: VAE) -> Generate:
    """Reconstructions: each held-out image's posterior mean decoded to the decoder's mean (what rFID scores)."""
    return lambda images, labels, g: vae.reconstruction(images, labels)


def image_pairs(test: ImageSplit, n: int, batch_size: int, device: torch.device | str, generate: Generate,
                g: torch.Generator, rank: int = 0, world: int = 1, progress=None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of (held-out images, generated images) in [0, 1] over the first n held-out images; with several
    processes each takes every world-th batch. What FID and the quality scores each feed their features."""
    for b, start in enumerate(range(0, n, batch_size)):
        if b % world != rank:
            continue
        idx = torch.arange(start, min(start + batch_size, n), device=device)
        images = test.batch(idx).to(device)
        yield images.clamp(0, 1), generate(images, test.labels_at(idx), g).float().clamp(0, 1)
        if progress is not None:
            progress.update(len(idx) * world)


@torch.no_grad()
def sample_quality(test: ImageSplit, net, n: int, batch_size: int, device: torch.device | str, generate: Generate,
                   seed: int = 0, kid_subsets: int = 100, kid_subset_size: int | None = None, progress=None) -> dict:
    """The scores of n generated images (``sampled`` or ``reconstructed``) against the first n held-out images."""
    n = min(n, len(test))
    kid_subset_size = quality.kid_subset_size(n, kid_subset_size)
    if kid_subset_size > n:
        raise UserError(f"--kid_subset_size {kid_subset_size} is more than the {n} images compared: lower it to "
                        f"at most {n}, or raise --quality_samples (held-out images: {len(test)})")
    real, generated = [], []
    for images, made in image_pairs(test, n, batch_size, device, generate, torch.Generator().manual_seed(seed),
                                    progress=progress):
        real.append(net.embed(images))
        generated.append(net.embed(made))
    scores = quality.quality_scores(torch.cat(real), torch.cat(generated), seed=seed, kid_subsets=kid_subsets,
                            kid_subset_size=kid_subset_size)
    return {**scores, "features": net.identity}
