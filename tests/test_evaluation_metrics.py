"""evaluate.py and its metrics: IWAE against the ELBO and against a closed-form likelihood, active units,
disentanglement known answers, FID, and the command line on real runs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import evaluate
from conftest import cli, reset_accelerate, train
from models.gaussian import gaussian_log_density
from models.likelihoods import Likelihood, LikelihoodTerms, gaussian_nll
from models.vae import VAE
from utils.config import DataConfig, load_config
from utils.data.dsprites import FACTOR_SIZES
from utils.data.registry import load_data
from utils.data.splits import ImageSplit
from utils.errors import guarded_main
from utils.evaluation.bounds import image_bounds, latent_usage, likelihood_bounds
from utils.evaluation.disentanglement import beta_vae_metric, dci, factor_vae_metric, mig, representation, sap
from utils.evaluation.fid import build_fid
from utils.inference.loading import load_trained


@pytest.fixture
def accelerator() -> Accelerator:
    reset_accelerate()  # not one left by an in-process run, with its precision
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def mnist_run(mnist_300, tmp_path_factory):
    """The session's 300-step MNIST run (z=8), copied: evaluate.py writes eval.json into it."""
    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(mnist_300, run)
    return run


@pytest.fixture(scope="module")
def mnist_test(real_data):
    return load_data(DataConfig(name="mnist", root=str(real_data), download=False))[1]


def test_iwae_bounds_the_elbo_and_tightens_with_k(mnist_run, mnist_test, accelerator):
    _, vae, _, _ = load_trained(str(mnist_run), None, None)
    bounds = {k: likelihood_bounds(vae, mnist_test, k, accelerator, batch_size=50, limit=200, seed=1)
              for k in (1, 10, 100)}
    # the ELBO estimate is the same quantity whatever k (MC error only); the IWAE bound tightens with k
    assert bounds[1]["nll"] == pytest.approx(-bounds[1]["elbo"], abs=1.0)
    assert bounds[10]["nll"] <= -bounds[10]["elbo"]
    assert bounds[100]["nll"] < bounds[10]["nll"] < bounds[1]["nll"] + 0.5
    assert bounds[100]["nll_bpd"] == pytest.approx(bounds[100]["nll"] / (784 * math.log(2)))


class _Linear(Likelihood):
    """Gaussian with the decoder output as its mean (no sigmoid): p(x|z) = N(Wz + b, s²I)."""

    continuous = False  # the test data is real-valued, not 8-bit: no dequantisation
    mean = staticmethod(lambda out: out)

    def forward(self, x, out):
        nll = gaussian_nll(x, out, torch.tensor(math.log(0.5)))
        return LikelihoodTerms(nll, nll, None)


class _Floats(ImageSplit):
    labels = None

    def __init__(self, x):
        self.x, self.shape = x, tuple(x.shape[1:])

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        return self.x[idx.cpu()]


def test_iwae_on_a_linear_gaussian_vae_with_known_likelihood(accelerator):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, 0.25 I) has p(x) = N(b, WWᵀ + 0.25 I) in closed form.

    With a deliberately imperfect Gaussian encoder, the ELBO falls short of log p(x)
    by KL(q || posterior); the IWAE bound with k = 2000 must close almost all of
    that gap. For such a well-behaved (Gaussian-weight) problem the remaining bias
    is about Var(w)/(2k) ~ 1e-3 nats, so 0.02 nats leaves room for MC error.
    """
    torch.manual_seed(0)
    d, zd = 3, 2
    w, b = torch.randn(d, zd), torch.randn(d)
    cfg = load_config(None, ["model.z_dim=2", "model.hidden=4"])
    vae = VAE(cfg.model, cfg.loss, (1, 1, d), cfg.train.batch_size)
    vae.likelihood = _Linear()
    dec = nn.Linear(zd, d)
    dec.weight.data, dec.bias.data = w, b
    vae.decoder = nn.Sequential(dec, nn.Unflatten(1, (1, 1, d)))
    # exact posterior: Σ = (I + WᵀW/s²)⁻¹, m = Σ Wᵀ(x − b)/s²; the encoder is off by design
    s2 = 0.25
    cov = torch.linalg.inv(torch.eye(zd) + w.T @ w / s2)
    gain = cov @ w.T / s2

    class Encoder(nn.Module):
        def forward(self, x):
            m = (x.flatten(1) - b) @ gain.T
            return 0.8 * m, torch.log(torch.diagonal(cov)).expand(len(x), zd) + 0.5

    vae.encoder = Encoder()
    x = torch.distributions.MultivariateNormal(b, w @ w.T + s2 * torch.eye(d)).sample((64,))
    true_nll = -torch.distributions.MultivariateNormal(b, w @ w.T + s2 * torch.eye(d)).log_prob(x).mean().item()
    data = _Floats(x.view(64, 1, 1, d))
    bounds = likelihood_bounds(vae, data, 2000, accelerator, batch_size=16, max_rows=4000)
    gap = -bounds["elbo"] - true_nll
    assert gap > 0.05  # the encoder really is imperfect
    assert -0.02 < bounds["nll"] - true_nll < 0.02  # IWAE recovers the true likelihood
    assert bounds["n"] == 64


def test_the_fast_bound_is_the_plain_one_for_a_vamp_prior_bernoulli_model():
    """The bounds' fast parts (the Bernoulli sum without k copies of the image, the VampPrior in float32 about
    each posterior and its kept component table) against the plain ones, on the same draws: the k-sample bound
    computed by hand with the cross-entropy of the repeated images and the float64 mixture density."""
    cfg = load_config("configs/binarized_mnist_vamp.yaml", ["model.hidden=[64, 64]", "model.vamp_components=50"])
    torch.manual_seed(0)
    vae = VAE(cfg.model, cfg.loss, (1, 28, 28), 100).eval()
    with torch.no_grad():  # components spread over the code space, narrow, as a trained model's
        vae.prior.pseudo.copy_(torch.rand_like(vae.prior.pseudo))
        for p in vae.encoder.parameters():
            p.mul_(3)
        last = [m for m in vae.encoder.modules() if isinstance(m, nn.Linear)][-1]
        last.bias[cfg.model.z_dim:] -= 5.0  # the log-variances' half: σ² about e^-5
    x, k = torch.bernoulli(torch.rand(6, 1, 28, 28) * 0.5), 64
    torch.manual_seed(1)
    bound, rec, _ = image_bounds(vae, x, k, chunk=k)
    torch.manual_seed(1)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(k, *mu.shape)
        copies = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        log_px_z = -nn.functional.binary_cross_entropy_with_logits(
            vae.decoder_out_k(z), copies, reduction="none").flatten(1).sum(1).view(k, -1)
        log_w = log_px_z + vae.prior.log_prob(z) - gaussian_log_density(z, mu, logvar)
        plain = torch.logsumexp(log_w.double(), 0) - math.log(k)
    assert logvar.exp().min() < 0.01 and mu.abs().max() > 3  # narrow posteriors, far from 0
    # float32 sums of 784 terms at about 8,000 nats: another summation order (another CPU's kernels) moves them by
    # a few units in the last place, about 1e-3; a wrong fast part is off by whole nats
    assert torch.allclose(bound.double(), plain, rtol=1e-6, atol=0)
    assert torch.allclose(rec.double(), -log_px_z.double().mean(0), rtol=1e-6, atol=0)


def test_active_units_with_known_collapsed_dimensions(mnist_test, accelerator):
    cfg = load_config(None, ["model.z_dim=6", "model.hidden=32"])
    vae = VAE(cfg.model, cfg.loss, (1, 28, 28), cfg.train.batch_size)
    inner = vae.encoder

    class Collapsed(nn.Module):  # dimensions 3-5 always return the prior: E[z] = 0, no information
        def forward(self, x):
            mu, logvar = inner(x)
            mask = torch.tensor([1.0, 1, 1, 0, 0, 0])
            return mu * 5 * mask, logvar * mask

    vae.encoder = Collapsed()
    usage = latent_usage(vae, mnist_test, accelerator, limit=500)
    assert usage["active_units"] == 3
    assert usage["kl_per_dim"][3:] == [0.0, 0.0, 0.0] and min(usage["kl_per_dim"][:3]) > 0


def _truth(classes: torch.Tensor) -> torch.Tensor:
    """Codes equal to the true factors, each scaled to unit variance."""
    sizes = torch.tensor(FACTOR_SIZES, dtype=torch.float32)
    return (classes.float() - (sizes - 1) / 2) / torch.sqrt((sizes**2 - 1) / 12)


def test_disentanglement_known_answers():
    g = torch.Generator().manual_seed(0)
    perfect = [beta_vae_metric(_truth, FACTOR_SIZES, g, n_train=600, n_eval=300)["eval_accuracy"],
               factor_vae_metric(_truth, FACTOR_SIZES, g, n_train=600, n_eval=300, n_variance=2000)["eval_accuracy"],
               mig(_truth, FACTOR_SIZES, g, n=4000)["mig"]]
    assert perfect[0] > 0.99 and perfect[1] > 0.99
    assert perfect[2] > 0.8  # 20 bins cannot separate 40 orientations or 32 positions fully: log 20 / log 40 = 0.81

    def noise(classes):
        return torch.randn(len(classes), 5, generator=torch.Generator().manual_seed(len(classes)))

    chance = [beta_vae_metric(noise, FACTOR_SIZES, g, n_train=600, n_eval=300)["eval_accuracy"],
              factor_vae_metric(noise, FACTOR_SIZES, g, n_train=600, n_eval=300, n_variance=2000)["eval_accuracy"],
              mig(noise, FACTOR_SIZES, g, n=4000)["mig"]]
    assert 0.1 < chance[0] < 0.35 and 0.1 < chance[1] < 0.35  # chance is 1/5
    assert chance[2] < 0.05


def test_fid_with_a_custom_feature_extractor(mnist_test):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    x = mnist_test.batch(torch.arange(600)).expand(-1, 3, -1, -1)

    def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
        metric = build_fid(features=net)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        return float(metric.compute())

    assert abs(fid(x, x)) < 1e-3  # identical sets
    digits = fid(x[:300], x[300:])  # two sets of real digits
    assert fid(x[:300], torch.rand_like(x[300:])) > 5 * digits  # digits vs noise: much further apart


def test_fid_score_feeds_samples_and_held_out_images_across_processes(mnist_run, mnist_test):
    """fid_score's batches (two processes' shares added into one metric, as DDP's sync would) give the FID of the
    decoded prior draws against the first n held-out images computed by hand with the same generators."""
    from utils.evaluation.fid import fid_score

    _, vae, _, _ = load_trained(str(mnist_run), None, None)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    metric = build_fid(features=net)
    for rank in (0, 1):
        fid_score(vae, mnist_test, metric, 250, 50, "cpu", rank=rank, world=2, seed=3)
    by_hand = build_fid(features=net)
    real = mnist_test.batch(torch.arange(250)).expand(-1, 3, -1, -1)
    generators = [torch.Generator().manual_seed(3 + rank) for rank in (0, 1)]
    with torch.no_grad():
        fake = torch.cat([vae.decode(vae.prior.sample(50, generators[b % 2])) for b in range(5)])
    by_hand.update(real, real=True)
    by_hand.update(fake.expand(-1, 3, -1, -1).clamp(0, 1), real=False)
    assert float(metric.compute()) == pytest.approx(float(by_hand.compute()), rel=1e-5)


def row(table: str, label: str) -> str:
    """The value printed beside ``label`` in evaluate.py's table."""
    (line,) = [ln for ln in table.splitlines() if ln.startswith(label + "  ")]
    return line[len(label):].strip()


def test_evaluate_cli_writes_eval_json(mnist_run):
    res = cli(evaluate.main, ["--exp_dir", str(mnist_run), "--k", "20", "--n_test", "300",
                              "--metrics", "elbo,nll,au,recon"])
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((mnist_run / "eval.json").read_text())
    assert result["metrics"] == ["elbo", "nll", "au", "recon"] and "fid" not in result
    assert result["nll"]["k"] == 20 and result["nll"]["n"] == 300
    assert result["nll"]["nll"] <= -result["elbo"]["elbo"]
    assert not result["nll"]["binarised"] and not result["nll"]["dequantised"]
    au = result["au"]
    assert au["z_dim"] == 8 and au["active_units"] == sum(v > 0.01 for v in au["variance"]) > 0
    assert 0 <= result["recon"]["mse"] < 0.2
    assert au["kl"] == pytest.approx(sum(au["kl_per_dim"]))
    # the mean of per-image PSNRs is at least the PSNR of the mean squared error (Jensen)
    assert result["recon"]["psnr"] >= -10 * math.log10(result["recon"]["mse"]) - 1e-6
    assert row(res.stdout, "NLL (IWAE, k=20)").startswith(f"{result['nll']['nll']:.2f} nats")
    assert row(res.stdout, "active units").startswith(f"{au['active_units']} of 8 (Var_x E[z] > 0.01)")
    assert f"wrote {mnist_run / 'eval.json'}" in res.stdout


def test_a_moved_run_finds_its_data_with_data_root(mnist_run, tmp_path, real_data):
    """A run trained where the data lay elsewhere: evaluate.py and sample.py take --data_root, and give the
    numbers and images of the run where it was trained."""
    import sample

    moved = tmp_path / "moved"
    shutil.copytree(mnist_run, moved)
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace(f"root: {real_data}", f"root: {tmp_path / 'elsewhere'}"))
    args = ["--metrics", "elbo", "--n_test", "200"]
    lost = cli(evaluate.main, ["--exp_dir", str(moved), *args, "--out", str(tmp_path / "x.json")])
    assert lost.returncode == 2 and "elsewhere" in lost.stderr
    for run, extra in ((mnist_run, []), (moved, ["--data_root", str(real_data)])):
        res = cli(evaluate.main, ["--exp_dir", str(run), *args, *extra, "--out", str(tmp_path / f"{run.name}.json")])
        assert res.returncode == 0, res.stderr[-2000:]
        res = cli(sample.main, ["--exp_dir", str(run), "--mode", "reconstruct", "--n_samples", "8", *extra,
                                "--save_dir", str(tmp_path / f"{run.name}-rec")])
        assert res.returncode == 0, res.stderr[-2000:]
    assert (json.loads((tmp_path / "run.json").read_text())["elbo"]
            == json.loads((tmp_path / "moved.json").read_text())["elbo"])
    [a], [b] = (list((tmp_path / f"{n}-rec").glob("*.png")) for n in ("run", "moved"))
    assert a.read_bytes() == b.read_bytes()


def test_binarised_test_set_is_one_draw_for_any_process_count_and_batch(real_data):
    """The binarised held-out set does not depend on the number of processes, the batch size or the device:
    every process's shares, put together, are torch.bernoulli of the whole set at once with the seed."""
    from types import SimpleNamespace

    from utils.data.splits import TensorImages
    from utils.evaluation.bounds import _held_out

    _, test, _ = load_data(DataConfig(root=str(real_data)))
    data = TensorImages(test.images[:250], None)
    whole = torch.bernoulli(data.batch(torch.arange(250)), generator=torch.Generator().manual_seed(7))

    def drawn(world: int, batch: int, seed: int) -> torch.Tensor:
        idx, x = zip(*(pair for r in range(world) for pair in _held_out(
            data, 250, batch, SimpleNamespace(num_processes=world, process_index=r, device=torch.device("cpu")),
            binarize_seed=seed)))
        return torch.cat(x)[torch.cat(idx).argsort()]  # in image order

    for world, batch in ((1, 250), (1, 64), (2, 100), (5, 50)):
        assert torch.equal(drawn(world, batch, 7), whole), (world, batch)
    assert not torch.equal(drawn(1, 64, 8), whole)


def test_evaluate_binarized_and_optimal_sigma(mnist_run, tmp_path, real_data):
    # a Bernoulli model on the stochastically binarised test set
    out = tmp_path / "binarized.json"
    res = cli(evaluate.main, ["--exp_dir", str(mnist_run), "--k", "5", "--n_test", "200", "--metrics", "nll",
                              "--binarize", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["nll"]["binarised"] and not result["nll"]["dequantised"] and result["nll"]["n"] == 200
    assert "200 held-out images, binarised" in res.stdout
    # an optimal-σ model: one σ for the whole test set, dequantised likelihood on the 8-bit scale
    run = tmp_path / "opt"
    train(run, "configs/mnist_optimal_sigma_vae.yaml", ["train.steps=20", "model.base_width=8"])
    res = cli(evaluate.main, ["--exp_dir", str(run), "--k", "5", "--n_test", "200"])
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["nll"]["dequantised"] and not result["nll"]["binarised"] and 0 < result["sigma"] < 1
    assert f"dequantised, 8-bit scale, sigma {result['sigma']:.4f}" in res.stdout
    refused = cli(evaluate.main, ["--exp_dir", str(run), "--binarize"])
    assert refused.returncode == 2 and "--binarize is for bernoulli models" in refused.stderr


@pytest.mark.slow  # trains on dSprites and scores every disentanglement metric
def test_evaluate_dsprites_disentanglement(tmp_path, real_data):
    run = tmp_path / "dsprites"
    train(run, "configs/dsprites.yaml", ["train.steps=10", "model.base_width=4", "train.batch_size=16"])
    res = cli(evaluate.main, ["--exp_dir", str(run), "--k", "2", "--n_test", "64", "--dis_train", "60",
                              "--dis_eval", "40", "--dis_variance", "300", "--mig_samples", "300",
                              "--dis_batch", "8", "--dci_train", "80", "--dci_test", "40", "--seed", "3"])
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads((run / "eval.json").read_text())["disentanglement"]
    assert d["sizes"] == {"batch": 8, "train": 60, "eval": 40, "variance": 300, "mig": 300, "dci_train": 80,
                          "dci_test": 40}
    # the same numbers as the metrics called directly on the model's codes, in evaluate.py's order (one
    # generator, seeded with --seed, shared by the five)
    cfg, vae, _, _ = load_trained(str(run), None, None)
    test = load_data(cfg.data)[1]
    codes, sizes = representation(vae, test.factors, torch.device("cpu")), FACTOR_SIZES
    g = torch.Generator().manual_seed(3)
    assert d["beta_vae"] == beta_vae_metric(codes, sizes, g, 8, 60, 40)
    assert d["factor_vae"] == factor_vae_metric(codes, sizes, g, 8, 60, 40, 300)
    assert d["mig"] == mig(codes, sizes, g, 300)
    assert d["dci"] == dci(codes, sizes, g, 80, 40, 3)
    assert d["sap"] == sap(codes, sizes, g, 80, 40)
    assert row(res.stdout, "MIG") == f"{d['mig']['mig']:.3f}"
    assert row(res.stdout, "beta-VAE metric") == f"{d['beta_vae']['eval_accuracy']:.3f}"


def test_evaluate_errors(mnist_run, tmp_path, capsys):
    cases = [
        (["--metrics", "disentanglement"], "only dsprites has"),
        (["--metrics", "elbo,speed"], "unknown metric 'speed'"),
        (["--metrics", "fid", "--fid_weights", str(tmp_path / "none.pth")], "--fid_weights"),
        (["--k", "0"], "--k must be at least 1"),
        (["--bogus", "1"], "unknown argument --bogus"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as e:
            guarded_main(evaluate.main, ["--exp_dir", str(mnist_run), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
