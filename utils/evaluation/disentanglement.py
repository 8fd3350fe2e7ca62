"""Disentanglement scores on a data set's ground-truth factors: β-VAE metric, FactorVAE metric, MIG, DCI, SAP.

Each takes ``codes(classes) -> (N, d)``: the representation of the images with
the given factor classes (N, F) — a model's posterior means (``representation``),
or, for the known-answer tests, the factors themselves or noise — and ``sizes``,
the number of classes of each of the F factors (``Factors.sizes``: dSprites, or any
set that declares its factors). Defaults are the sample sizes of the papers (as in
disentanglement_lib); smaller ones make them cheap.

- β-VAE metric (Higgins et al. 2017): accuracy of a linear classifier
  (scikit-learn's logistic regression with its defaults, as disentanglement_lib)
  that predicts which factor was held fixed from the mean |z1 − z2| over pairs
  of images; the two images of a pair share that factor's value, which differs
  from pair to pair. Chance is 1/F.
- FactorVAE metric (Kim & Mnih 2018): with codes scaled by their global std and
  collapsed dimensions (std < 0.05) dropped, the dimension of least variance
  among images sharing a factor votes for that factor; accuracy of the
  majority-vote classifier.
- MIG (Chen et al. 2018): per factor, the gap between the two largest mutual
  informations with single (20-bin discretised) code dimensions, divided by the
  factor's entropy; averaged over factors.
- DCI (Eastwood & Williams 2018): one gradient-boosted tree classifier per factor
  (scikit-learn's defaults, as disentanglement_lib) on all code dimensions; the
  trees' feature importances form a (codes x factors) matrix R. Disentanglement:
  1 − the entropy (base: number of factors) of each code's row, weighted by the
  code's share of R; completeness: the same down each factor's column (base:
  number of codes); informativeness: the classifiers' accuracy on held-out points.
- SAP (Kumar et al. 2018): a linear SVM (C = 0.01, balanced classes) per code
  dimension and factor predicts the factor from that dimension alone; per
  factor, the gap between the two best dimensions' held-out accuracies,
  averaged over factors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.stats import entropy
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

if TYPE_CHECKING:
    from models.vae import VAE
    from utils.data.factors import Factors

Representation = Callable[[torch.Tensor], torch.Tensor]
Sizes = tuple[int, ...]  # classes per factor


def representation(vae: VAE, factors: Factors, device: torch.device, chunk: int = 1024) -> Representation:
    """classes -> the posterior means of the images with those factor classes, (N, z): what the scores read."""
    @torch.no_grad()
    def codes(classes: torch.Tensor) -> torch.Tensor:
        return torch.cat([vae.encode(factors.images(part.to(device)))[0].float().cpu()
                          for part in classes.split(chunk)])
    return codes


def random_classes(n: int, sizes: Sizes, g: torch.Generator) -> torch.Tensor:
    """n factor vectors drawn uniformly from the grid: (n, F)."""
    return torch.stack([torch.randint(s, (n,), generator=g) for s in sizes], 1)


def _fixed_factor_batches(n_points: int, batch: int, sizes: Sizes,
                          g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor index per point (P,), classes (P, batch, F) sharing that factor's value within each point): the
    FactorVAE metric's batches."""
    k = torch.randint(len(sizes), (n_points,), generator=g)
    classes = random_classes(n_points * batch, sizes, g).view(n_points, batch, len(sizes))
    value = torch.stack([torch.randint(sizes[f], (1,), generator=g)[0] for f in k.tolist()])
    classes[torch.arange(n_points), :, k] = value.unsqueeze(1).expand(-1, batch)
    return k, classes


def _linear_classifier_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor,
                                y_eval: torch.Tensor, seed: int) -> tuple[float, float]:
    """(train, eval) accuracy of scikit-learn's default logistic regression, as disentanglement_lib fits it."""
    model = LogisticRegression(random_state=seed)
    with warnings.catch_warnings():  # its default 100 iterations may stop short of convergence, as there
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train.double().numpy(), y_train.numpy())
    return (float(model.score(x_train.double().numpy(), y_train.numpy())),
            float(model.score(x_eval.double().numpy(), y_eval.numpy())))


def beta_vae_pairs(n: int, batch: int, sizes: Sizes,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed factor per point (n,), first and second classes (n, batch, F)): in each of the batch pairs the two
    images share the fixed factor's value; the other factors, and that value, are drawn anew for every pair."""
    k = torch.randint(len(sizes), (n,), generator=g)
    first = random_classes(n * batch, sizes, g).view(n, batch, len(sizes))
    second = random_classes(n * batch, sizes, g).view(n, batch, len(sizes))
    second[torch.arange(n), :, k] = first[torch.arange(n), :, k]
    return k, first, second


def beta_vae_metric(codes: Representation, sizes: Sizes, g: torch.Generator, batch: int = 64,
                    n_train: int = 10_000, n_eval: int = 5_000) -> dict[str, float]:
    def points(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, first, second = beta_vae_pairs(n, batch, sizes, g)
        z1, z2 = codes(first.flatten(0, 1)), codes(second.flatten(0, 1))
        return (z1 - z2).abs().view(n, batch, -1).mean(1), k

    x_tr, y_tr = points(n_train)
    x_ev, y_ev = points(n_eval)
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    train_acc, eval_acc = _linear_classifier_accuracy(x_tr, y_tr, x_ev, y_ev, seed)
    return {"train_accuracy": train_acc, "eval_accuracy": eval_acc}


def factor_vae_metric(codes: Representation, sizes: Sizes, g: torch.Generator, batch: int = 64,
                      n_train: int = 10_000, n_eval: int = 5_000, n_variance: int = 10_000,
                      prune: float = 0.05) -> dict[str, float]:
    global_var = codes(random_classes(n_variance, sizes, g)).var(0)
    active = global_var.sqrt() >= prune  # disentanglement_lib prunes by standard deviation
    if not active.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "active_dims": 0}
    scale = global_var.sqrt()

    def votes(n: int) -> torch.Tensor:
        k, classes = _fixed_factor_batches(n, batch, sizes, g)
        z = (codes(classes.flatten(0, 1)) / scale).view(n, batch, -1)
        var = z.var(1)[:, active]
        dims = active.nonzero().flatten()[var.argmin(1)]
        table = torch.zeros(len(global_var), len(sizes))
        table.index_put_((dims, k), torch.ones(n), accumulate=True)
        return table

    train_votes, eval_votes = votes(n_train), votes(n_eval)
    assign = train_votes.argmax(1)  # each dimension predicts its most voted factor
    train_acc = train_votes.max(1).values.sum() / train_votes.sum()
    eval_acc = eval_votes[torch.arange(len(assign)), assign].sum() / eval_votes.sum()
    return {"train_accuracy": train_acc.item(), "eval_accuracy": eval_acc.item(), "active_dims": int(active.sum())}


def _discretise(z: torch.Tensor, bins: int) -> torch.Tensor:
    lo, hi = z.min(0).values, z.max(0).values
    return ((z - lo) / (hi - lo).clamp_min(1e-12) * bins).long().clamp_(0, bins - 1)


def _mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """I(a; b) in nats for two discrete sequences, from their joint histogram."""
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return (p[nz] * (p[nz] / (pa @ pb)[nz]).log()).sum().item()


def mig(codes: Representation, sizes: Sizes, g: torch.Generator, n: int = 10_000,
        bins: int = 20) -> dict[str, float]:
    classes = random_classes(n, sizes, g)
    z = _discretise(codes(classes), bins)
    per_factor = []
    for k in range(len(sizes)):
        mi = sorted((_mutual_information(z[:, j], classes[:, k]) for j in range(z.shape[1])), reverse=True)
        entropy = _mutual_information(classes[:, k], classes[:, k])
        gap = (mi[0] - (mi[1] if len(mi) > 1 else 0.0)) / entropy
        per_factor.append(gap)
    return {"mig": sum(per_factor) / len(sizes), "per_factor": per_factor}


def _train_test(codes: Representation, sizes: Sizes, g: torch.Generator, n_train: int,
                n_test: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) as float64 codes (N, d) and integer factor classes (N, F)."""
    train, test = random_classes(n_train, sizes, g), random_classes(n_test, sizes, g)
    return (codes(train).double().numpy(), train.numpy(), codes(test).double().numpy(), test.numpy())


def dci_scores(importance: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) of a (codes x factors) importance matrix, as Eastwood & Williams define
    them (with disentanglement_lib's 1e-11 guard against empty rows)."""
    per_code = 1.0 - entropy(importance.T + 1e-11, base=importance.shape[1])
    per_factor = 1.0 - entropy(importance + 1e-11, base=importance.shape[0])
    w = importance if importance.sum() > 0 else np.ones_like(importance)
    return float(np.sum(per_code * w.sum(1) / w.sum())), float(np.sum(per_factor * w.sum(0) / w.sum()))


def dci(codes: Representation, sizes: Sizes, g: torch.Generator, n_train: int = 10_000, n_test: int = 5_000,
        seed: int = 0) -> dict[str, float | list]:
    x, y, x_test, y_test = _train_test(codes, sizes, g, n_train, n_test)
    importance = np.zeros((x.shape[1], y.shape[1]))
    train_acc, test_acc = [], []
    for k in range(y.shape[1]):
        model = GradientBoostingClassifier(random_state=seed).fit(x, y[:, k])
        importance[:, k] = np.abs(model.feature_importances_)
        train_acc.append(float(np.mean(model.predict(x) == y[:, k])))
        test_acc.append(float(np.mean(model.predict(x_test) == y_test[:, k])))
    d, c = dci_scores(importance)
    return {"disentanglement": d, "completeness": c, "informativeness_train": float(np.mean(train_acc)),
            "informativeness_test": float(np.mean(test_acc)), "importance": importance.tolist()}


def top_two_gap(scores: np.ndarray) -> float:
    """Mean over factors (columns) of the best minus the second-best code's score."""
    top = np.sort(scores, axis=0)[::-1]
    return float(np.mean(top[0] - top[1])) if len(top) > 1 else float(np.mean(top[0]))


def sap(codes: Representation, sizes: Sizes, g: torch.Generator, n_train: int = 10_000,
        n_test: int = 5_000) -> dict[str, float | list]:
    x, y, x_test, y_test = _train_test(codes, sizes, g, n_train, n_test)
    scores = np.zeros((x.shape[1], y.shape[1]))
    for i in range(x.shape[1]):
        for k in range(y.shape[1]):
            svm = LinearSVC(C=0.01, class_weight="balanced")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                svm.fit(x[:, i:i + 1], y[:, k])
            scores[i, k] = np.mean(svm.predict(x_test[:, i:i + 1]) == y_test[:, k])
    return {"sap": top_two_gap(scores), "scores": scores.tolist()}
