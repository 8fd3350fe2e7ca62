"""Ex-post samplers for a trained model (models/samplers.py): fitted once to the training set's codes, kept in
the model's folder (``samplers/<name>.safetensors``), reused by later calls and exported with the Hub folder.

A kept file is bound to what made it: its metadata holds the options it was fitted with, the model's z_dim and
a fingerprint of the weights (``model_fingerprint``: a hash of the tensors by name, so the same weights
exported to the Hub layout keep their samplers). A file fitted to other weights (the run trained on since, or
another weights file), or kept without that record, is fitted again, with a warning line; a file fitted with
other options is refused until ``--refit`` (``refit=True`` from Python) or those options are asked for; a file
whose contents do not fit the model (each sampler's ``problems``) is refused in one line naming it.

Which sampler fits the codes better is measured offline, in nats per code (higher is better), both ways:
``held_out``, the mean log-density the sampler gives the held-out set's codes (for two_stage, its
importance-weighted lower bound, k = 100; for flow_matching, its ODE's density by the change of variables, the
costliest: models/flows.py), and ``reverse``, the mean log-density of the sampler's draws
under the aggregate of the training codes, a Gaussian kernel density estimate with Scott's rule
(``kde_log_density``, as scipy's ``gaussian_kde``).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from models.sampler_rules import SAMPLERS, SamplerOptions, fitted_names
from models.samplers import PriorSampler, Sampler
from models.vae import VAE
from utils.data.splits import ImageSplit
from utils.errors import UserError
from utils.files import cannot_write, is_disk_error, save_tensors, write_failure

FOLDER = "samplers"
WEIGHTS_KEY, Z_KEY = "weights_sha256", "z_dim"  # the metadata that binds a kept file to its model


def kept_folder(weights: Path) -> Path:
    """Where the samplers fitted to ``weights`` are kept: ``samplers/`` beside a folder's model.safetensors, and
    ``samplers/<stem>/`` beside any other weights file (``-c CONFIG --weights W``), so that two weights files in
    one folder neither share nor replace each other's samplers."""
    weights = Path(weights)
    return weights.parent / FOLDER / ("" if weights.name == "model.safetensors" else weights.stem)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's tensors, each by name, dtype, shape and bytes: the same for a run's model.safetensors
    and its Hub export (the same tensors), different once training has changed a single weight."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flag(name: str, value: str, api: bool) -> str:
    return f'sampler="{value}"' if api and name == "sampler" else (f"{name}={value}" if api else f"--{name} {value}")


def check_usable(vae: VAE, name: str, api: bool = False) -> None:
    """A one-line refusal of a sampler this model cannot use (advice for the command line, or for Python)."""
    if name not in SAMPLERS:
        what = "sampler" if api else "--sampler"
        raise UserError(f"unknown {what} {name!r}: choose one of {', '.join(SAMPLERS)}")
    if not SAMPLERS[name].fitted and not vae.has_prior:
        fitted = [_flag("sampler", n, api) for n in fitted_names()]
        raise UserError(f"this autoencoder has no prior to draw from (its codes are not pulled to one): use "
                        f"{', '.join(fitted[:-1])} or {fitted[-1]}, fitted to its codes")
    if SAMPLERS[name].fitted and vae.n_classes:
        raise UserError(f"{_flag('sampler', name, api)} fits one density to every class's codes, and this model is "
                        f"conditional: use {_flag('sampler', 'prior', api)}, which draws for the class asked")


class Unusable(Exception):
    """Why a kept file cannot be used (the caller names the file and the fix)."""


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a kept file."""
    try:
        with safe_open(str(path), "pt") as f:
            had = f.metadata() or {}
        return had, load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:100]
        raise Unusable(f"damaged: {first}") from None


def _bound_elsewhere(had: dict[str, str], vae: VAE, fingerprint: str) -> str | None:
    """What other model a kept file was fitted to (None: this one)."""
    if WEIGHTS_KEY not in had or Z_KEY not in had:
        return "weights it keeps no record of"
    if had[Z_KEY] != str(vae.z_dim):
        return f"codes of z_dim {had[Z_KEY]} (this model's are {vae.z_dim})"
    if had[WEIGHTS_KEY] != fingerprint:
        return "other weights (the run has trained since, or it is another weights file)"
    return None


def _options_of(had: dict[str, str], name: str) -> SamplerOptions:
    """The options a kept file records."""
    try:
        return SamplerOptions(**{o.name: json.loads(had[o.name]) if o.type is list else o.type(had[o.name])
                                 for o in SAMPLERS[name].options})
    except (KeyError, ValueError, TypeError, UserError) as e:
        raise Unusable(f"its options are not readable ({e.__class__.__name__})") from None


def fitted_sampler(vae: VAE, folder: Path, name: str, train: Callable[[], ImageSplit], options: SamplerOptions,
                   refit: bool = False, device: torch.device | str = "cpu", api: bool = False) -> Sampler:
    """The sampler ``name`` for the model whose samplers are kept in ``folder`` (``kept_folder``): the model's
    prior, the one fitted before to this model (when its options match), or one fitted now to the codes of the
    training split ``train()`` (read only then) and kept there. ``api``: advice for Python, not flags."""
    check_usable(vae, name, api)
    if not SAMPLERS[name].fitted:
        return PriorSampler(vae.prior)
    path = Path(folder) / f"{name}.safetensors"
    fix = "pass refit=True" if api else "pass --refit"
    fingerprint = model_fingerprint(vae)
    want = options.of(name)
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a file, where the fitted sampler is kept: move it away, and the sampler is "
                        f"fitted again")
    if path.is_file() and not refit:
        try:
            had, state = _read(path)
        except Unusable as e:
            raise UserError(f"{path} is {e}: {fix} to fit it again") from None
        elsewhere = _bound_elsewhere(had, vae, fingerprint)
        if elsewhere is None:
            if any(had.get(k) != v for k, v in want.items()):
                changed = ", ".join(_flag(k, had.get(k), api) + f" (asked: {v})" for k, v in want.items()
                                    if had.get(k) != v)
                raise UserError(f"{path} was fitted with {changed}: {fix} to fit it again, or ask for the options "
                                f"it was fitted with")
            problem = SAMPLERS[name].load().problems(state, vae.z_dim, options)
            if problem:
                raise UserError(f"{path} cannot be used ({problem}): {fix} to fit it again")
            return SAMPLERS[name].load()().load_state(state).drawing(options)
        print(f"warning: {path} was fitted to {elsewhere}: fitting it again to this model's codes", file=sys.stderr)
    means, stds = training_codes(vae, train(), device)
    sampler = SAMPLERS[name].load()().fit(means, options, stds).drawing(options)
    keep(sampler, path, {**want, Z_KEY: str(vae.z_dim), WEIGHTS_KEY: fingerprint})
    return sampler


@torch.no_grad()
def training_codes(vae: VAE, data: ImageSplit, device: torch.device | str = "cpu",
                   batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior means, posterior standard deviations), each (N, z) on the CPU in fp32: what a sampler is
    fitted to. An autoencoder's codes are points (σ = 0)."""
    means, stds = [], []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        mu, logvar = vae.encode(data.batch(idx).to(device), data.labels_at(idx.to(device)))
        means.append(mu.float().cpu())
        stds.append(torch.zeros_like(means[-1]) if vae.deterministic else torch.exp(0.5 * logvar.float()).cpu())
    return torch.cat(means), torch.cat(stds)


def kept_sampler_files(run: Path, vae: VAE) -> tuple[dict[str, tuple[Path, SamplerOptions]], list[str]]:
    """The kept sampler files of ``run`` that fit ``vae`` ({name: (file, its options)}: readable, fitted to these
    weights and z, contents valid), and a line for each other entry of its samplers/ folder, left out: a
    temporary, a damaged or foreign file, another weights file's samplers. What the exporter copies."""
    folder, usable, left_out = Path(run) / FOLDER, {}, []
    fingerprint = model_fingerprint(vae)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = path.name.removesuffix(".safetensors")
        if not (path.is_file() and path.suffix == ".safetensors" and name in SAMPLERS and SAMPLERS[name].fitted):
            left_out.append(f"{path} is not a sampler kept for this model (a temporary, or another file): left out")
            continue
        try:
            had, state = _read(path)
            elsewhere = _bound_elsewhere(had, vae, fingerprint)
            if elsewhere:
                raise Unusable(f"fitted to {elsewhere}")
            options = _options_of(had, name)
            problem = SAMPLERS[name].load().problems(state, vae.z_dim, options)
            if problem:
                raise Unusable(problem)
        except Unusable as e:
            left_out.append(f"{path} is left out ({e}): fit it again with python sample.py --exp_dir {run} "
                            f"--sampler {name} --refit, and export again")
            continue
        usable[name] = (path, options)
    return usable, left_out


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
    """log q̂(points) (n,) under a Gaussian kernel density estimate on ``codes`` (N, d) with Scott's rule as
    scipy.stats.gaussian_kde applies it: each kernel's covariance is N^(−2/(d+4)) times the codes' covariance
    (unbiased). Codes that do not vary along some direction (a singular covariance) get a floor there, 1e-9 times
    their mean variance added to the diagonal; codes that do not vary at all have no scale and are refused."""
    n, d = codes.shape
    x = codes.double()
    cov = torch.cov(x.T).reshape(d, d) if n > 1 else torch.zeros(d, d, dtype=torch.float64)
    spread = cov.diagonal().mean().item()
    if not spread > 0 or not math.isfinite(spread):
        raise UserError(f"the {n} training codes are all one point, so a density estimate of them has no "
                        f"bandwidth: the model's codes have collapsed (drop samplers from --metrics)")
    scale = n ** (-2.0 / (d + 4))
    chol, info = torch.linalg.cholesky_ex(cov * scale)
    if info:
        chol = torch.linalg.cholesky((cov + 1e-9 * spread * torch.eye(d, dtype=cov.dtype)) * scale)

    def white(z: torch.Tensor) -> torch.Tensor:  # L⁻¹z: the kernel is N(0, I) in these coordinates
        return torch.linalg.solve_triangular(chol, z.double().T, upper=False).T

    ref = white(x)
    const = -math.log(n) - torch.log(chol.diagonal()).sum().item() - d * 0.5 * math.log(2 * math.pi)
    out = [torch.logsumexp(-0.5 * torch.cdist(white(p), ref).pow(2), 1) + const for p in points.split(chunk)]
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
