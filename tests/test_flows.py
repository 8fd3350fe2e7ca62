"""The normalising-flow and flow-matching samplers against references: the flow's log-density is its change of
variables computed by hand in float64; flow matching recovers a known 2-D mixture (moments and an MMD
two-sample test that N(0, I) fails) and its ODE log-density is exact for a linear velocity field; fits are
bit-reproducible; damaged states are refused; kept fits are reused (same bytes, no fit) through sample.py, whose
same seed gives the same bytes, and through the API."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

import sample
from conftest import cli
from models.flows import FlowMatchingSampler, FlowSampler, Standardise
from models.sampler_rules import SamplerOptions
from utils.errors import UserError
from utils.inference import TrainedVAE
from utils.inference import export as exporter
from utils.inference import trained as trained_module

CENTRES = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
SPREAD = 0.4


def mixture(n: int, g: torch.Generator) -> torch.Tensor:
    """Draws of three equally weighted Gaussians of standard deviation SPREAD about CENTRES."""
    return CENTRES[torch.randint(3, (n,), generator=g)] + SPREAD * torch.randn(n, 2, generator=g)


def mixture_moments() -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture's mean and covariance, by hand: the centres' mean and covariance (1/3 each) plus SPREAD² I."""
    mean = CENTRES.mean(0)
    diff = CENTRES - mean
    return mean, diff.T @ diff / 3 + SPREAD ** 2 * torch.eye(2)


def mmd_p_value(a: torch.Tensor, b: torch.Tensor, permutations: int = 200) -> float:
    """The permutation p-value of the (biased) MMD² between samples a and b, Gaussian kernel at the median
    squared distance (Gretton et al. 2012)."""
    x, n = torch.cat([a, b]).double(), len(a)
    d2 = torch.cdist(x, x).pow(2)
    k = torch.exp(-d2 / d2[d2 > 0].median())
    sign = torch.cat([torch.full((n,), 1.0 / n), torch.full((len(b),), -1.0 / len(b))]).double()

    def mmd(w: torch.Tensor) -> float:  # mean k(a, a') + mean k(b, b') - 2 mean k(a, b) = wᵀ K w
        return (w @ k @ w).item()

    g = torch.Generator().manual_seed(0)
    seen = mmd(sign)
    null = [mmd(sign[torch.randperm(len(x), generator=g)]) for _ in range(permutations)]
    return (1 + sum(v >= seen for v in null)) / (permutations + 1)


def test_the_flows_log_density_is_its_change_of_variables():
    """log p(x) = log N(f(x); 0, I) + log |det ∂f/∂x|, with the Jacobian of the whole map (standardisation and
    every coupling) taken by autograd in float64, against the flow's own triangular log-determinants."""
    g = torch.Generator().manual_seed(0)
    flow = FlowSampler().fit(torch.randn(64, 3) * 2 + 1, SamplerOptions(flow_layers=3, flow_hidden=8, flow_steps=2))
    net = flow.net.double()
    with torch.no_grad():  # far from the identity a fit starts at: every weight drawn
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        net.standardise.shift.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        net.standardise.log_scale.copy_(0.3 * torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(6, 3, generator=g, dtype=torch.float64) * 2
    by_hand = []
    for xi in x:
        f = lambda v: net(v[None])[0][0]  # noqa: E731
        jac = torch.autograd.functional.jacobian(f, xi)
        u = f(xi).detach()
        by_hand.append(-0.5 * u.pow(2).sum() - 1.5 * math.log(2 * math.pi) + torch.linalg.slogdet(jac)[1])
    assert torch.allclose(net.log_prob(x).detach(), torch.stack(by_hand), rtol=0, atol=1e-10)
    assert torch.allclose(flow.log_prob(x), torch.stack(by_hand).float(), atol=1e-4)
    # and it samples by inverting that map: f(draw) is the generator's N(0, I) draw
    flow.net.float()
    u = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    drawn = flow.sample(5, torch.Generator().manual_seed(3))
    assert torch.allclose(flow.net(drawn)[0].detach(), u, atol=1e-4)


def test_fits_are_seeded_and_bit_reproducible():
    codes = torch.randn(200, 4)
    for cls, opts in ((FlowSampler, dict(flow_layers=2, flow_hidden=8, flow_steps=20)),
                      (FlowMatchingSampler, dict(flow_matching_hidden=8, flow_matching_steps=20))):
        one, two = (cls().fit(codes, SamplerOptions(**opts)).state() for _ in range(2))
        other = cls().fit(codes, SamplerOptions(**opts, seed=1)).state()
        assert all(torch.equal(one[k], two[k]) for k in one), cls
        assert not all(torch.equal(one[k], other[k]) for k in one), cls


@pytest.mark.slow  # trains a velocity field for 2,000 steps (about 5 to 10 s on one core)
def test_flow_matching_recovers_a_known_mixture():
    """Trained on 4,000 draws of a 3-component 2-D mixture: its draws have the mixture's moments, and an MMD
    two-sample test against fresh mixture draws passes, where the same test rejects N(0, I)."""
    opts = SamplerOptions(flow_matching_steps=2000, flow_matching_hidden=64, flow_matching_ode_steps=16)
    fm = FlowMatchingSampler().fit(mixture(4000, torch.Generator().manual_seed(0)), opts).drawing(opts)
    drawn = fm.sample(1000, torch.Generator().manual_seed(1))
    mean, cov = mixture_moments()
    assert torch.allclose(drawn.mean(0), mean, atol=0.1)
    assert torch.allclose(torch.cov(drawn.T), cov, atol=0.3)
    reference = mixture(1000, torch.Generator().manual_seed(5))
    assert mmd_p_value(drawn, reference) > 0.05
    assert mmd_p_value(torch.randn(1000, 2, generator=torch.Generator().manual_seed(2)), reference) < 0.01


class Linear(nn.Module):
    """A velocity field v(x, t) = A x: the ODE's map is x1 = e^A x0, so log p1(x1) = log N(e^{-A} x1) - tr A."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a
        self.standardise = Standardise(len(a))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T


def test_flow_matchings_log_density_is_the_odes_change_of_variables():
    a = torch.tensor([[0.3, -0.5], [0.2, -0.4]])
    fm = FlowMatchingSampler()
    fm.net, fm.ode_steps = Linear(a), 64
    x1 = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    x0 = x1 @ torch.linalg.matrix_exp(-a).T
    exact = -0.5 * x0.pow(2).sum(-1) - math.log(2 * math.pi) - torch.trace(a)
    assert torch.allclose(fm.log_prob(x1), exact, atol=1e-4)
    assert torch.allclose(fm.sample(7, torch.Generator().manual_seed(4)),
                          torch.randn(7, 2, generator=torch.Generator().manual_seed(4)) @ torch.linalg.matrix_exp(a).T,
                          atol=1e-4)


def test_each_checks_a_kept_state():
    opts = SamplerOptions(flow_layers=2, flow_hidden=8, flow_steps=1, flow_matching_hidden=8, flow_matching_steps=1)
    for cls in (FlowSampler, FlowMatchingSampler):
        state = cls().fit(torch.randn(32, 3), opts).state()
        assert cls.problems(state, 3, opts) is None
        assert cls().load_state(state).sample(2).shape == (2, 3)
        first = sorted(k for k in state if state[k].dim())[0]
        assert "expected" in cls.problems(state, 4, opts), cls
        assert "missing" in cls.problems({k: v for k, v in state.items() if k != first}, 3, opts)
        assert "not finite" in cls.problems({**state, first: torch.full_like(state[first], float("nan"))}, 3, opts)
        wider = SamplerOptions(flow_layers=3, flow_hidden=9, flow_matching_hidden=9)
        assert cls.problems(state, 3, wider) is not None


QUICK = {"flow": ["--flow_layers", "2", "--flow_hidden", "16", "--flow_steps", "30"],
         "flow_matching": ["--flow_matching_ode_steps", "4", "--flow_matching_hidden", "16",
                           "--flow_matching_steps", "30"]}


@pytest.fixture
def run(mnist_300, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(mnist_300, copy)
    return copy


@pytest.mark.parametrize("name", ["flow", "flow_matching"])
def test_sample_draws_the_same_bytes_and_reuses_the_kept_fit(run, tmp_path, name, monkeypatch):
    """sample.py fits once, keeps the file with its options, and on a second call reuses it (the fit is not
    called, the file keeps its bytes) and writes the same image bytes; slerp interpolates between its codes; other
    options of the fit are refused until --refit, while the ODE's steps, a setting of drawing, reuse the fit."""
    argv = ["--exp_dir", str(run), "--sampler", name, *QUICK[name], "--n_samples", "9", "--seed", "3"]
    first = cli(sample.main, [*argv, "--save_dir", str(tmp_path / "a")])
    assert first.returncode == 0, first.stderr
    kept = run / "samplers" / f"{name}.safetensors"
    before = kept.read_bytes()
    cls = FlowSampler if name == "flow" else FlowMatchingSampler
    monkeypatch.setattr(cls, "fit", lambda *a, **k: pytest.fail("a kept fit was fitted again"))
    again = cli(sample.main, [*argv, "--save_dir", str(tmp_path / "b")])
    assert again.returncode == 0, again.stderr
    png = f"samples_{name}.png"
    assert (tmp_path / "a" / png).read_bytes() == (tmp_path / "b" / png).read_bytes()
    assert kept.read_bytes() == before
    if name == "flow_matching":
        fewer = cli(sample.main, [*argv[:-2], "--flow_matching_ode_steps", "2", "--seed", "3", "--save_dir",
                                  str(tmp_path / "d")])
        assert fewer.returncode == 0, fewer.stderr
        assert (tmp_path / "d" / png).read_bytes() != (tmp_path / "a" / png).read_bytes()
        assert kept.read_bytes() == before
    slerp = cli(sample.main, ["--exp_dir", str(run), "--sampler", name, *QUICK[name], "--mode", "interpolate",
                              "--interp", "slerp", "--save_dir", str(tmp_path / "c")])
    assert slerp.returncode == 0 and f"interpolate_{name}_slerp.png" in slerp.stdout, slerp.stderr + slerp.stdout
    changed = [*QUICK[name][:-1], str(int(QUICK[name][-1]) + 1)]
    refused = cli(sample.main, ["--exp_dir", str(run), "--sampler", name, *changed])
    assert refused.returncode == 2 and "--refit" in refused.stderr and len(refused.stderr.splitlines()) == 1
    monkeypatch.undo()
    assert cli(sample.main, ["--exp_dir", str(run), "--sampler", name, *changed, "--refit"]).returncode == 0
    assert kept.read_bytes() != before


def test_the_api_draws_from_both_the_exporter_copies_them_and_a_truncated_file_is_refused(run, tmp_path,
                                                                                           monkeypatch):
    vae = TrainedVAE.load(run)
    opts = SamplerOptions(flow_layers=2, flow_hidden=8, flow_steps=5, flow_matching_hidden=8,
                          flow_matching_steps=5, flow_matching_ode_steps=2)
    drawn = {name: vae.sample(2, sampler=name, options=opts, generator=torch.Generator().manual_seed(0))
             for name in ("flow", "flow_matching")}
    assert cli(exporter.main, [str(run), str(tmp_path / "hub")]).returncode == 0
    monkeypatch.setattr(trained_module, "load_data", lambda *a, **k: pytest.fail("a refit read the data"))
    hub = TrainedVAE.load(tmp_path / "hub")
    for name, x in drawn.items():
        assert x.shape == (2, 1, 28, 28)
        assert torch.equal(hub.sample(2, sampler=name, options=opts, generator=torch.Generator().manual_seed(0)), x)
    for name in drawn:
        path = run / "samplers" / f"{name}.safetensors"
        path.write_bytes(path.read_bytes()[:200])
        with pytest.raises(UserError, match="refit=True") as e:
            vae.sample(2, sampler=name, options=opts)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
