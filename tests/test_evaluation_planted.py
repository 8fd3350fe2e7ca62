"""A factor data set and a metric added as docs/extending.md shows, each in its own module and registry entry
alone: 8x8 bars from three known factors, scored by the disentanglement metrics to numbers derivable by
reasoning, and a metric with an option of its own, both run through evaluate.py's main."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import evaluate
import utils.inference.loading as loading
from conftest import cli, train
from utils.data.config import DataConfig
from utils.data.factors import Factors
from utils.data.registry import DATASETS, DataSet, load_data
from utils.data.splits import TensorImages, seeded_split
from utils.evaluation.disentanglement import beta_vae_metric, dci, factor_vae_metric, mig, representation
from utils.evaluation.metrics import METRICS, Metric, Option, metric_options

# ---- the factor data set of docs/extending.md ("A data set") --------------------------------------------------


def bars(classes):  # factor classes (N, 3) -> images (N, 1, 8, 8) in [0, 1]
    column = torch.arange(8, device=classes.device)
    position, width, level = classes.unbind(1)
    lit = (column >= position[:, None]) & (column <= (position + width)[:, None])
    return (lit * (level[:, None] + 1) / 4).float()[:, None, None, :].expand(-1, 1, 8, 8)


BARS = Factors(names=("position", "width", "brightness"), sizes=(6, 3, 4), images=bars)


class BarImages(TensorImages):
    factors = BARS


def load_bars(cfg, shape):  # every combination of classes once, a seeded fraction held out
    every = torch.cartesian_prod(*(torch.arange(s) for s in BARS.sizes))
    images = (bars(every) * 255).round().to(torch.uint8)
    train, test = (BarImages(images[i], None) for i in seeded_split(len(every), cfg.test_fraction, cfg.split_seed))
    return train, test, f"{len(every)} bars rendered from {', '.join(BARS.names)}"


# ---- the metric of docs/extending.md ("A metric") ---------------------------------------------------------------


def _code_norm(ev):
    """The mean Euclidean norm of the posterior means of --norm_images held-out images."""
    import torch  # a compute function imports what it computes with: the registry loads without torch

    n = min(ev.options.norm_images, len(ev.test))
    idx = torch.arange(n, device=ev.accelerator.device)
    with torch.no_grad():
        mu = ev.vae.encode(ev.test.batch(idx), ev.test.labels_at(idx))[0]
    ev.results["code_norm"] = {"norm": mu.norm(dim=1).mean().item(), "n": n}


CODE_NORM = Metric("mean norm of the posterior means", _code_norm, reads=(),
                   flags=(Option("norm_images", 500, "code_norm: held-out images (default 500)", min=1),),
                   rows=lambda r: [("code norm", f"{r['code_norm']['norm']:.3f} over {r['code_norm']['n']} images")])


# ---- the tests ------------------------------------------------------------------------------------------------


class Reader(torch.nn.Module):
    """An encoder that reads the three factors back from a bar image, exactly: its codes are the factor classes
    (position: the first lit column; width: lit columns - 1; brightness: 4 x the lit value - 1)."""

    def forward(self, x):
        row = x[:, 0, 0, :]
        lit = row > 0
        codes = torch.stack([lit.float().argmax(1), lit.sum(1) - 1, (row.max(1).values * 4).round() - 1], 1).float()
        return codes, torch.zeros_like(codes)

    def encode(self, x, y=None):
        return self(x)


def noise(classes):
    return torch.randn(len(classes), 3, generator=torch.Generator().manual_seed(len(classes)))


@pytest.fixture(scope="module")
def planted():
    """bars registered (with a set of the same images that declares no factors), as a module of a user's would."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(DATASETS, "bars", DataSet(1, 8, load_bars, fixed_size=True, has_factors=True))
        mp.setitem(DATASETS, "plain_bars", DataSet(1, 8, lambda cfg, shape: (
            *(TensorImages(s.images, None) for s in load_bars(cfg, shape)[:2]), "bars"), fixed_size=True))
        yield


@pytest.fixture(scope="module")
def bars_run(planted, tmp_path_factory):
    run = tmp_path_factory.mktemp("bars") / "run"
    train(run, "configs/mnist.yaml", ["data.name=bars", "data.test_fraction=0.25", "model.z_dim=3",
                                      "model.hidden=16", "train.steps=5"])
    return run


def test_the_reader_reads_every_bar_back():
    every = torch.cartesian_prod(*(torch.arange(s) for s in BARS.sizes))
    assert len(every) == 72 and torch.equal(Reader()(bars(every))[0], every.float())


def test_the_scores_on_bars_are_what_reasoning_gives():
    """Codes that are the factors: a fixed factor's code never varies, so the FactorVAE metric's least-variance
    dimension is always that factor's (exactly 1), and the β-VAE metric's mean |z1 - z2| is 0 in that dimension
    alone (separable: about 1). Each code, binned into 20, is a one-to-one copy of a factor of at most 20 values,
    so its mutual information with that factor is the factor's entropy, and with the others only the estimate's
    bias, about (6 - 1)(4 - 1)/(2 · 4000) nats: MIG close to 1. Noise: a third (chance over 3 factors), MIG 0."""
    codes, g = representation(Reader(), BARS, torch.device("cpu")), torch.Generator().manual_seed(0)
    assert factor_vae_metric(codes, BARS.sizes, g, 16, 200, 100, 500)["eval_accuracy"] == 1.0
    assert beta_vae_metric(codes, BARS.sizes, g, 16, 200, 100)["eval_accuracy"] > 0.99
    assert mig(codes, BARS.sizes, g, 4000)["mig"] > 0.99
    d = dci(codes, BARS.sizes, g, 300, 200)
    assert d["informativeness_test"] == 1.0 and d["disentanglement"] > 0.95 and d["completeness"] > 0.95
    chance = [beta_vae_metric(noise, BARS.sizes, g, 16, 200, 100)["eval_accuracy"],
              factor_vae_metric(noise, BARS.sizes, g, 16, 200, 100, 500)["eval_accuracy"]]
    assert all(0.2 < c < 0.5 for c in chance), chance
    assert mig(noise, BARS.sizes, g, 4000)["mig"] < 0.05


SMALL = ["--dis_batch", "16", "--dis_train", "200", "--dis_eval", "100", "--dis_variance", "500", "--mig_samples",
         "2000", "--dci_train", "200", "--dci_test", "100"]


def test_evaluate_scores_a_planted_factor_set(bars_run, tmp_path, monkeypatch):
    res = cli(evaluate.main, ["--exp_dir", str(bars_run), "--k", "2", *SMALL])  # the default metrics
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((bars_run / "eval.json").read_text())
    assert result["data"] == "bars" and result["metrics"][-1] == "disentanglement"
    assert result["disentanglement"]["sizes"]["mig"] == 2000 and "beta-VAE metric" in res.stdout

    def reading(*args, **kwargs):  # the trained model, its encoder replaced by the exact reader
        cfg, vae, run, auto = load_trained(*args, **kwargs)
        vae.encoder = Reader()
        return cfg, vae, run, auto

    load_trained = loading.load_trained
    monkeypatch.setattr(loading, "load_trained", reading)
    out = tmp_path / "read.json"
    res = cli(evaluate.main, ["--exp_dir", str(bars_run), "--metrics", "disentanglement", "--out", str(out), *SMALL])
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())["disentanglement"]
    assert d["factor_vae"]["eval_accuracy"] == 1.0 and d["beta_vae"]["eval_accuracy"] > 0.99
    assert d["mig"]["mig"] > 0.98 and d["dci"]["informativeness_test"] == 1.0


def test_evaluate_refuses_disentanglement_on_a_set_without_factors(bars_run, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(bars_run, plain)
    (plain / "config.yaml").write_text((plain / "config.yaml").read_text().replace("name: bars", "name: plain_bars"))
    res = cli(evaluate.main, ["--exp_dir", str(plain), "--metrics", "disentanglement"])
    assert res.returncode == 2
    assert "needs ground-truth factors, which only dsprites, bars has (this run is plain_bars)" in res.stderr


def test_a_loader_whose_splits_do_not_carry_the_declared_factors_is_refused(planted, monkeypatch):
    monkeypatch.setitem(DATASETS, "half", DataSet(1, 8, DATASETS["plain_bars"].load, fixed_size=True,
                                                   has_factors=True))
    with pytest.raises(TypeError, match="has_factors=True, but its loader's splits carry no factors"):
        load_data(DataConfig(name="half"))


def test_a_planted_metric_brings_its_option(bars_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METRICS, "code_norm", CODE_NORM)
    out = tmp_path / "norm.json"
    res = cli(evaluate.main, ["--exp_dir", str(bars_run), "--metrics", "code_norm", "--norm_images", "7",
                              "--out", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    cfg, vae, _, _ = loading.load_trained(str(bars_run), None, None)
    test = load_data(cfg.data)[1]
    with torch.no_grad():
        mu = vae.encode(test.batch(torch.arange(7)))[0]
    assert result["code_norm"] == {"norm": pytest.approx(mu.norm(dim=1).mean().item(), abs=1e-6), "n": 7}
    assert result["computed_with"] == {"code_norm": {"norm_images": 7}}
    assert f"code norm  {result['code_norm']['norm']:.3f} over 7 images" in res.stdout
    refused = cli(evaluate.main, ["--exp_dir", str(bars_run), "--metrics", "code_norm", "--norm_images", "0"])
    assert refused.returncode == 2 and "error: --norm_images must be at least 1, got 0" in refused.stderr
    with pytest.raises(SystemExit):
        evaluate.parse_arguments(["--help"])
    assert "code_norm: held-out images (default 500)" in capsys.readouterr().out
    monkeypatch.setitem(METRICS, "code_norm", Metric("x", _code_norm, flags=(Option("seed", 1),)))
    with pytest.raises(ValueError, match="--seed of metric code_norm is already declared by the shared options"):
        metric_options()
