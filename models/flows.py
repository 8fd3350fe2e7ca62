"""Two ex-post samplers that learn a map from N(0, I) to the codes, written here in a page each (not taken from a
flow library: the toolkit keeps a fit as safetensors tensors, draws from a CPU ``torch.Generator``, and checks
a kept state before it is used, and zuko's and nflows' modules sample from torch's global generator):

    flow           a RealNVP normalising flow (Dinh et al. 2017): affine coupling layers fitted by maximum
                   likelihood; an exact log-density by the change of variables
    flow_matching  a velocity field v(x, t) trained by conditional flow matching on the straight path
                   (Lipman et al. 2023; rectified flow, Liu et al. 2023), drawn by integrating dx/dt = v from
                   N(0, I) at t = 0 to the codes at t = 1 with a fixed-step midpoint solver

Both are fitted to the training set's posterior means, as the GMM is: the codes the decoder is shown when the
model reconstructs, and the codes whose density the samplers metric scores on the held-out set (its
``held_out`` number), so that the density fitted is the density measured. (The two-stage VAE instead trains on
fresh posterior draws z = μ + σε, as its authors do: its second VAE is a model of q(z), noise included.)
Both first standardise the codes (per dimension, the training codes' mean and standard deviation, kept as
tensors), so that one learning rate suits codes of any scale. Fits are seeded and run on the CPU in fp32, in
one order of operations: the same seed gives the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from models.gaussian import standard_normal_log_density
from models.sampler_rules import FlowMatchingRules, FlowRules, SamplerOptions
from models.samplers import Sampler, _tensor_problems

BATCH = 256  # codes per training step


def mlp(sizes: list[int], last_zero: bool = True) -> nn.Sequential:
    """Linear layers with SiLU between them; the last one starts at zero (a coupling starts as the identity, a
    velocity field at zero)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.SiLU()] if i < len(sizes) - 2 else [])
    if last_zero:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class Standardise(nn.Module):
    """x -> (x - shift) / exp(log_scale) per dimension, the training codes' moments: log |det| = -Σ log_scale."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("log_scale", torch.zeros(d))

    def fit(self, codes: torch.Tensor) -> None:
        self.shift.copy_(codes.mean(0))
        self.log_scale.copy_(torch.log(codes.std(0).clamp_min(1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) * torch.exp(-self.log_scale)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        return u * torch.exp(self.log_scale) + self.shift


class Coupling(nn.Module):
    """An affine coupling layer (RealNVP): the dimensions where ``mask`` is 1 pass unchanged and set a scale and a
    shift of the others, u = m x + (1 - m)(x e^s + t), s = a · tanh(s'), (s', t) = net(m x); log |det| = Σ (1 - m) s.
    The tanh bounds each layer's scale (Dinh et al. 2017, §4.1), a learned per dimension."""

    def __init__(self, d: int, hidden: int, parity: int):
        super().__init__()
        self.register_buffer("mask", ((torch.arange(d) + parity) % 2).float(), persistent=False)
        self.net = mlp([d, hidden, hidden, 2 * d])
        self.a = nn.Parameter(torch.ones(d))

    def _scale_shift(self, x_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(x_masked).chunk(2, dim=-1)
        keep = 1 - self.mask
        return keep * self.a * torch.tanh(s), keep * t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._scale_shift(x * self.mask)
        return x * torch.exp(s) + t, s.sum(-1)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        s, t = self._scale_shift(u * self.mask)
        return (u - t) * torch.exp(-s)


class RealNVP(nn.Module):
    """f: codes -> N(0, I): the standardisation, then ``layers`` couplings of alternating masks."""

    def __init__(self, d: int, layers: int, hidden: int):
        super().__init__()
        self.standardise = Standardise(d)
        self.couplings = nn.ModuleList(Coupling(d, hidden, i % 2) for i in range(layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x), log |det ∂f/∂x|) for codes (n, d)."""
        u = self.standardise(x)
        log_det = -self.standardise.log_scale.sum().expand(len(x))
        for c in self.couplings:
            u, ld = c(u)
            log_det = log_det + ld
        return u, log_det

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        for c in reversed(self.couplings):
            u = c.inverse(u)
        return self.standardise.inverse(u)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = log N(f(x); 0, I) + log |det ∂f/∂x| (n,)."""
        u, log_det = self(x)
        return standard_normal_log_density(u) + log_det


def _train(net: nn.Module, loss: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor],
           codes: torch.Tensor, steps: int, lr: float, g: torch.Generator) -> None:
    """Adam on ``loss(net, batch, g)`` for ``steps`` batches of codes drawn with ``g``; the learning rate decays to
    zero on a cosine, gradients clipped at norm 10. Under its own enable_grad: a fit trains, whatever the
    caller's no_grad."""
    with torch.enable_grad():
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        batch = min(BATCH, len(codes))
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            x = codes[torch.randint(len(codes), (batch,), generator=g)]
            opt.zero_grad(set_to_none=True)
            loss(net, x, g).backward()
            nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
    net.eval()


def _layer_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix)})


def _fitted(make: Callable[[], nn.Module], loss: Callable, codes: torch.Tensor, steps: int, lr: float,
            seed: int) -> nn.Module:
    """A network made under ``seed`` (the same initial weights whatever the global generator's state), its
    standardisation set from the codes, then trained on them: the fit both flows share."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = make()
    net.standardise.fit(codes)
    _train(net, loss, codes, steps, lr, torch.Generator().manual_seed(seed))
    return net


class FlowSampler(FlowRules, Sampler):
    """A RealNVP flow fitted to the training codes by maximum likelihood (module docstring); ``sample`` draws
    u ~ N(0, I) and returns f⁻¹(u), ``log_prob`` is exact."""

    def __init__(self):
        self.net: RealNVP | None = None

    def fit(self, means: torch.Tensor, options: SamplerOptions, stds: torch.Tensor | None = None) -> FlowSampler:
        codes = means.float()
        self.net = _fitted(lambda: RealNVP(codes.shape[1], options.flow_layers, options.flow_hidden),
                           lambda net, x, g: -net.log_prob(x).mean(), codes, options.flow_steps, options.flow_lr,
                           options.seed)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    @classmethod
    def problems(cls, state: dict[str, torch.Tensor], z_dim: int, options: SamplerOptions) -> str | None:
        want = {k: tuple(v.shape) for k, v in RealNVP(z_dim, options.flow_layers, options.flow_hidden)
                .state_dict().items()}
        return _tensor_problems(state, want, f"z_dim {z_dim}, {options.flow_layers} layers of width "
                                             f"{options.flow_hidden}")

    def load_state(self, state: dict[str, torch.Tensor]) -> FlowSampler:
        d, hidden = state["couplings.0.net.0.weight"].shape[1], state["couplings.0.net.0.weight"].shape[0]
        self.net = RealNVP(d, _layer_count(state, "couplings."), hidden)
        self.net.load_state_dict(state)
        self.net.eval()
        return self

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.randn(n, self.net.standardise.shift.shape[0], generator=generator)
        return self.net.inverse(u)

    @torch.no_grad()
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.log_prob(z.to(self.net.standardise.shift.dtype)).float()


class Velocity(nn.Module):
    """v(x, t) for x (n, d) and t (n,): an MLP on x, t and sin/cos of 2πkt (k = 1..4), in standardised codes."""

    FREQUENCIES = 4

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.standardise = Standardise(d)
        self.net = mlp([d + 1 + 2 * self.FREQUENCIES, hidden, hidden, hidden, d])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = torch.arange(1, self.FREQUENCIES + 1, dtype=x.dtype)
        angle = 2 * math.pi * t[..., None] * k
        return self.net(torch.cat([x, t[..., None], torch.sin(angle), torch.cos(angle)], -1))


def flow_matching_loss(net: Velocity, x1: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Conditional flow matching on the straight path x_t = (1 - t) x0 + t x1, x0 ~ N(0, I), t ~ U(0, 1): the
    squared error of v(x_t, t) against the path's velocity x1 - x0 (Lipman et al. 2023, eq. 23 with σ_min = 0;
    Liu et al. 2023's rectified flow), summed over dimensions and averaged over the batch."""
    x1 = net.standardise(x1)
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(len(x1), generator=g)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    return (net(xt, t) - (x1 - x0)).pow(2).sum(-1).mean()


class FlowMatchingSampler(FlowMatchingRules, Sampler):
    """Codes by integrating the learned velocity from x0 ~ N(0, I) with ``flow_matching_ode_steps`` midpoint
    steps (two evaluations of v each): a setting of drawing, not of the fit (``drawing``), so a kept fit serves
    any number of steps. ``log_prob`` is the density of that ODE by the instantaneous change of
    variables, log p1(x1) = log N(x0) - ∫₀¹ tr ∂v/∂x (x_t, t) dt, integrating x and the trace back from t = 1 with
    the same steps and the exact trace (``torch.func.jacrev``: d backward passes per evaluation, so a code
    costs 2 · steps · d evaluations of v; for z = 16, width 256 and 32 steps, 5 to 13 ms a code on one core
    of a shared 2-core CPU, one to two minutes for 10,000). It is the density of the ODE's flow, approximated to
    the solver's accuracy, not of the discrete draws exactly."""

    def __init__(self):
        self.net: Velocity | None = None
        self.ode_steps = next(o.default for o in self.draw_options if o.name == "flow_matching_ode_steps")

    def fit(self, means: torch.Tensor, options: SamplerOptions,
            stds: torch.Tensor | None = None) -> FlowMatchingSampler:
        codes = means.float()
        self.net = _fitted(lambda: Velocity(codes.shape[1], options.flow_matching_hidden), flow_matching_loss, codes,
                           options.flow_matching_steps, options.flow_matching_lr, options.seed)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    @classmethod
    def problems(cls, state: dict[str, torch.Tensor], z_dim: int, options: SamplerOptions) -> str | None:
        want = {k: tuple(v.shape) for k, v in Velocity(z_dim, options.flow_matching_hidden).state_dict().items()}
        return _tensor_problems(state, want, f"z_dim {z_dim}, width {options.flow_matching_hidden}")

    def drawing(self, options: SamplerOptions) -> FlowMatchingSampler:
        self.ode_steps = options.flow_matching_ode_steps
        return self

    def load_state(self, state: dict[str, torch.Tensor]) -> FlowMatchingSampler:
        first = state["net.0.weight"]
        self.net = Velocity(first.shape[1] - 1 - 2 * Velocity.FREQUENCIES, first.shape[0])
        self.net.load_state_dict(state)
        self.net.eval()
        return self

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.randn(n, self.net.standardise.shift.shape[0], generator=generator)
        h = 1.0 / self.ode_steps
        for i in range(self.ode_steps):
            ts = torch.full((n,), i * h)
            x = x + h * self.net(x + 0.5 * h * self.net(x, ts), ts + 0.5 * h)  # one midpoint step
        return self.net.standardise.inverse(x)

    def _divergence(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """tr ∂v/∂x at each code of x (n, d), exactly: the Jacobian's diagonal, one vmapped jacrev."""
        ts = torch.full((1,), t, dtype=x.dtype)
        jac = torch.func.vmap(torch.func.jacrev(lambda xi: self.net(xi[None], ts)[0]))(x)      # (n, d, d)
        return jac.diagonal(dim1=-2, dim2=-1).sum(-1)

    @torch.no_grad()
    def log_prob(self, z: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
        """log-density of codes (n, d) under the ODE (class docstring), in nats."""
        out = []
        h = 1.0 / self.ode_steps
        for x in z.float().split(chunk):
            x = self.net.standardise(x)
            integral = torch.zeros(len(x))
            for i in range(self.ode_steps, 0, -1):  # from t = 1 back to 0, midpoint rule on the trace too
                t = i * h
                ts = torch.full((len(x),), t)
                mid = x - 0.5 * h * self.net(x, ts)
                integral = integral + h * self._divergence(mid, t - 0.5 * h)
                x = x - h * self.net(mid, ts - 0.5 * h)
            out.append(standard_normal_log_density(x) - integral - self.net.standardise.log_scale.sum())
        return torch.cat(out)
