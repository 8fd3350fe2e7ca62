"""The metrics ``evaluate.py`` reports, registered by their ``--metrics`` name in ``METRICS``.

A metric is one ``Metric`` entry: ``compute`` fills its part of the results (eval.json) from an
``Evaluation`` (the model, the held-out split, the process group and the command's options),
``rows`` turns that part into lines of the printed table, and ``headline`` into the model card's
rows. Adding one is a function or three and an entry; the docs' table of metrics is generated
from the registry (``metrics_markdown``). ELBO and NLL share one pass over the held-out set (the
NLL's k samples give the ELBO too), as active units and reconstruction share another.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from models.samplers import SAMPLERS, Sampler
from models.vae import VAE
from utils.data.registry import load_data
from utils.data.splits import ImageSplit
from utils.evaluation.bounds import fix_optimal_sigma, latent_usage, likelihood_bounds
from utils.evaluation.disentanglement import beta_vae_metric, dci, factor_vae_metric, mig, representation, sap
from utils.evaluation.fid import build_fid, fid_score
from utils.evaluation.latents import posterior_stats
from utils.evaluation.samplers import fitted_sampler, sampler_scores

Rows = list[tuple[str, str]]


@dataclass
class Evaluation:
    """What every metric reads: the model, the held-out split, the processes, the options, and the results so
    far (``results``, written to eval.json)."""

    vae: VAE
    test: ImageSplit
    accelerator: Accelerator
    options: Namespace  # evaluate.py's parsed options: k, n_test, batch_size, seed, fid_*, dis_*, sampler_options, ..
    metrics: list[str]
    results: dict[str, Any]
    _cache: dict[str, Any] = field(default_factory=dict)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not self.accelerator.is_main_process, mininterval=2.0)

    def bounds(self) -> dict[str, Any]:
        """ELBO and IWAE bound in one pass (k = --k when the NLL is asked for, else 1); optimal σ fixed first."""
        if "bounds" not in self._cache:
            o = self.options
            self.results["sigma"] = fix_optimal_sigma(self.vae, self.test, o.batch_size, self.accelerator, o.n_test)
            k = o.k if "nll" in self.metrics else 1
            n = len(self.test) if o.n_test <= 0 else min(o.n_test, len(self.test))
            with self.bar(n, f"ELBO and IWAE (k={k})") as bar:
                self._cache["bounds"] = likelihood_bounds(self.vae, self.test, k, self.accelerator, o.batch_size,
                                                          limit=o.n_test, seed=o.seed, binarize=o.binarize,
                                                          progress=bar)
        return self._cache["bounds"]

    def train(self) -> ImageSplit:
        """The training split (read once, on first use: the fitted samplers need its codes)."""
        if "train" not in self._cache:
            cfg = self.vae.config.data
            self._cache["train"] = load_data(cfg, cfg.num_workers)[0].to(self.accelerator.device)
        return self._cache["train"]

    def sampler(self, name: str) -> Sampler:
        """The sampler ``name``: the prior, or kept in the model's folder, or fitted now (and kept)."""
        o = self.options
        return fitted_sampler(self.vae, self.vae.sampler_folder, name, self.train, o.sampler_options, o.refit,
                              self.accelerator.device)

    def usage(self) -> dict[str, Any]:
        """Active units, per-dimension KL and reconstruction error, in one pass."""
        if "usage" not in self._cache:
            o = self.options
            self._cache["usage"] = latent_usage(self.vae, self.test, self.accelerator, o.batch_size, o.n_test)
        return self._cache["usage"]


@dataclass(frozen=True)
class Metric:
    """A registered metric. ``default``: computed when --metrics is not given; ``needs_factors``: only on data
    with ground-truth factors (``DataSet.has_factors``), and then a default; ``main_only``: computed by
    the main process alone; ``needs_posterior``: only for a model with a posterior and a KL (not an AE)."""

    help: str
    compute: Callable[[Evaluation], None]
    rows: Callable[[dict], Rows] = lambda results: []
    headline: Callable[[dict], Rows] = lambda results: []
    default: bool = False
    needs_factors: bool = False
    main_only: bool = False
    needs_posterior: bool = False  # a bound on log p(x) or a KL: not for a deterministic autoencoder
    options: tuple[str, ...] = ("n_test", "seed")  # the evaluate.py options its numbers depend on (eval.json)


def _elbo(ev: Evaluation) -> None:
    b = ev.bounds()
    ev.results["elbo"] = {key: b[key] for key in ("elbo", "rec", "kl", "elbo_bpd", "n", "dequantised", "binarised",
                                                  "kl_estimate")}


def _nll(ev: Evaluation) -> None:
    """The bound's pass gives the ELBO too: both are reported."""
    _elbo(ev)
    ev.results["nll"] = ev.bounds()


def _bound_rows(results: dict) -> Rows:
    """The ELBO, the NLL when it was computed, and the images they are on (the NLL's line belongs here)."""
    b = results.get("nll") or results["elbo"]
    rows = [("ELBO", f"{b['elbo']:.2f} nats  ({b['elbo_bpd']:.4f} bits/dim)  rec {b['rec']:.2f}, KL {b['kl']:.2f}"
                     + ("" if b["kl_estimate"] == "closed form" else f" ({b['kl_estimate']})"))]
    if "nll" in results:
        rows.append((f"NLL (IWAE, k={b['k']})", f"{b['nll']:.2f} nats  ({b['nll_bpd']:.4f} bits/dim)"))
    how = "dequantised, 8-bit scale" if b["dequantised"] else ("binarised" if b["binarised"] else "as is")
    rows.append(("  on", f"{b['n']} held-out images, {how}"
                 + (f", sigma {results['sigma']:.4f}" if results.get("sigma") else "")))
    return rows


def _au(ev: Evaluation) -> None:
    u = ev.usage()
    ev.results["au"] = {key: u[key] for key in ("active_units", "z_dim", "variance", "kl_per_dim", "kl", "kl_to")}


def _au_rows(results: dict) -> Rows:
    u = results["au"]
    to = "" if u.get("kl_to", "prior") == "prior" else f" to {u['kl_to']}"
    return [("active units", f"{u['active_units']} of {u['z_dim']} (Var_x E[z] > 0.01); KL{to} {u['kl']:.2f}")]


def _recon(ev: Evaluation) -> None:
    u = ev.usage()
    ev.results["recon"] = {"mse": u["mse"], "psnr": u["psnr"]}


def _fid(ev: Evaluation) -> None:
    o, acc = ev.options, ev.accelerator
    metric = build_fid(o.fid_weights, device=acc.device)
    n = min(o.fid_samples, len(ev.test))
    sampler = ev.sampler(o.sampler)
    with ev.bar(n, f"FID ({o.sampler})") as bar:
        score = fid_score(ev.vae, ev.test, metric, n, o.batch_size, acc.device, acc.process_index,
                          acc.num_processes, o.seed, bar, draw=sampler.sample)
    ev.results["fid"] = {"fid": score, "n": n, "features": "inception-v3 pool3 (2048)", "sampler": o.sampler}


def _samplers(ev: Evaluation) -> None:
    """Each usable sampler's two offline numbers (utils/evaluation/samplers.py), fitting what is not fitted yet."""
    device = ev.accelerator.device
    train = posterior_stats(ev.vae, ev.train(), device=device)[0].cpu()
    test = posterior_stats(ev.vae, ev.test, limit=ev.options.n_test, device=device)[0].cpu()
    names = [n for n in SAMPLERS if n != "prior" or ev.vae.has_prior]
    ev.results["samplers"] = {n: sampler_scores(ev.sampler(n), train, test, seed=ev.options.seed) for n in names}


def _sampler_rows(results: dict) -> Rows:
    return [(f"sampler {name}", f"held-out codes {s['held_out']:.2f} nats/code, its draws under the training codes "
                                f"{s['reverse']:.2f}") for name, s in results["samplers"].items()]


def _disentanglement(ev: Evaluation) -> None:
    """The five scores on the factors the held-out split declares (``ImageSplit.factors``), one generator seeded
    with --seed shared by the five, in this order."""
    o, factors = ev.options, ev.test.factors
    codes, sizes = representation(ev.vae, factors, ev.accelerator.device), factors.sizes
    g = torch.Generator().manual_seed(o.seed)
    ev.results["disentanglement"] = {
        "beta_vae": beta_vae_metric(codes, sizes, g, o.dis_batch, o.dis_train, o.dis_eval),
        "factor_vae": factor_vae_metric(codes, sizes, g, o.dis_batch, o.dis_train, o.dis_eval, o.dis_variance),
        "mig": mig(codes, sizes, g, o.mig_samples),
        "dci": dci(codes, sizes, g, o.dci_train, o.dci_test, o.seed),
        "sap": sap(codes, sizes, g, o.dci_train, o.dci_test),
        "sizes": {"batch": o.dis_batch, "train": o.dis_train, "eval": o.dis_eval, "variance": o.dis_variance,
                  "mig": o.mig_samples, "dci_train": o.dci_train, "dci_test": o.dci_test}}


def _disentanglement_rows(results: dict) -> Rows:
    d = results["disentanglement"]
    return [("beta-VAE metric", f"{d['beta_vae']['eval_accuracy']:.3f}"),
            ("FactorVAE metric", f"{d['factor_vae']['eval_accuracy']:.3f}"),
            ("MIG", f"{d['mig']['mig']:.3f}"),
            ("DCI", f"disentanglement {d['dci']['disentanglement']:.3f}, completeness {d['dci']['completeness']:.3f}, "
                    f"informativeness {d['dci']['informativeness_test']:.3f}"),
            ("SAP", f"{d['sap']['sap']:.3f}")]


BOUND_OPTIONS = ("n_test", "seed", "binarize")

METRICS: dict[str, Metric] = {
    "elbo": Metric("evidence lower bound, its reconstruction and KL parts (nats per image, bits per dimension)",
                   _elbo, rows=_bound_rows, default=True, needs_posterior=True, options=BOUND_OPTIONS,
                   headline=lambda r: [("ELBO", f"{r['elbo']['elbo']:.2f} nats")]),
    "nll": Metric("negative log-likelihood by the importance-weighted bound with --k samples (Burda et al. 2016)",
                  _nll, default=True, needs_posterior=True, options=("k", *BOUND_OPTIONS),
                  headline=lambda r: [(f"NLL (IWAE, k={r['nll']['k']}, {r['nll']['n']} images)",
                                       f"{r['nll']['nll']:.2f} nats ({r['nll']['nll_bpd']:.4f} bits/dim)")]),
    "au": Metric("active units (Var_x E[z_j] > 0.01) and the KL per latent dimension", _au, rows=_au_rows,
                 default=True, needs_posterior=True,
                 headline=lambda r: [("active units", f"{r['au']['active_units']} of {r['au']['z_dim']}")]),
    "recon": Metric("reconstruction error of the posterior means: MSE and PSNR", _recon, default=True,
                    rows=lambda r: [("reconstruction", f"MSE {r['recon']['mse']:.5f}, PSNR "
                                                       f"{r['recon']['psnr']:.2f} dB")]),
    "fid": Metric("FID of --fid_samples prior samples against held-out images (Inception-v3, --fid_weights)", _fid,
                  options=("fid_samples", "sampler", "seed"),
                  rows=lambda r: [("FID", f"{r['fid']['fid']:.2f} ({r['fid']['n']} samples vs held-out images)")],
                  headline=lambda r: [("FID", f"{r['fid']['fid']:.2f} ({r['fid']['n']} samples)")]),
    "samplers": Metric("how well each ex-post sampler (prior, gmm, two_stage) fits the codes: the mean "
                       "log-density of held-out codes under it, and of its draws under the training codes' KDE "
                       "(nats per code)", _samplers, rows=_sampler_rows, main_only=True,
                       options=("n_test", "seed", "gmm_components", "gmm_covariance", "two_stage_steps")),
    "disentanglement": Metric("beta-VAE and FactorVAE metrics, MIG, DCI and SAP on ground-truth factors",
                              _disentanglement, rows=_disentanglement_rows, needs_factors=True, main_only=True,
                              options=("seed",)),
}


def default_metrics(has_factors: bool, deterministic: bool = False) -> list[str]:
    return [name for name, m in METRICS.items() if (m.default or (m.needs_factors and has_factors))
            and not (m.needs_posterior and deterministic)]


def table(results: dict) -> str:
    """The printed table: each computed metric's rows, in the registry's order."""
    rows = [row for name, m in METRICS.items() if name in results for row in m.rows(results)]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def computed_with(results: dict, options: Namespace) -> dict[str, dict]:
    """For each metric entry in ``results``, the options its numbers were computed with (eval.json keeps them
    beside the numbers: entries of several calls can differ)."""
    return {name: {o: getattr(options, o) for o in m.options} for name, m in METRICS.items() if name in results}


def merge_results(earlier: dict, now: dict) -> tuple[dict, list[str]]:
    """eval.json after this call: the earlier file's metric entries that this call did not recompute are kept,
    those it recomputed are replaced, each with what it was computed with. Returns (merged, kept names).
    Entries computed on other weights (another SHA-256) are not kept: they describe another model."""
    had = earlier.get("weights", {}).get("sha256")
    if had is not None and had != now["weights"]["sha256"]:
        return now, []
    kept = [name for name in METRICS if name in earlier and name not in now]
    merged = dict(now)
    for name in kept:
        merged[name] = earlier[name]
    if "sigma" in earlier and "sigma" not in now and ({"elbo", "nll"} & set(kept)):
        merged["sigma"] = earlier["sigma"]  # the optimal σ the kept bounds were computed with
    merged["computed_with"] = {**{n: w for n, w in earlier.get("computed_with", {}).items() if n in kept},
                               **now.get("computed_with", {})}
    merged["computed_with"] = {n: merged["computed_with"][n] for n in METRICS if n in merged["computed_with"]}
    merged["metrics"] = [n for n in METRICS if n in merged]
    return merged, kept


def headline(results: dict) -> Rows:
    """The model card's rows: each computed metric's headline, in the registry's order."""
    return [row for name, m in METRICS.items() if name in results for row in m.headline(results)]


def metrics_markdown() -> str:
    """The docs' table of metrics, generated from the registry."""
    lines = ["| `--metrics` name | what it reports | default |", "| --- | --- | --- |"]
    for name, m in METRICS.items():
        default = "yes" if m.default else ("on data with ground-truth factors" if m.needs_factors else "no")
        lines.append(f"| `{name}` | {m.help} | {default} |")
    return "\n".join(lines)
