"""Held-out numbers for a trained VAE: ELBO, importance-weighted NLL, active units, reconstruction error.

All are in nats per image (bits per dimension beside them), over the whole
held-out split unless limited, and reduced over processes under ``accelerate
launch``: each process takes its share of every global batch.

Continuous likelihoods on 8-bit data are evaluated on uniformly dequantised
images y = (255·x + u) / 256, u ~ U(0, 1): then −log p(y) + D·log 256 is an upper
bound on the NLL of the 8-bit image (Theis et al. 2016), the convention of the
literature, and the bits per dimension compare with published figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from accelerate import Accelerator

from models.likelihoods import softclip_log_sigma
from models.objectives import importance_parts, layer_kls
from models.perceptual import ms_ssim, ms_ssim_scales
from models.vae import VAE
from utils.data.batching import shard
from utils.data.splits import ImageSplit
from utils.evaluation.latents import encode_with_kl

LOG_256 = math.log(256.0)


def _held_out(data: ImageSplit, n: int, batch_size: int, accelerator: Accelerator,
              binarize_seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, images in [0, 1]) of this process's share of each global batch over the first n held-out images
    (n made a multiple of the process count).

    With ``binarize_seed`` the images are stochastically binarised as one fixed draw: each
    global batch is drawn in order on the CPU from one generator seeded so, and each process
    keeps its share. The binarised set is then the same on a CPU or a GPU and for any number
    of processes or batch size: ``torch.bernoulli`` of the whole set at once with that seed.
    """
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    n -= n % world
    g = None if binarize_seed is None else torch.Generator().manual_seed(binarize_seed)
    for start in range(0, n, batch_size):
        every = torch.arange(start, min(start + batch_size, n))
        mine = shard(every, rank, world).to(device)
        if g is None:
            yield mine, data.batch(mine)
        else:
            drawn = torch.bernoulli(data.batch(every.to(device)).cpu(), generator=g)
            yield mine, drawn[shard(torch.arange(len(every)), rank, world)].to(device)


def _dequantise(x: torch.Tensor, continuous: bool, g: torch.Generator | None) -> torch.Tensor:
    """Continuous likelihoods see 8-bit images with uniform noise in each intensity bin (x·255 + u) / 256."""
    if continuous and g is not None:
        return (x * 255.0 + torch.rand(x.shape, generator=g, device=x.device)) / 256.0
    return x


@torch.no_grad()
def elbo_terms(model: torch.nn.Module, data: ImageSplit, batch_size: int, accelerator: Accelerator,
               limit: int = 0, seed: int = 0, binarize: bool = False) -> dict[str, float]:
    """The model's loss terms on held-out data, and ELBO in nats per image and bits per dimension.

    Used by the trainer every ``eval_every`` steps; its ``elbo`` is the bound evaluate.py reports (``--metrics
    elbo``), with the same draws: with evaluate.py's ``--seed``, ``--batch_size`` and ``--n_test`` equal to
    ``seed``, ``batch_size`` and ``limit`` the two agree to float rounding. So it takes what evaluate.py takes:
    an optimal-σ model is evaluated with one σ for the whole held-out set (``fix_optimal_sigma``), not each
    batch's own, which fits every batch and makes the bound look better than it is; continuous
    likelihoods see the dequantised images, and ``elbo``, ``nll`` and ``bpd`` are moved to the 8-bit scale
    (``rec``, ``kl`` and ``loss`` are the training terms on those images); ``binarize`` (a run on
    ``data.binarize``) binarises the test images with the same fixed draw as ``evaluate.py --binarize``. Each
    global batch is split across processes as in training. Noise comes from a forked RNG: evaluating never
    changes the training run's random stream.
    """
    rank = accelerator.process_index
    n = len(data) if limit <= 0 else min(limit, len(data))
    was_training = model.training
    model.eval()
    vae = accelerator.unwrap_model(model)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    continuous = vae.likelihood.continuous and not binarize
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    had_sigma = getattr(vae.likelihood, "fixed_log_sigma", None)
    try:
        fix_optimal_sigma(vae, data, batch_size, accelerator, limit)  # (other likelihoods: nothing to fix)
        with torch.random.fork_rng(devices=devices):  # the draws of likelihood_bounds (k = 1), in the same order
            torch.manual_seed(seed + 7919 * rank)
            g = torch.Generator(device=accelerator.device).manual_seed(seed + rank)
            for idx, x in _held_out(data, n, batch_size, accelerator, seed if binarize else None):
                terms = model(_dequantise(x, continuous, g), None, data.labels_at(idx))
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
                count += len(idx)
    finally:
        if vae.likelihood.sigma_from_batch:  # training goes on with each batch's own σ
            vae.likelihood.fixed_log_sigma = had_sigma
        model.train(was_training)
    keys = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[k] for k in keys] + [torch.tensor(float(count),
                                                                                    device=accelerator.device)]))
    out = dict(zip(keys, (totals[:-1] / totals[-1]).tolist()))
    d = math.prod(data.shape)
    if continuous:  # a density on [0, 1]: onto the 8-bit scale, an upper bound on the 8-bit image's NLL
        out["nll"] += d * LOG_256
        if "elbo" in out:
            out["elbo"] -= d * LOG_256
    if "elbo" in out:  # (an autoencoder has no bound: its nll is −log p(x|z) at the code)
        out["bpd"] = -out["elbo"] / (d * math.log(2))
    return out


@torch.no_grad()
def fix_optimal_sigma(vae: VAE, data: ImageSplit, batch_size: int, accelerator: Accelerator,
                      limit: int = 0) -> float | None:
    """For optimal-σ models: set one σ for the whole evaluation, the RMSE of the posterior-mean reconstructions.

    In training σ is the batch's; an importance-weighted bound needs one fixed
    likelihood per image, so evaluation uses the held-out set's own optimum.
    Returns σ, or None for other likelihoods.
    """
    if not vae.likelihood.sigma_from_batch:
        return None
    vae.likelihood.fixed_log_sigma = None
    n = len(data) if limit <= 0 else min(limit, len(data))
    sse, count = torch.zeros((), device=accelerator.device), 0
    for idx, x in _held_out(data, n, batch_size, accelerator):
        y = data.labels_at(idx)
        sse += (vae.reconstruction(x, y) - x).pow(2).sum()
        count += x.numel()
    total = accelerator.reduce(torch.stack([sse, torch.tensor(float(count), device=accelerator.device)]))
    log_sigma = 0.5 * torch.log(total[0] / total[1])
    vae.likelihood.fixed_log_sigma = softclip_log_sigma(log_sigma)
    return vae.likelihood.fixed_log_sigma.exp().item()


@torch.no_grad()
def image_bounds(vae: VAE, x: torch.Tensor, k: int, y: torch.Tensor | None = None,
                 chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image (B,): the IWAE bound log (1/k) Σ_i w_i, the reconstruction term −E log p(x|z) and the KL (as
    training computes it, from one code).

    log w = log p(x|z) + log p(z) − log q(z|x) for z ~ q(z|x), with the model's own prior (for a ladder,
    through every layer: importance_parts); its mean over samples is the ELBO and log mean exp of it the IWAE
    bound. A conditional model is given the labels ``y``: the bounds are then on log p(x|y).
    The images are encoded once; the k samples are drawn ``chunk`` at a time (0: all at once) and the
    log-sum-exp is accumulated, so memory stays bounded for any k.
    The one computation behind evaluate.py's bounds and ``TrainedVAE.log_likelihood``.
    """
    chunk = chunk or k
    mu, logvar, below = vae.encode_layers(x, y)  # a ladder: k codes through every layer, each chunk in turn
    mu, logvar = mu.float(), logvar.float()
    std, log_prior = torch.exp(0.5 * logvar), vae.prior.about(mu)
    lse, rec, z, lower = None, torch.zeros(len(x), device=x.device), None, None
    for start in range(0, k, chunk):
        z = mu + std * torch.randn(min(chunk, k - start), *mu.shape, device=mu.device)  # (chunk, B, z)
        out, lower = vae.decode_layers(z, y, below)
        log_px_z, log_ratio, _ = importance_parts(vae, x, z, mu, logvar, out.float(), log_prior, lower)
        rec -= log_px_z.sum(0) / k
        part = torch.logsumexp(log_px_z + log_ratio, 0)
        lse = part if lse is None else torch.logaddexp(lse, part)
    return lse - math.log(k), rec, sum(layer_kls(vae, mu, logvar, z[0], lower))


@torch.no_grad()
def likelihood_bounds(vae: VAE, data: ImageSplit, k: int, accelerator: Accelerator, batch_size: int = 100,
                      max_rows: int = 4_000, limit: int = 0, seed: int = 0, binarize: bool = False,
                      progress=None) -> dict[str, float]:
    """ELBO (with its reconstruction and KL parts) and the IWAE bound (Burda et al. 2016), per image.

    NLL ≈ −log (1/k) Σ_i w_i, which tightens towards the true −log p(x) as k grows.
    Samples are drawn in chunks of at most ``max_rows`` decoder rows and the
    log-sum-exp is accumulated chunk by chunk, so memory stays bounded for any k
    (and small: 4,000 rows keep a chunk's tensors in a CPU's cache, which made
    the k = 5000 bound a third faster than chunks of 20,000).
    Returns nats per image on the data's own scale (dequantised and moved to 8
    bits for continuous likelihoods) and bits per dimension.
    """
    continuous = vae.likelihood.continuous and not binarize
    g = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    n = len(data) if limit <= 0 else min(limit, len(data))
    chunk = max(1, min(k, max_rows // batch_size))
    sums = torch.zeros(4, device=accelerator.device)  # rec, kl, -iwae, count
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7919 * accelerator.process_index)
        for idx, x in _held_out(data, n, batch_size, accelerator, seed if binarize else None):
            x, y = _dequantise(x, continuous, g), data.labels_at(idx)
            bound, rec, kl = image_bounds(vae, x, k, y, chunk)
            sums += torch.stack([rec.sum(), kl.sum(), -bound.sum(), torch.tensor(float(len(x)), device=x.device)])
            if progress is not None:
                progress.update(len(x) * accelerator.num_processes)
    sums = accelerator.reduce(sums)
    shift = math.prod(data.shape) * LOG_256 if continuous else 0.0  # onto the 8-bit scale
    rec, kl, nll = ((sums[:3] / sums[3]).tolist())
    rec, nll = rec + shift, nll + shift
    d_ln2 = math.prod(data.shape) * math.log(2)
    return {"elbo": -(rec + kl), "rec": rec, "kl": kl, "nll": nll, "elbo_bpd": (rec + kl) / d_ln2,
            "nll_bpd": nll / d_ln2, "k": k, "n": int(sums[3].item()), "dequantised": continuous,
            "binarised": binarize, "kl_estimate": kl_estimate(vae)}


def kl_estimate(vae: VAE) -> str:
    """How the reported KL was computed: in closed form, or (a prior without one, the VampPrior) from one
    sample z ~ q(z|x) per image, log q(z|x) − log p(z)."""
    z = torch.zeros(1, vae.prior.z_dim)
    return "closed form" if vae.prior.kl_per_dim(z, z) is not None else "Monte Carlo, one sample per image"


@torch.no_grad()
def latent_usage(vae: VAE, data: ImageSplit, accelerator: Accelerator, batch_size: int = 500, limit: int = 0,
                 threshold: float = 0.01) -> dict:
    """Active units (Burda et al. 2016: Var_x E_q[z_j] > threshold), per-dimension KL and reconstruction error:
    MSE, PSNR, SSIM and MS-SSIM (data range 1, the scales fitted to the image size: ``ms_ssim_scales``; both
    None for images smaller than SSIM's 11-px window), each a mean over images.

    For a ladder also each layer's active units, bottom first, from the posterior means of a top-down pass that
    takes each layer at its mean (as Sønderby et al. 2016 count them), and the reconstruction is that pass's."""
    n = len(data) if limit <= 0 else min(limit, len(data))
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    means, kls, sse, psnr, ssims, ms_ssims = [], [], torch.zeros((), device=accelerator.device), [], [], []
    scales = ms_ssim_scales(*data.shape[1:])
    lower_means: list[list[torch.Tensor]] = []
    for idx, x in _held_out(data, n, batch_size, accelerator):
        y = data.labels_at(idx)
        mu, kl, below = encode_with_kl(vae, x, y)
        means.append(mu)
        kls.append(kl)
        if below is not None:  # (the same pass as vae.reconstruction, whose layers' means count too)
            out, lower = vae.decode_layers(mu.unsqueeze(0), y, below, draw=False)
            recon = vae.likelihood.mean(out.float())
            lower_means.append(lower.means)
        else:
            recon = vae.decode(mu, y)
        err = (recon - x).pow(2).flatten(1).mean(1)  # per-image MSE on [0, 1]
        sse += err.sum()
        psnr.append(10 * torch.log10(1.0 / err.clamp_min(1e-10)))
        if scales:
            ssims.append(ssim(recon.float(), x.float(), data_range=1.0, reduction="none"))
            ms_ssims.append(ms_ssim(x.float(), recon.float(), scales))
    means = accelerator.gather_for_metrics(torch.cat(means))
    kl = accelerator.gather_for_metrics(torch.cat(kls)).mean(0)
    psnr = accelerator.gather_for_metrics(torch.cat(psnr))
    structure = {"ssim": None, "ms_ssim": None, "ms_ssim_scales": scales}
    if scales:
        structure |= {"ssim": accelerator.gather_for_metrics(torch.cat(ssims)).mean().item(),
                      "ms_ssim": accelerator.gather_for_metrics(torch.cat(ms_ssims)).mean().item()}
    variance = means.var(0)
    layers = [accelerator.gather_for_metrics(torch.cat(m)).var(0) for m in zip(*lower_means)] + [variance]
    per_layer = {"layers": [{"z_dim": len(v), "active_units": int((v > threshold).sum())} for v in layers]}
    return {"active_units": int((variance > threshold).sum()), "z_dim": vae.z_dim,
            **(per_layer if vae.hierarchical else {}),
            "variance": variance.tolist(), "kl_per_dim": kl.tolist(), "kl": kl.sum().item(),
            "kl_to": "prior" if vae.prior.kl_per_dim(mu[:1], mu[:1]) is not None else "N(0, I)",
            "mse": (accelerator.reduce(sse) / len(means)).item(), "psnr": psnr.mean().item(), **structure}
