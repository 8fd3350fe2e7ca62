"""Sample-quality scores between real and generated feature vectors, in any feature space.

Every score compares two sets of feature vectors, real ``(N, d)`` and generated ``(M, d)``, in float64:

- Fréchet distance ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})`` with unbiased covariances. The trace
  of the square root is taken as the sum of the square roots of the eigenvalues of ``S_r^{1/2} S_g S_r^{1/2}``:
  that matrix is symmetric positive semi-definite and has the same eigenvalues as ``S_r S_g``, so a symmetric
  eigensolver gives them real, with no complex round-off to drop (pytorch-fid's ``scipy.linalg.sqrtm`` of
  ``S_r S_g`` and torchmetrics' general ``eigvals`` of it both discard imaginary parts); round-off negatives are
  clipped to zero.
- KID (Bińkowski et al. 2018): the unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``, mean and sd over
  random subsets, the estimator of torchmetrics' ``KernelInceptionDistance`` (and its population sd).
- Improved precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020)
  with k-nearest-neighbour balls, as the authors' ``prdc`` package computes them (it tests ``<``, the papers'
  closed balls ``<=``: they differ only for a point exactly on a ball's edge), here in row chunks: 10,000 x 10,000
  points need 80 MB blocks instead of the package's three 800 MB distance matrices, in the same time.
- A classifier two-sample test (Lopez-Paz & Oquab 2017): held-out accuracy of a logistic regression on
  standardized features and their squares telling real from generated (0.5 = indistinguishable).
"""

from __future__ import annotations

import numpy as np
import torch

from utils.errors import UserError

ROWS = 1024  # real points per distance chunk: a 1024 x 10,000 float64 block is 80 MB


def as_features(x, name: str) -> torch.Tensor:
    """A (n, d) float64 tensor from a tensor or array, refused in one line if it is not finite or too small."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().to(torch.float64)
    if t.dim() != 2:
        raise UserError(f"{name} features have shape {tuple(t.shape)}: pass one (n, d) matrix of feature vectors")
    if t.shape[0] < 2:
        raise UserError(f"{name} features hold {t.shape[0]} point(s): the scores need at least 2 of each set")
    if not torch.isfinite(t).all():
        raise UserError(f"{name} features hold NaN or infinite values: check the images and the feature network")
    return t


def checked_pair(real, generated) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as float64 features of one dimension."""
    r, g = as_features(real, "real"), as_features(generated, "generated")
    if r.shape[1] != g.shape[1]:
        raise UserError(f"real features have {r.shape[1]} dimensions and generated {g.shape[1]}: "
                        "compute both with the same feature network")
    return r, g


def psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance matrix, round-off negative eigenvalues clipped to zero."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(real, generated) -> float:
    """Fréchet distance between Gaussians fitted to the two sets (unbiased covariances)."""
    r, g = checked_pair(real, generated)
    mu_r, mu_g = r.mean(0), g.mean(0)
    s_r, s_g = torch.cov(r.T).reshape(r.shape[1], -1), torch.cov(g.T).reshape(g.shape[1], -1)
    root = psd_sqrt(s_r)
    middle = root @ s_g @ root
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0)
    value = (mu_r - mu_g).square().sum() + s_r.trace() + s_g.trace() - 2 * eig.sqrt().sum()
    return max(float(value), 0.0)  # a distance: identical sets give a round-off -1e-14, not a score below zero


def cubic(k: torch.Tensor) -> torch.Tensor:
    """``k ** 3`` in place by two products: a float64 ``pow`` takes twice as long as the matrix product itself."""
    square = k * k
    return square.mul_(k)


def poly_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of two equal-size sets with the cubic kernel ``(x.y / d + 1)^3`` (Bińkowski et al. 2018)."""
    m, d = x.shape
    k_xx, k_yy, k_xy = (cubic(torch.addmm(x.new_ones(()), a, b.T, alpha=1 / d)) for a, b in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / m**2


def kid(real, generated, *, seed: int, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
    """KID as (mean, sd) of the unbiased MMD^2 over ``subsets`` seeded draws of ``subset_size`` from each set."""
    r, g = checked_pair(real, generated)
    if subsets < 1:
        raise UserError(f"kid_subsets is {subsets}: set it to 1 or more (100 is usual)")
    if subset_size < 2 or subset_size > min(len(r), len(g)):
        raise UserError(f"kid_subset_size {subset_size} does not fit {len(r)} real and {len(g)} generated points: "
                        f"set kid_subset_size between 2 and {min(len(r), len(g))}")
    gen = torch.Generator().manual_seed(seed)
    values = torch.stack([poly_mmd2(r[torch.randperm(len(r), generator=gen)[:subset_size]],
                                    g[torch.randperm(len(g), generator=gen)[:subset_size]]) for _ in range(subsets)])
    return float(values.mean()), float(values.std(unbiased=False))  # population sd, as Bińkowski's code


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    if k < 1:
        raise UserError(f"nearest_k is {k}: set it to 1 or more (3 is the published choice)")
    if k >= len(x):
        raise UserError(f"nearest_k {k} needs more than {k} points in each set, got {len(x)}: lower nearest_k")
    return torch.cat([torch.cdist(x[i:i + ROWS], x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(x), ROWS)])


def prdc(real, generated, *, nearest_k: int = 3) -> dict[str, float]:
    """Precision, recall, density and coverage with the k-NN balls of each set (closed balls, as the papers).

    A generated point is precise if it lies in some real point's ball (radius: distance to its k-th nearest
    real neighbour); a real point is recalled if it lies in some generated point's ball; density counts the
    real balls around each generated point over k; a real point is covered if its own ball holds a generated one.
    """
    r, g = checked_pair(real, generated)
    r_radii, g_radii = knn_radii(r, nearest_k), knn_radii(g, nearest_k)
    in_real_balls = torch.zeros(len(g), dtype=torch.float64)
    recalled, covered = [], []
    for i in range(0, len(r), ROWS):
        dist = torch.cdist(r[i:i + ROWS], g)
        inside = dist <= r_radii[i:i + ROWS, None]
        in_real_balls += inside.sum(0)
        recalled.append((dist <= g_radii[None, :]).any(1))
        covered.append(inside.any(1))
    return {"precision": float((in_real_balls > 0).double().mean()),
            "recall": float(torch.cat(recalled).double().mean()),
            "density": float(in_real_balls.mean() / nearest_k),
            "coverage": float(torch.cat(covered).double().mean())}


def c2st(real, generated, *, seed: int) -> tuple[float, int]:
    """Held-out accuracy of a classifier telling real from generated, and the number of held-out points.

    The larger set is subsampled to the smaller (seeded) so that 0.5 is chance; a seeded half of each class
    trains a logistic regression on the features and their squares, standardized with the training half's
    statistics, and the rest scores it. The squares make it a quadratic (diagonal-Gaussian) discriminant: a
    linear one cannot see a set that is too spread out or too narrow at the right mean (10,000 vs 10,000 points
    of N(0, I) and N(0, 1.21 I) in d = 512: 0.50 linear, 0.91 with squares), the typical failing of blurry
    samples. It stays convex (nothing to initialise) and takes about a second at that size, where a small
    scikit-learn MLP took 16 s and scored 0.52.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    r, g = checked_pair(real, generated)
    rng = np.random.default_rng(seed)
    n = min(len(r), len(g))
    x = np.concatenate([r.numpy()[rng.permutation(len(r))[:n]], g.numpy()[rng.permutation(len(g))[:n]]])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    halves = [rng.permutation(n) + offset for offset in (0, n)]  # both classes in both halves, however small n is
    x = np.concatenate([x, x * x], axis=1)
    train = np.concatenate([h[:n // 2] for h in halves])
    test = np.concatenate([h[n // 2:] for h in halves])
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x[train]), y[train])
    return float(clf.score(scaler.transform(x[test]), y[test])), len(test)


def kid_subset_size(n: int, asked: int | None = None) -> int:
    """KID's subset size for n images a side: as asked, else 1000 (Bińkowski et al.'s and torchmetrics' default) or
    half the images when fewer than 2,000 are compared, so that the subsets differ and their sd means something."""
    return asked if asked is not None else min(1000, max(2, n // 2))


def quality_scores(real, generated, *, seed: int, kid_subsets: int = 100, kid_subset_size: int = 1000,
                   nearest_k: int = 3) -> dict[str, float | int]:
    """Every score between the two sets, as plain JSON-ready numbers."""
    r, g = checked_pair(real, generated)
    kid_mean, kid_sd = kid(r, g, seed=seed, subsets=kid_subsets, subset_size=kid_subset_size)
    accuracy, held_out = c2st(r, g, seed=seed)
    return {"fd": frechet_distance(r, g), "kid_mean": kid_mean, "kid_sd": kid_sd,
            **prdc(r, g, nearest_k=nearest_k), "c2st_accuracy": accuracy, "c2st_held_out": held_out,
            "n_real": len(r), "n_generated": len(g), "kid_subset_size": kid_subset_size}
