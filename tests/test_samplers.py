"""The ex-post samplers' own rules, against their references: the two-stage sampler draws as Dai & Wipf's
``generate()`` (z = f(u) + γε) and trains on posterior draws with their learning-rate schedule; bad options and
damaged kept states are refused in one line; a kept file is bound to the weights it was fitted to (refitted with
a warning when they changed, under its own name beside another weights file, kept across the Hub export); the
API fits every sampler and answers in Python terms; a sampler flag that would have no effect is refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import evaluate
import sample
from conftest import cli
from models.samplers import CodeVAE, GaussianMixtureSampler, SamplerOptions, TwoStageSampler
from utils.errors import UserError
from utils.evaluation import samplers as kept_module
from utils.files import save_tensors
from utils.inference import TrainedVAE
from utils.inference import export as exporter
from utils.inference import trained as trained_module

SMALL = {"gmm": ["--gmm_components", "2"], "two_stage": ["--two_stage_steps", "5"],
         "flow": ["--flow_layers", "2", "--flow_hidden", "8", "--flow_steps", "5"],
         "flow_matching": ["--flow_matching_hidden", "8", "--flow_matching_steps", "5",
                           "--flow_matching_ode_steps", "2"]}


def test_two_stage_draws_its_decoders_mean_plus_gamma_noise():
    """z = f(u) + γε, u and ε drawn in that order from the generator: the authors' generate(); a constant decoder
    leaves only the noise, whose variance is γ²."""
    two = TwoStageSampler().fit(torch.randn(64, 3), SamplerOptions(two_stage_steps=3, two_stage_hidden=[8]))
    g = torch.Generator().manual_seed(2)
    u, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    with torch.no_grad():
        by_hand = two.net.decoder(u) + torch.exp(two.net.log_gamma) * eps
    assert torch.allclose(two.sample(5, torch.Generator().manual_seed(2)), by_hand)
    with torch.no_grad():
        for layer in two.net.decoder:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
        two.net.log_gamma.fill_(torch.log(torch.tensor(0.3)))
    drawn = two.sample(20000, torch.Generator().manual_seed(0))
    assert drawn.var(0).tolist() == pytest.approx([0.09] * 3, rel=0.05)


def test_two_stage_trains_on_posterior_draws_with_the_authors_schedule(monkeypatch):
    """Each step's batch is z = μ + σε for images drawn with the fit's seed (the authors' stage-2 input, fresh noise
    each time); the learning rate halves at 3/8 and 3/4 of the run (the authors' epochs 300 and 600 of 800)."""
    means, stds = torch.randn(40, 2), torch.rand(40, 2) + 0.5
    seen = []
    loss = CodeVAE.loss
    monkeypatch.setattr(CodeVAE, "loss", lambda self, z: (seen.append(z.clone()), loss(self, z))[1])
    TwoStageSampler().fit(means, SamplerOptions(two_stage_steps=2, two_stage_hidden=[4], seed=3), stds)
    g = torch.Generator().manual_seed(3)
    for z in seen:
        idx = torch.randint(40, (40,), generator=g)
        assert torch.equal(z, means[idx] + stds[idx] * torch.randn(40, 2, generator=g))
    rates = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a: (rates.append(self.param_groups[0]["lr"]),
                                                                      step(self, *a))[1])
    TwoStageSampler().fit(torch.randn(32, 2), SamplerOptions(two_stage_steps=8, two_stage_hidden=[4]))
    assert rates == pytest.approx([1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 2)


@pytest.mark.parametrize("bad", [{"two_stage_steps": -5}, {"two_stage_steps": 0}, {"gmm_components": 0},
                                 {"gmm_components": 2.5}, {"gmm_components": True}, {"gmm_covariance": "round"},
                                 {"two_stage_hidden": []}, {"two_stage_hidden": [16, -1]}, {"seed": "x"}])
def test_bad_sampler_options_are_refused_when_made(bad):
    with pytest.raises(UserError) as e:
        SamplerOptions(**bad)
    assert "\n" not in str(e.value) and next(iter(bad)) in str(e.value)


def gmm_state(k: int = 2, d: int = 3) -> dict[str, torch.Tensor]:
    return {"weights": torch.full((k,), 1 / k, dtype=torch.float64), "means": torch.zeros(k, d, dtype=torch.float64),
            "cholesky": torch.eye(d, dtype=torch.float64).repeat(k, 1, 1)}


def test_each_sampler_checks_a_kept_state():
    opts = SamplerOptions(gmm_components=2, two_stage_hidden=[8])
    assert GaussianMixtureSampler.problems(gmm_state(), 3, opts) is None
    nan = gmm_state()
    nan["means"][0, 0] = float("nan")
    upper = gmm_state()
    upper["cholesky"][1, 0, 2] = 1.0
    bad = {"z": (gmm_state(d=4), "expected (2, 3)"), "few": (gmm_state(k=1), "expected (2,)"),
           "missing": ({k: v for k, v in gmm_state().items() if k != "means"}, "expected"),
           "nan": (nan, "not finite"), "upper": (upper, "Cholesky"),
           "weights": ({**gmm_state(), "weights": torch.tensor([0.9, 0.9], dtype=torch.float64)}, "distribution")}
    for name, (state, says) in bad.items():
        assert says in GaussianMixtureSampler.problems(state, 3, opts), name
    two = TwoStageSampler().fit(torch.randn(16, 3), SamplerOptions(two_stage_steps=1, two_stage_hidden=[8])).state()
    assert TwoStageSampler.problems(two, 3, opts) is None
    assert "expected" in TwoStageSampler.problems(two, 4, opts)
    assert "missing" in TwoStageSampler.problems({k: v for k, v in two.items() if k != "log_gamma"}, 3, opts)
    assert "not finite" in TwoStageSampler.problems({**two, "log_gamma": torch.tensor(float("inf"))}, 3, opts)


@pytest.fixture
def run(mnist_300, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(mnist_300, copy)
    return copy


def fit_cli(run, name: str = "gmm", *extra: str):
    return cli(sample.main, ["--exp_dir", str(run), "--sampler", name, *SMALL[name], "--n_samples", "4", *extra])


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.slow  # fits samplers to a trained run through sample.py, and again after it trains on
def test_a_kept_sampler_is_bound_to_its_weights(run, tmp_path, monkeypatch):
    assert fit_cli(run).returncode == 0
    kept = run / "samplers" / "gmm.safetensors"
    vae = TrainedVAE.load(run)
    assert metadata(kept)["weights_sha256"] == kept_module.model_fingerprint(vae)
    # the run trains on (one weight changes): the kept mixture is fitted again, with a warning, not reused
    weights = load_file(run / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_tensors(weights, run / "model.safetensors")
    res = fit_cli(run)
    assert res.returncode == 0 and "warning: " in res.stderr and "fitted to other weights" in res.stderr
    assert metadata(kept)["weights_sha256"] == kept_module.model_fingerprint(TrainedVAE.load(run))
    assert "warning" not in fit_cli(run).stderr  # bound now: reused quietly
    # a file kept without that record is fitted again too
    save_tensors(load_file(kept), kept, metadata={k: v for k, v in metadata(kept).items() if k != "weights_sha256"})
    assert "keeps no record" in fit_cli(run).stderr
    # another weights file beside it gets samplers of its own, and the run's stay as they were
    before = kept.read_bytes()
    other = run / "other.safetensors"
    save_tensors({k: v * 1.01 for k, v in weights.items()}, other)
    res = cli(sample.main, ["-c", str(run / "config.yaml"), "--weights", str(other), "--sampler", "gmm",
                            *SMALL["gmm"], "--save_dir", str(tmp_path / "out")])
    assert res.returncode == 0, res.stderr
    assert (run / "samplers" / "other" / "gmm.safetensors").is_file() and kept.read_bytes() == before
    # exported, the same tensors keep their sampler: drawn without reading any data
    hub = tmp_path / "hub"
    res = cli(exporter.main, [str(run), str(hub)])
    assert res.returncode == 0 and "left out" in res.stderr  # the other weights' folder stays behind
    assert sorted(p.name for p in (hub / "samplers").iterdir()) == ["gmm.safetensors"]
    monkeypatch.setattr(trained_module, "load_data", lambda *a, **k: pytest.fail("a refit read the data"))
    assert TrainedVAE.load(hub).sample(3, sampler="gmm", options=SamplerOptions(gmm_components=2)).shape[0] == 3


def damage(path, how: str) -> None:
    """Damage a kept file in one of the ways a real one is damaged, keeping its binding to the model."""
    meta, state = metadata(path), load_file(path)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
        return
    first = next(iter(state))
    if how == "missing":
        state = {k: v for k, v in state.items() if k != first}
    elif how == "nan":
        state = {**state, first: torch.full_like(state[first], float("nan"))}
    else:  # as if fitted to codes of one more dimension
        state = {k: torch.cat([v, v[..., :1]], -1) if v.dim() else v for k, v in state.items()}
    save_tensors(state, path, metadata=meta)


@pytest.mark.slow  # fits both samplers (the two-stage one trains) through sample.py
def test_a_damaged_kept_file_is_refused_in_one_line_everywhere(run, tmp_path):
    """sample.py and the API refuse it naming the file and the fix (Python's fix from Python); evaluate.py too,
    before writing anything; the exporter leaves it (and a temporary) out with a warning line each."""
    good = {}
    for name in ("gmm", "two_stage"):
        assert fit_cli(run, name).returncode == 0
        good[name] = (run / "samplers" / f"{name}.safetensors").read_bytes()
    for how in ("truncated", "missing", "nan", "other z"):
        for name in ("gmm", "two_stage"):
            path = run / "samplers" / f"{name}.safetensors"
            path.write_bytes(good[name])
            damage(path, how)
            res = fit_cli(run, name)
            assert res.returncode == 2 and str(path) in res.stderr and "--refit" in res.stderr, (how, res.stderr)
            assert len(res.stderr.splitlines()) == 1
            with pytest.raises(UserError, match="refit=True") as e:
                TrainedVAE.load(run).sample(2, sampler=name, options=SamplerOptions(gmm_components=2,
                                                                                     two_stage_steps=5))
            assert "--" not in str(e.value)
        (run / "samplers" / "gmm.safetensors.tmp").write_bytes(b"half")  # a fit's leftover
        hub = tmp_path / f"hub-{how}"
        res = cli(exporter.main, [str(run), str(hub)])
        assert res.returncode == 0 and res.stderr.count("warning: ") == 3, res.stderr  # two files, a temporary
        assert not (hub / "samplers").exists()
    res = cli(evaluate.main, ["--exp_dir", str(run), "--metrics", "samplers", *sum(SMALL.values(), []),
                              "--n_test", "50", "--out", str(tmp_path / "eval.json")])
    assert res.returncode == 2 and "--refit" in res.stderr and not (tmp_path / "eval.json").exists()
    assert fit_cli(run, "gmm", "--refit").returncode == 0  # the fix the line gives


def test_the_api_fits_every_sampler_and_answers_in_python(run):
    vae = TrainedVAE.load(run)
    quick = SamplerOptions(two_stage_steps=5, gmm_components=2)
    for name in ("gmm", "two_stage"):
        x = vae.sample(2, sampler=name, options=quick, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 1, 28, 28) and (run / "samplers" / f"{name}.safetensors").is_file()
    with pytest.raises(UserError, match=r"gmm_components=2 \(asked: 10\): pass refit=True") as e:
        vae.sample(2, sampler="gmm")
    assert "--" not in str(e.value)
    assert vae.sample(2, sampler="gmm", options=SamplerOptions(gmm_components=3), refit=True).shape[0] == 2
    calls = [dict(n=0), dict(n=-3), dict(n=2.5), dict(n=2, batch_size=0), dict(n=2, labels=torch.tensor([1, 2])),
             dict(n=2, sampler="bogus"), dict(n=2, sampler="gmm", options={"gmm_components": 2})]
    for kwargs in calls:
        with pytest.raises(UserError) as e:
            vae.sample(**kwargs)
        assert "\n" not in str(e.value) and "--" not in str(e.value), kwargs


@pytest.mark.parametrize("argv, says", [
    (["--mode", "reconstruct", "--sampler", "bogus"], "--sampler has no effect"),
    (["--mode", "visualize_latent", "--refit"], "--refit"),
    (["--mode", "traverse", "--two_stage_steps", "5"], "--two_stage_steps is an option of --sampler two_stage"),
    (["--mode", "sample", "--sampler", "two_stage", "--gmm_components", "3"], "--gmm_components"),
    (["--mode", "sample", "--refit"], "--refit fits a sampler again"),
    (["--mode", "sample", "--sampler", "gmm", "--gmm_components", "0"], "gmm_components must be"),
    (["--mode", "interpolate", "--sampler", "bogus", "--refit"], "unknown --sampler 'bogus'"),
])
def test_sample_refuses_a_sampler_flag_it_would_ignore(argv, says):
    res = cli(sample.main, ["--exp_dir", "nowhere", *argv])
    assert res.returncode == 2 and says in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr


@pytest.mark.parametrize("argv, says", [
    (["--metrics", "recon", "--sampler", "bogus"], "--sampler chooses"),
    (["--metrics", "recon", "--two_stage_steps", "5"], "fits no sampler"),
    (["--metrics", "elbo", "--refit"], "--refit"),
    (["--metrics", "fid", "--sampler", "gmm", "--two_stage_steps", "5"], "--two_stage_steps"),
])
def test_evaluate_refuses_a_sampler_flag_it_would_ignore(mnist_300, tmp_path, argv, says):
    res = cli(evaluate.main, ["--exp_dir", str(mnist_300), *argv, "--out", str(tmp_path / "e.json")])
    assert res.returncode == 2 and says in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert not (tmp_path / "e.json").exists()

