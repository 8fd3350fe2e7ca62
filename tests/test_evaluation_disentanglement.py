"""The disentanglement scores where they follow disentanglement_lib's definitions: how the β-VAE metric draws its
pairs, how the FactorVAE metric prunes dimensions, codes of any float type, and DCI and SAP on known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.data.dsprites import FACTOR_SIZES
from utils.evaluation.disentanglement import (
    beta_vae_metric,
    beta_vae_pairs,
    dci,
    dci_scores,
    factor_vae_metric,
    sap,
    top_two_gap,
)


def standardised(classes: torch.Tensor) -> torch.Tensor:
    """Codes equal to the true factors, each scaled to unit variance."""
    sizes = torch.tensor(FACTOR_SIZES, dtype=torch.float32)
    return (classes.float() - (sizes - 1) / 2) / torch.sqrt((sizes**2 - 1) / 12)


def test_beta_vae_pairs_share_the_fixed_factor_within_each_pair_only():
    k, first, second = beta_vae_pairs(200, 64, FACTOR_SIZES, torch.Generator().manual_seed(0))
    rows = torch.arange(200)
    assert torch.equal(first[rows, :, k], second[rows, :, k])  # each pair shares the fixed factor's value
    # ... which is drawn anew for every pair (Higgins et al. 2017; disentanglement_lib), not held across the batch
    assert all(len(first[i, :, k[i]].unique()) > 1 for i in range(200))
    others = torch.ones(200, 5, dtype=torch.bool)
    others[rows, k] = False
    assert (first != second).permute(0, 2, 1)[others].float().mean() > 0.5  # the other factors differ


def test_factor_vae_metric_keeps_a_small_but_informative_dimension():
    """A dimension with std 0.1 (variance 0.01) carries the shape factor: disentanglement_lib prunes by std < 0.05,
    so it stays and the score is perfect; pruning by variance < 0.05 would drop it and lose the shape votes."""
    def codes(classes: torch.Tensor) -> torch.Tensor:
        z = standardised(classes)
        z[:, 0] *= 0.1
        return z

    result = factor_vae_metric(codes, FACTOR_SIZES, torch.Generator().manual_seed(0), n_train=600, n_eval=300,
                               n_variance=2000)
    assert result["active_dims"] == 5 and result["eval_accuracy"] > 0.99


def test_beta_vae_metric_on_true_factors_in_float64():
    score = beta_vae_metric(lambda c: standardised(c).double(), FACTOR_SIZES, torch.Generator().manual_seed(0),
                            n_train=600, n_eval=300)
    assert score["eval_accuracy"] > 0.99 and score["train_accuracy"] > 0.99


def test_trainer_test_bound_is_evaluate_bound_on_dequantised_images():
    """A per-pixel σ at its floor (e^-6) and a mean of 0 put a huge density on exactly-black pixels (MNIST's
    border); the trainer's logged test bound must be evaluate.py's dequantised 8-bit bound, not that density at
    x = 0, which is 0.6 bits/dim better than any 8-bit image deserves."""
    from accelerate import Accelerator

    from models.vae import VAE
    from utils.config import load_config
    from utils.data.splits import TensorImages
    from utils.evaluation.bounds import elbo_terms, likelihood_bounds

    test = TensorImages(torch.zeros(300, 1, 28, 28, dtype=torch.uint8), None)
    cfg = load_config(None, ["model.likelihood=per_pixel_sigma", "model.z_dim=2", "model.hidden=8"])
    vae = VAE(cfg.model, cfg.loss, (1, 28, 28), cfg.train.batch_size).eval()
    last = vae.decoder.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.cat([torch.full((784,), -20.0), torch.full((784,), -20.0)]))  # mean 0, σ at the floor
    acc = Accelerator(cpu=True)
    logged = elbo_terms(vae, test, 100, acc, limit=300)
    bound = likelihood_bounds(vae, test, 1, acc, batch_size=100, limit=300)
    assert logged["bpd"] == pytest.approx(bound["elbo_bpd"], abs=0.01)
    assert logged["elbo"] == pytest.approx(bound["elbo"], abs=5.0)
    # by hand: each pixel's NLL is −log σ... with y ~ U(0, 1/256): E[(y/σ)²]/2 = e^12 / (6 · 256²), plus the shift
    per_pixel = -6 + 0.5 * math.log(2 * math.pi) + math.exp(12) / (6 * 256**2) + math.log(256)
    assert bound["elbo_bpd"] == pytest.approx((per_pixel * 784 + logged["kl"]) / (784 * math.log(2)), abs=0.01)


def noise(classes: torch.Tensor) -> torch.Tensor:
    return torch.randn(len(classes), 5, generator=torch.Generator().manual_seed(len(classes)))


def test_dci_scores_by_hand():
    assert dci_scores(np.eye(5)) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert dci_scores(np.ones((4, 5))) == pytest.approx((0.0, 0.0), abs=1e-6)
    # two codes, two factors: code 0 informs only factor 0 (weight 3); code 1 splits 1:1 between both
    r = np.array([[3.0, 0.0], [1.0, 1.0]])
    d = (1 - 0) * 3 / 5 + (1 - 1) * 2 / 5  # code 0 is pure (entropy 0), code 1 is uniform (entropy 1 bit, base 2)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # factor 0's column 3:1
    c = (1 - h) * 4 / 5 + (1 - 0) * 1 / 5
    assert dci_scores(r) == pytest.approx((d, c), abs=1e-6)


@pytest.mark.slow  # fits gradient-boosted trees for every factor, twice
def test_dci_on_true_factors_and_on_noise():
    """Codes that are the factors: each tree uses its own factor's code only (D = C = 1) and predicts the class
    exactly; noise: no code structure, and held-out accuracy at chance, mean over factors of 1/size."""
    truth = dci(standardised, FACTOR_SIZES, torch.Generator().manual_seed(0), n_train=300, n_test=200)
    assert truth["disentanglement"] > 0.98 and truth["completeness"] > 0.98
    assert truth["informativeness_test"] == pytest.approx(1.0, abs=0.02)
    assert np.argmax(np.array(truth["importance"]), 0).tolist() == [0, 1, 2, 3, 4]
    chance = dci(noise, FACTOR_SIZES, torch.Generator().manual_seed(0), n_train=300, n_test=200)
    assert chance["disentanglement"] < 0.05 and chance["completeness"] < 0.05
    assert chance["informativeness_test"] == pytest.approx(np.mean([1 / s for s in FACTOR_SIZES]), abs=0.05)


def test_sap_on_true_factors_and_on_noise():
    assert top_two_gap(np.array([[0.9, 0.2], [0.5, 0.3], [0.1, 0.25]])) == pytest.approx((0.4 + 0.05) / 2)
    truth = sap(standardised, FACTOR_SIZES, torch.Generator().manual_seed(0), n_train=2000, n_test=1000)
    assert np.argmax(np.array(truth["scores"]), 0).tolist() == [0, 1, 2, 3, 4]  # each factor's own code is best
    chance = sap(noise, FACTOR_SIZES, torch.Generator().manual_seed(0), n_train=2000, n_test=1000)
    assert chance["sap"] < 0.02 < truth["sap"] / 5
