"""Ex-post samplers for a trained model (models/samplers.py): fitted once to the training set's codes, kept in
the model's folder (``samplers/<name>.safetensors``, with the options they were fitted with), reused by later
calls and exported with the Hub folder; refitting is asked for (``--refit``), never implied.

Which sampler fits the codes better is measured offline, in nats per code (higher is better), both ways:
``held_out``, the mean log-density the sampler gives the held-out set's codes (for two_stage, its
importance-weighted lower bound, k = 100), and ``reverse``, the mean log-density of the sampler's draws
under the aggregate of the training codes, a Gaussian kernel density estimate with Scott's bandwidth.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from models.samplers import SAMPLERS, PriorSampler, Sampler, SamplerOptions
from models.vae import VAE
from utils.data.splits import ImageSplit
from utils.errors import UserError
from utils.evaluation.latents import posterior_stats
from utils.files import cannot_write, is_disk_error, save_tensors, write_failure

FOLDER = "samplers"


def check_usable(vae: VAE, name: str) -> None:
    """A one-line refusal of a sampler this model cannot use."""
    if name not in SAMPLERS:
        raise UserError(f"unknown --sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    if name == "prior" and not vae.has_prior:
        raise UserError("this autoencoder has no prior to draw from (its codes are not pulled to one): use "
                        "--sampler gmm or --sampler two_stage, fitted to its codes")
    if name != "prior" and vae.n_classes:
        raise UserError(f"--sampler {name} fits one density to every class's codes, and this model is conditional: "
                        f"use --sampler prior, which draws for the class asked")


def fitted_sampler(vae: VAE, folder: Path, name: str, train: Callable[[], ImageSplit], options: SamplerOptions,
                   refit: bool = False, device: torch.device | str = "cpu") -> Sampler:
    """The sampler ``name`` for the model in ``folder``: the model's prior, the one fitted before (when its
    options match), or one fitted now to the codes of the training split ``train()`` (read only then) and kept
    there."""
    check_usable(vae, name)
    if not SAMPLERS[name].fitted:
        return PriorSampler(vae.prior)
    path = Path(folder) / FOLDER / f"{name}.safetensors"
    want = options.of(name)
    if path.is_file() and not refit:
        try:
            with safe_open(str(path), "pt") as f:
                had = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is damaged ({str(e).splitlines()[0][:100]}): pass --refit to fit it again") \
                from None
        if had != want:
            changed = ", ".join(f"{k} {had.get(k)} (now {v})" for k, v in want.items() if had.get(k) != v)
            raise UserError(f"{path} was fitted with {changed}: pass --refit to fit it again, or the options it "
                            f"was fitted with")
        return SAMPLERS[name]().load_state(state)
    sampler = SAMPLERS[name]().fit(posterior_stats(vae, train(), device=device)[0].cpu(), options)
    keep(sampler, path, want)
    return sampler


def keep(sampler: Sampler, path: Path, metadata: dict[str, str]) -> None:
    """Keep a fitted sampler at ``path`` for later calls. A folder that cannot be written (a read-only run) keeps
    nothing, and says so: the fit is still used. A full disk or a file-size limit is one line, and leaves no
    partial file."""
    unwritable = cannot_write(path.parent)
    if unwritable is not None:
        print(f"note: the fitted sampler is used but not kept: {path.parent} cannot be written "
              f"({unwritable.strerror})", file=sys.stderr)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(sampler.state(), path, metadata=metadata)
    except (OSError, SafetensorError) as e:
        if not is_disk_error(e):
            raise
        raise UserError(write_failure(e, path, "then run again (the sampler is fitted again)")) from None


def kde_log_density(points: torch.Tensor, codes: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log q̂(points) (n,) under a Gaussian kernel density estimate on ``codes`` (N, d), Scott's bandwidth
    h = N^(−1/(d+4)) · the codes' mean standard deviation."""
    n, d = codes.shape
    h = n ** (-1.0 / (d + 4)) * codes.std(0).mean().item()
    const = -math.log(n) - d * (math.log(h) + 0.5 * math.log(2 * math.pi))
    out = [torch.logsumexp(-0.5 * torch.cdist(p.double(), codes.double()).pow(2) / h**2, 1) + const
           for p in points.split(chunk)]
    return torch.cat(out).float()


def sampler_scores(sampler: Sampler, train_codes: torch.Tensor, test_codes: torch.Tensor, n: int = 2000,
                   seed: int = 0) -> dict[str, float]:
    """The two offline numbers (module docstring), in nats per code; the KDE on at most 10,000 training codes."""
    g = torch.Generator().manual_seed(seed)
    reference = train_codes[torch.randperm(len(train_codes), generator=g)[:10_000]]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        held_out = sampler.log_prob(test_codes).mean().item()
    drawn = sampler.sample(n, g)
    return {"held_out": held_out, "reverse": kde_log_density(drawn, reference).mean().item(), "n_draws": n,
            "n_held_out": len(test_codes)}
