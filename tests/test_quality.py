"""The sample-quality scores against closed forms, hand-made point sets and reference implementations."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from utils.errors import UserError
from utils.evaluation.quality import c2st, frechet_distance, kid, kid_subset_size, poly_mmd2, prdc, quality_scores


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_fd_of_two_gaussians_converges_to_the_closed_form():
    # N(0, I) against N(mu, diag(s^2)): |mu|^2 + sum (1 + s^2 - 2 s) = |mu|^2 + sum (1 - s)^2
    mu, s = torch.tensor([1.0, -0.5, 0.0, 2.0]), torch.tensor([1.0, 2.0, 0.5, 1.5])
    closed = float(mu.square().sum() + (1 - s).square().sum())
    assert closed == pytest.approx(5.25 + 1.5)
    real, generated = gaussian(200_000, 4, 0), gaussian(200_000, 4, 1) * s + mu
    assert frechet_distance(real, generated) == pytest.approx(closed, abs=0.03)


def test_fd_of_identical_sets_is_zero_and_agrees_with_scipy_sqrtm_and_torchmetrics():
    x = gaussian(300, 16, 2) @ gaussian(16, 16, 3)  # correlated features
    assert 0.0 <= frechet_distance(x, x) < 1e-8  # the raw sum is a round-off -6e-14 here
    y = gaussian(200, 16, 4, shift=0.3) @ gaussian(16, 16, 5)
    a, b = x.numpy(), y.numpy()
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * sqrtm(s_a @ s_b).real)
    assert frechet_distance(x, y) == pytest.approx(reference, rel=1e-8)
    from torchmetrics.image.fid import _compute_fid  # eigenvalues of the non-symmetric S_x S_y, imaginary dropped

    torchmetrics = _compute_fid(x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(float(torchmetrics), rel=1e-8)


def test_kid_of_one_distribution_is_near_zero_against_its_spread():
    mean, sd = kid(gaussian(2000, 16, 6), gaussian(2000, 16, 7), seed=0, subsets=50, subset_size=500)
    assert sd > 0 and abs(mean) < sd
    shifted, _ = kid(gaussian(2000, 16, 6), gaussian(2000, 16, 7, shift=0.5), seed=0, subsets=50, subset_size=500)
    assert shifted > 10 * sd


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics_on_the_same_subsets():
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    real, generated = gaussian(400, 8, 8), gaussian(300, 8, 9, shift=0.2, scale=1.3)
    assert float(poly_mmd2(real[:100], generated[:100])) == pytest.approx(
        float(poly_mmd(real[:100], generated[:100])), rel=1e-10)
    # torchmetrics draws its subsets from the global generator, real then generated, as kid draws from its own
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=20, subset_size=150)
    metric.update(real, real=True)
    metric.update(generated, real=False)
    torch.manual_seed(11)
    ref_mean, ref_sd = metric.compute()
    mean, sd = kid(real, generated, seed=11, subsets=20, subset_size=150)
    assert (mean, sd) == pytest.approx((float(ref_mean), float(ref_sd)), rel=1e-10)


# Two real clusters of four points, the corners of 2 x 2 squares around (0, 0) and (100, 0); with k = 3 each
# real ball reaches the far corner: radius 2 sqrt 2. The generated points are the corners of a 1 x 1 square around
# (0, 0): their radius is sqrt 2.
SQUARE = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
REAL = torch.cat([SQUARE, SQUARE + torch.tensor([100.0, 0.0], dtype=torch.float64)])
GENERATED = SQUARE / 2


def test_prdc_on_hand_made_points():
    scores = prdc(REAL, GENERATED, nearest_k=3)
    # every generated point lies in all four balls of the near cluster (its farthest corner is 1.58 < 2.83):
    # precision 1, density 4 balls / k = 4/3; the far cluster is neither reached nor covered: recall, coverage 1/2
    assert scores == pytest.approx({"precision": 1.0, "recall": 0.5, "density": 4 / 3, "coverage": 0.5})
    # a generated point in no real ball halves precision and adds nothing to density
    outlier = torch.cat([GENERATED, torch.tensor([[50.0, 0.0]], dtype=torch.float64)])
    assert prdc(REAL, outlier, nearest_k=3)["precision"] == pytest.approx(4 / 5)
    assert prdc(REAL, outlier, nearest_k=3)["density"] == pytest.approx(4 * 4 / 3 / 5)


def test_prdc_balls_are_closed_as_in_the_papers():
    # real points 0, 1, 2, 3 on a line, k = 1: every radius is 1, so a generated point at 4 lies on the ball of 3
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    generated = torch.tensor([[4.0], [10.0]], dtype=torch.float64)
    assert prdc(real, generated, nearest_k=1)["precision"] == 0.5


def test_prdc_agrees_with_the_authors_package():
    from prdc import compute_prdc

    real, generated = gaussian(300, 5, 12), gaussian(250, 5, 13, shift=0.4, scale=1.2)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the set sizes
        reference = compute_prdc(real.numpy(), generated.numpy(), nearest_k=3)
    assert prdc(real, generated, nearest_k=3) == pytest.approx({k: float(v) for k, v in reference.items()}, rel=1e-12)


def test_c2st_is_chance_on_one_distribution_and_perfect_on_separated_ones():
    accuracy, held_out = c2st(gaussian(3000, 8, 14), gaussian(2000, 8, 15), seed=0)
    assert held_out == 2000  # 2000 of each after balancing, half held out
    assert abs(accuracy - 0.5) < 0.05  # sd of chance accuracy on 2000 points: 0.011
    accuracy, _ = c2st(gaussian(1000, 8, 14), gaussian(1000, 8, 15, shift=3.0), seed=0)
    assert accuracy > 0.99


def test_quality_scores_are_json_ready_and_seeded():
    real, generated = gaussian(300, 6, 16), gaussian(200, 6, 17, shift=0.2)
    scores = quality_scores(real.numpy(), generated, seed=3, kid_subsets=10, kid_subset_size=100)
    assert set(scores) == {"fd", "kid_mean", "kid_sd", "precision", "recall", "density", "coverage",
                           "c2st_accuracy", "c2st_held_out", "n_real", "n_generated", "kid_subset_size"}
    assert scores["kid_subset_size"] == 100
    assert all(type(v) in (float, int) for v in scores.values())
    assert json.loads(json.dumps(scores)) == scores
    assert (scores["n_real"], scores["n_generated"]) == (300, 200)
    assert quality_scores(real, generated, seed=3, kid_subsets=10, kid_subset_size=100) == scores


@pytest.mark.parametrize("real, generated, words", [
    (np.zeros((1, 4)), np.zeros((5, 4)), "at least 2"),
    (np.zeros((5, 4)), np.zeros((5, 3)), "same feature network"),
    (np.zeros((5, 4)), np.full((5, 4), np.nan), "NaN or infinite"),
    (np.zeros((5, 4)), np.full((5, 4), np.inf), "NaN or infinite"),
    (np.zeros(5), np.zeros((5, 4)), "one (n, d) matrix"),
    (np.random.default_rng(0).normal(size=(50, 4)), np.random.default_rng(1).normal(size=(40, 4)),
     "set kid_subset_size between 2 and 40"),
])
def test_bad_input_is_refused_in_one_line(real, generated, words):
    with pytest.raises(UserError) as error:
        quality_scores(real, generated, seed=0, kid_subset_size=41)
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("options, words", [
    ({"kid_subsets": 0}, "set it to 1 or more"),
    ({"nearest_k": 0}, "set it to 1 or more"),
    ({"nearest_k": 5}, "lower nearest_k"),
])
def test_bad_options_are_refused_in_one_line(options, words):
    points = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(UserError) as error:
        quality_scores(points, points + 1, seed=0, **{"kid_subset_size": 5, **options})
    assert words in str(error.value) and "\n" not in str(error.value)


def test_c2st_sees_a_wrong_spread_as_well_as_the_best_possible_classifier():
    # N(0, I) against N(0, s^2 I) in d dimensions: the Bayes classifier thresholds |x|^2 where the densities meet,
    # |x|^2 = t = 2 d s^2 log s / (s^2 - 1), and is right with probability (P(chi2_d < t) + P(chi2_d > t / s^2)) / 2
    from scipy.stats import chi2

    d, s = 8, 1.5
    t = 2 * d * s**2 * math.log(s) / (s**2 - 1)
    bayes = (chi2.cdf(t, d) + chi2.sf(t / s**2, d)) / 2
    assert 0.7 < bayes < 0.8
    accuracy, _ = c2st(gaussian(3000, d, 22), gaussian(3000, d, 23, scale=s), seed=0)
    assert bayes - 0.03 < accuracy < bayes + 0.03  # sd of the accuracy on 3000 held-out points: 0.008


def test_c2st_trains_on_both_classes_even_for_two_points_each():
    accuracy, held_out = c2st(np.array([[0.0], [1.0]]), np.array([[10.0], [11.0]]), seed=0)
    assert (accuracy, held_out) == (1.0, 2)


def test_a_shifting_mean_raises_fd_and_kid_and_lowers_precision_and_density():
    real = gaussian(1000, 8, 18)  # one generated sample, translated along every axis by t: FD -> 8 t^2
    steps = [quality_scores(real, gaussian(1000, 8, 19, shift=t), seed=0, kid_subsets=20, kid_subset_size=500)
             for t in (0.0, 0.5, 1.0, 1.5, 2.0)]
    for before, after in zip(steps, steps[1:]):
        assert after["fd"] > before["fd"] and after["kid_mean"] > before["kid_mean"]
        assert after["precision"] < before["precision"] and after["density"] < before["density"]
    assert steps[0]["fd"] < 0.1 and steps[-1]["fd"] == pytest.approx(8 * 2.0**2, rel=0.05)


def test_dropping_clusters_keeps_precision_while_recall_and_coverage_fall():
    centres = torch.eye(8, dtype=torch.float64)[:5] * 20  # five clusters 28 apart, sd 1

    def clusters(kept: int, n: int, seed: int) -> torch.Tensor:
        labels = torch.arange(n) % kept
        return centres[labels] + gaussian(n, 8, seed)

    real = clusters(5, 1000, 20)
    steps = [prdc(real, clusters(kept, 1000, 21), nearest_k=3) for kept in (5, 4, 3, 2, 1)]
    for kept, scores in zip((5, 4, 3, 2, 1), steps):
        # the kept clusters are sampled as densely as before or more: precision holds (its tail misses at d = 8 stay)
        assert scores["precision"] == pytest.approx(steps[0]["precision"], abs=0.05)
        # the real points of a dropped cluster are 28 from any generated point: neither recalled nor covered
        assert scores["recall"] <= kept / 5 and scores["coverage"] <= kept / 5
    for before, after in zip(steps, steps[1:]):
        assert after["recall"] < before["recall"] and after["coverage"] < before["coverage"]


def test_kid_subsets_default_to_1000_or_half_the_images():
    """Subsets of every image would all be one set (sd 0): fewer than 2,000 images get subsets of half of them."""
    assert [kid_subset_size(n) for n in (10_000, 2000, 1999, 500, 3)] == [1000, 1000, 999, 250, 2]
    assert kid_subset_size(500, 100) == 100
