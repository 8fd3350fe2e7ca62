"""Ex-post samplers: a density fitted to a trained model's codes after training, to draw codes that decode to
images even where the aggregate posterior does not fill the prior (or, for an autoencoder, where there is no
prior at all). Chosen by name (``sample.py --sampler``), each one class here, its rules class (what it states
without torch: its options) and one ``SAMPLERS`` entry in sampler_rules.py:

    prior      the model's own p(z), nothing fitted
    gmm        a Gaussian mixture fitted to the training set's posterior means (Ghosh et al. 2020), by
               scikit-learn's GaussianMixture; its parameters are kept, and drawn from with torch
    two_stage  a second, small VAE trained on draws z = μ + σε from the training set's posteriors (Dai & Wipf
               2019): codes are drawn as the authors' ``generate()`` draws them, z = f(u) + γε with u, ε ~ N(0, I)

A fitted sampler is tensors plus a few settings (``state``/``load_state``), kept as safetensors: no pickle.
Each class checks a kept state before it is used (``problems``: names, shapes against the model's z, finite
values, a valid Cholesky factor), so a damaged or foreign file is refused in one line, not a traceback.
Every sampler draws from a CPU ``torch.Generator``, so the same seed gives the same codes on any machine,
and gives a log-density of codes (``log_prob``, nats per code) for the offline comparison of samplers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.gaussian import HALF_LOG_2PI, gaussian_nll, log_normal
from models.priors import Prior, StandardNormal
from models.sampler_rules import (  # noqa: F401  (SAMPLERS and SamplerOptions: the Python API's names, as before)
    SAMPLERS,
    GaussianMixtureRules,
    PriorSamplerRules,
    SamplerOptions,
    SamplerRules,
    TwoStageRules,
)
from utils.errors import UserError


def _tensor_problems(state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], made_for: str) -> str | None:
    """Why ``state`` is not the tensors ``want`` names with their shapes (for ``made_for``), all finite floats."""
    if set(state) != set(want):
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        return ("tensors " + ", ".join([*(f"{k} missing" for k in missing), *(f"{k} unexpected" for k in extra)])
                + f", expected {', '.join(sorted(want))}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            return f"{name} is {tuple(state[name].shape)}, expected {shape} ({made_for})"
        if not state[name].is_floating_point() or not torch.isfinite(state[name]).all():
            return f"{name} has values that are not finite numbers"
    return None


class Sampler(SamplerRules):
    """Codes z (n, d) for a model whose codes it was fitted to; whether it is fitted and the options its fit
    depends on are its rules class's (sampler_rules.py)."""

    def fit(self, means: torch.Tensor, options: SamplerOptions, stds: torch.Tensor | None = None) -> Sampler:
        """Fit to the training set's posterior means (N, d) and, where the sampler uses them, standard
        deviations (N, d; None or zeros for an autoencoder's point codes)."""
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def problems(cls, state: dict[str, torch.Tensor], z_dim: int, options: SamplerOptions) -> str | None:
        """Why a kept ``state`` cannot be this sampler for codes of ``z_dim`` fitted with ``options`` (None: it
        can): the check before ``load_state``, so that a damaged file is one line, not a traceback."""
        return None

    def load_state(self, state: dict[str, torch.Tensor]) -> Sampler:
        return self

    def drawing(self, options: SamplerOptions) -> Sampler:
        """Set how it draws from its fit (its rules' ``draw_options``), fitted now or kept."""
        return self

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log-density of codes (n, d) -> (n,), in nats."""
        raise NotImplementedError


class PriorSampler(PriorSamplerRules, Sampler):
    """The model's own prior."""

    def __init__(self, prior: Prior):
        self.prior = prior

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.prior.sample(n, generator).cpu()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.prior.log_prob(z)


class GaussianMixtureSampler(GaussianMixtureRules, Sampler):
    """K Gaussians fitted by EM (scikit-learn's GaussianMixture, k-means initialisation, ``seed``); each covariance
    kept as its Cholesky factor L (Σ = L Lᵀ), whatever scikit-learn's covariance type. Fitted to the posterior
    means alone, as Ghosh et al. fit their (deterministic) codes."""

    def __init__(self):
        self.weights = self.means = self.cholesky = torch.empty(0)

    def fit(self, means: torch.Tensor, options: SamplerOptions,
            stds: torch.Tensor | None = None) -> GaussianMixtureSampler:
        from sklearn.mixture import GaussianMixture

        codes, k = means, options.gmm_components
        if len(codes) < 2 * k:
            raise UserError(f"gmm_components {k} needs at least {2 * k} training codes, there are {len(codes)}: "
                            f"use fewer components")
        gm = GaussianMixture(k, covariance_type=options.gmm_covariance, random_state=options.seed, max_iter=200)
        gm.fit(codes.double().numpy())
        d = codes.shape[1]
        cov = {"full": lambda c: c, "tied": lambda c: np.broadcast_to(c, (k, d, d)),
               "diag": lambda c: np.stack([np.diag(v) for v in c]),
               "spherical": lambda c: np.stack([np.eye(d) * v for v in c])}[options.gmm_covariance](gm.covariances_)
        self.weights = torch.as_tensor(gm.weights_)
        self.means = torch.as_tensor(gm.means_)
        self.cholesky = torch.linalg.cholesky(torch.as_tensor(np.array(cov)))
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "cholesky": self.cholesky}

    @classmethod
    def problems(cls, state: dict[str, torch.Tensor], z_dim: int, options: SamplerOptions) -> str | None:
        k, d = options.gmm_components, z_dim
        want = {"weights": (k,), "means": (k, d), "cholesky": (k, d, d)}
        wrong = _tensor_problems(state, want, f"{k} components, z_dim {d}")
        if wrong:
            return wrong
        w, chol = state["weights"].double(), state["cholesky"].double()
        if (w < 0).any() or abs(w.sum().item() - 1) > 1e-4:
            return "the component weights are not a distribution (non-negative, summing to 1)"
        diag = torch.diagonal(chol, dim1=-2, dim2=-1)
        if not torch.equal(chol, torch.tril(chol)) or not (diag > 0).all():
            return "a covariance factor is not lower triangular with a positive diagonal (not a Cholesky factor)"
        return None

    def load_state(self, state: dict[str, torch.Tensor]) -> GaussianMixtureSampler:
        self.weights, self.means, self.cholesky = state["weights"], state["means"], state["cholesky"]
        return self

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        pick = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[pick] + (self.cholesky[pick] @ eps[:, :, None])[:, :, 0]).float()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        diff = z.double()[:, None, :] - self.means[None]                                     # (n, K, d)
        solved = torch.linalg.solve_triangular(self.cholesky[None], diff[..., None], upper=False)[..., 0]
        log_det = torch.log(torch.diagonal(self.cholesky, dim1=-2, dim2=-1)).sum(-1)           # (K,) ½ log |Σ|
        comp = -0.5 * solved.pow(2).sum(-1) - log_det - z.shape[1] * HALF_LOG_2PI            # (n, K)
        return torch.logsumexp(comp + torch.log(self.weights), 1).float()


class CodeVAE(nn.Module):
    """The second stage of Dai & Wipf 2019: a VAE on codes z (d) with latents u (d), MLP encoder and decoder, and
    a Gaussian p(z|u) whose shared variance γ is learned (as the σ-VAE's): the second stage's own balance."""

    def __init__(self, d: int, hidden: list[int]):
        super().__init__()

        def mlp(a: int, b: int) -> nn.Sequential:
            sizes = [a, *hidden, b]
            layers: list[nn.Module] = []
            for i, (p, q) in enumerate(zip(sizes[:-1], sizes[1:])):
                layers += [nn.Linear(p, q)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
            return nn.Sequential(*layers)

        self.encoder, self.decoder = mlp(d, 2 * d), mlp(d, d)
        self.log_gamma = nn.Parameter(torch.zeros(()))

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        """The negative ELBO of codes z (B, d), averaged over the batch."""
        mu, logvar = self.encoder(z).chunk(2, dim=1)
        u = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        nll = gaussian_nll(z, self.decoder(u), self.log_gamma)
        return (nll + StandardNormal(z.shape[1]).kl_per_dim(mu, logvar).sum(1)).mean()


class TwoStageSampler(TwoStageRules, Sampler):
    """Draws as Dai & Wipf 2019 do (their ``generate()``): u ~ N(0, I), then z ~ N(f(u), γ²I) = f(u) + γε, with
    f the second stage's decoder and γ its learned standard deviation; ``log_prob`` bounds the density of that
    same distribution. The second stage is trained, as theirs, on fresh draws z = μ + σε from the training
    images' posteriors each step (an autoencoder's codes have σ = 0: its codes themselves)."""

    def __init__(self):
        self.net: CodeVAE | None = None

    def fit(self, means: torch.Tensor, options: SamplerOptions, stds: torch.Tensor | None = None) -> TwoStageSampler:
        g = torch.Generator().manual_seed(options.seed)
        steps = options.two_stage_steps
        with torch.random.fork_rng(), torch.enable_grad():  # a fit trains, whatever the caller's no_grad
            torch.manual_seed(options.seed)
            self.net = CodeVAE(means.shape[1], options.two_stage_hidden)
            opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
            batch = min(256, len(means))
            for step in range(steps):
                idx = torch.randint(len(means), (batch,), generator=g)
                z = means[idx].float()
                if stds is not None:
                    z = z + stds[idx].float() * torch.randn(z.shape, generator=g)
                for group in opt.param_groups:  # halved at 3/8 and 3/4 of the run: the authors' 300 and 600 of 800
                    group["lr"] = 1e-3 * 0.5 ** min(2, 8 * step // (3 * steps))
                opt.zero_grad(set_to_none=True)
                self.net.loss(z).backward()
                opt.step()
        self.net.eval()
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    @classmethod
    def problems(cls, state: dict[str, torch.Tensor], z_dim: int, options: SamplerOptions) -> str | None:
        want = {k: tuple(v.shape) for k, v in CodeVAE(z_dim, options.two_stage_hidden).state_dict().items()}
        return _tensor_problems(state, want, f"z_dim {z_dim}, hidden {options.two_stage_hidden}")

    def load_state(self, state: dict[str, torch.Tensor]) -> TwoStageSampler:
        d = state["decoder.0.weight"].shape[1]
        layers = sorted((int(k.split(".")[1]), v) for k, v in state.items()
                        if k.startswith("decoder.") and k.endswith(".weight"))
        hidden = [v.shape[0] for _, v in layers][:-1]
        self.net = CodeVAE(d, hidden)
        self.net.load_state_dict(state)
        self.net.eval()
        return self

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        d = self.net.decoder[0].in_features
        u = torch.randn(n, d, generator=generator)
        eps = torch.randn(n, d, generator=generator)
        return self.net.decoder(u) + torch.exp(self.net.log_gamma) * eps

    @torch.no_grad()
    def log_prob(self, z: torch.Tensor, k: int = 100) -> torch.Tensor:
        """The importance-weighted bound on log p(z) with k samples, p(z) = ∫ N(z; f(u), γ²I) N(u; 0, I) du, the
        distribution ``sample`` draws from (a lower bound on its density)."""
        mu, logvar = self.net.encoder(z.float()).chunk(2, dim=1)
        u = mu + torch.randn(k, *mu.shape) * torch.exp(0.5 * logvar)                          # (k, n, d)
        mean = self.net.decoder(u)
        log_pz_u = log_normal(z.float(), mean, 2 * self.net.log_gamma).sum(-1)
        log_w = log_pz_u + StandardNormal(z.shape[1]).log_prob(u) - log_normal(u, mu, logvar).sum(-1)
        return torch.logsumexp(log_w, 0) - math.log(k)
