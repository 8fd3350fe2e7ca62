"""Sample quality in the toolkit's own feature space: that its numbers mean something on real images (held-out
against training images is the floor; blur, noise and dropped classes move each score the right way, step by
step), and evaluate.py's ``--metrics quality`` end to end with its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF

import evaluate
from conftest import cli
from utils.config import DataConfig
from utils.data.registry import load_data
from utils.evaluation.features import load_feature_net
from utils.evaluation.quality import quality_scores
from utils.evaluation.sample_quality import feature_net_for
from utils.inference.features import main as features_main

N = 1000  # images a side: enough for stable k-NN balls and KID subsets of 200


@pytest.fixture(scope="module")
def mnist_features(real_data, tmp_path_factory) -> Path:
    """MNIST's feature network, 80 steps (held-out accuracy about 0.92 here: see tests/test_features.py)."""
    path = tmp_path_factory.mktemp("features") / "mnist.safetensors"
    res = cli(features_main, ["-c", "configs/mnist.yaml", "--data_root", str(real_data), "--steps", "80",
                              "--out", str(path)])
    assert res.returncode == 0, res.stderr
    return path


@pytest.fixture(scope="module")
def images(real_data):
    train, test, _ = load_data(DataConfig(name="mnist", root=str(real_data), download=False))
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(train), generator=g)[:4 * N]
    return train.batch(pick), train.labels_at(pick), test.batch(torch.arange(N))


def scores(net, real: torch.Tensor, generated: torch.Tensor) -> dict:
    return quality_scores(net.embed(real), net.embed(generated), seed=0, kid_subsets=20, kid_subset_size=200)


@pytest.mark.slow  # five score computations on 1,000 real MNIST images a side
def test_each_score_moves_the_right_way_as_images_degrade(mnist_features, images):
    net = load_feature_net(mnist_features, (1, 28, 28))
    train, labels, held_out = images
    floor = scores(net, held_out, train[:N])  # real against real: what a perfect model would score
    blurred = [scores(net, held_out, TF.gaussian_blur(train[:N], 9, s)) for s in (1.0, 2.0)]
    g = torch.Generator().manual_seed(1)
    noisy = [scores(net, held_out, (train[:N] + s * torch.randn(train[:N].shape, generator=g)).clamp(0, 1))
             for s in (0.25, 0.5)]
    for steps in (blurred, noisy):
        for key in ("fd", "kid_mean", "c2st_accuracy"):  # distances and the two-sample test rise at each step
            assert floor[key] < steps[0][key] < steps[1][key], (key, floor[key], [s[key] for s in steps])
        for key in ("recall", "coverage"):  # fewer of the real images' modes reached
            assert floor[key] > steps[0][key] > steps[1][key], (key, floor[key], [s[key] for s in steps])
        for key in ("precision", "density"):  # fewer samples on the real images' manifold, at the strong step
            # (a mild blur or noise can raise them: smoothed digits sit nearer the held-out ones' centres)
            assert steps[1][key] < floor[key] - 0.1, (key, floor[key], [s[key] for s in steps])
    assert blurred[1]["c2st_accuracy"] > 0.95
    # half the classes dropped: what is generated is still real digits (precision holds) but covers half the
    # held-out images' modes (recall and coverage fall)
    dropped = scores(net, held_out, train[labels < 5][:N])
    assert dropped["precision"] > floor["precision"] - 0.05, (dropped["precision"], floor["precision"])
    for key in ("recall", "coverage"):
        assert dropped[key] < floor[key] - 0.15, (key, dropped[key], floor[key])
    # exact copies of other training images score as the floor's training images do: the two-sample test (about
    # 0.6 here: MNIST's test digits are by other writers) measures the distribution, not memorisation
    copies = scores(net, held_out, train[N:2 * N])
    assert abs(copies["c2st_accuracy"] - floor["c2st_accuracy"]) < 0.05, (copies, floor)


@pytest.fixture(scope="module")
def run(mnist_300, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("quality") / "run"
    shutil.copytree(mnist_300, run)
    return run


QUICK = ["--metrics", "quality", "--quality_samples", "300", "--kid_subsets", "10", "--kid_subset_size", "100"]


def test_evaluate_reports_sample_quality_named_by_its_feature_network(run, mnist_features):
    res = cli(evaluate.main, ["--exp_dir", str(run), *QUICK, "--features", str(mnist_features)])
    assert res.returncode == 0, res.stderr
    net = load_feature_net(mnist_features)
    assert f"{net.identity}'s features, 300 samples (prior)" in res.stdout
    q = json.loads((run / "eval.json").read_text())["quality"]
    assert q["features"] == net.identity and q["n_generated"] == q["n_real"] == 300 and q["sampler"] == "prior"
    assert 0 <= q["precision"] <= 1 and q["fd"] > 0 and 0.5 <= q["c2st_accuracy"] <= 1
    computed = json.loads((run / "eval.json").read_text())["computed_with"]["quality"]
    assert computed == {"quality_samples": 300, "kid_subsets": 10, "kid_subset_size": 100, "sampler": "prior",
                        "seed": 0}


@pytest.mark.parametrize("sampler, small", [("flow", ["--flow_layers", "2", "--flow_steps", "30"]),
                                            ("flow_matching", ["--flow_matching_steps", "30",
                                                               "--flow_matching_ode_steps", "4"])])
def test_quality_scores_the_samples_of_a_fitted_sampler(run, mnist_features, sampler, small, tmp_path):
    """--sampler chooses where the codes come from: the sampler is fitted, kept, and named in the entry."""
    out = tmp_path / "eval.json"
    res = cli(evaluate.main, ["--exp_dir", str(run), *QUICK, "--features", str(mnist_features), "--sampler", sampler,
                              *small, "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert f"300 samples ({sampler})" in res.stdout and (run / "samplers" / f"{sampler}.safetensors").is_file()
    results = json.loads(out.read_text())
    assert results["quality"]["sampler"] == results["computed_with"]["quality"]["sampler"] == sampler
    prior = tmp_path / "prior.json"  # the same call from the prior scores other codes: the sampler's were used
    assert cli(evaluate.main, ["--exp_dir", str(run), *QUICK, "--features", str(mnist_features),
                               "--out", str(prior)]).returncode == 0
    assert json.loads(prior.read_text())["quality"]["fd"] != results["quality"]["fd"]


def test_bad_input_is_one_line_and_writes_nothing(run, mnist_features, real_data, tmp_path):
    out = tmp_path / "eval.json"
    missing = cli(evaluate.main, ["--exp_dir", str(run), *QUICK, "--features", str(tmp_path / "no.safetensors"),
                                  "--out", str(out)])
    assert missing.returncode == 2 and "no feature network at" in missing.stderr
    fashion = tmp_path / "fashion.safetensors"
    assert cli(features_main, ["-c", "configs/fashion_mnist.yaml", "--data_root", str(real_data), "--steps", "2",
                               "--out", str(fashion)]).returncode == 0
    other = cli(evaluate.main, ["--exp_dir", str(run), *QUICK, "--features", str(fashion), "--out", str(out)])
    assert other.returncode == 2 and "is the feature network of fashion_mnist" in other.stderr
    big = cli(evaluate.main, ["--exp_dir", str(run), *QUICK[:-1], "400", "--features", str(mnist_features),
                              "--out", str(out)])
    assert big.returncode == 2 and "--kid_subset_size 400 is more than the 300 images compared" in big.stderr
    assert not out.exists()
    with pytest.raises(Exception, match="takes 1x28x28 images"):
        feature_net_for(mnist_features, "mnist", (1, 32, 32))  # a model of resized images: another network


def test_reconstruction_quality_scores_the_decoded_posterior_means(run, mnist_features, real_data):
    """recon_quality equals the scores of decode(E[z|x]) of the first n held-out images computed by hand, and a
    trained VAE's reconstructions sit nearer the held-out images than its prior samples do."""
    from utils.inference.loading import load_trained

    res = cli(evaluate.main, ["--exp_dir", str(run), *QUICK, "--metrics", "quality,recon_quality",
                              "--features", str(mnist_features)])
    assert res.returncode == 0, res.stderr
    assert "300 reconstructions vs held-out images" in res.stdout
    results = json.loads((run / "eval.json").read_text())
    rq, q = results["recon_quality"], results["quality"]
    _, vae, _, _ = load_trained(str(run), None, None, torch.device("cpu"), str(real_data))
    test = load_data(DataConfig(name="mnist", root=str(real_data), download=False))[1]
    net = load_feature_net(mnist_features)
    x = test.batch(torch.arange(300))
    with torch.no_grad():
        by_hand = quality_scores(net.embed(x), net.embed(vae.decode(vae.encode(x)[0]).clamp(0, 1)), seed=0,
                                 kid_subsets=10, kid_subset_size=100)
    for key, value in by_hand.items():
        assert rq[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert rq["features"] == net.identity
    assert rq["fd"] < q["fd"] and rq["coverage"] > q["coverage"]
    assert results["computed_with"]["recon_quality"] == {"quality_samples": 300, "kid_subsets": 10,
                                                         "kid_subset_size": 100, "seed": 0}
