"""The metrics ``evaluate.py`` reports, registered by their ``--metrics`` name in ``METRICS``.

A metric is one ``Metric`` entry: ``compute`` fills its part of the results (eval.json) from an
``Evaluation`` (utils/evaluation/context.py: the model, the held-out split, the process group and
the command's options), ``rows`` turns that part into lines of the printed table, ``headline`` into
the model card's rows, and ``flags`` declares its own ``evaluate.py`` options (default, help,
check), from which ``evaluate.py`` builds its parser. Adding one is a function or three and an
entry; the docs' table of metrics is generated from the registry (``metrics_markdown``). ELBO and
NLL share one pass over the held-out set (the NLL's k samples give the ELBO too), as active units
and reconstruction share another.

The declarations load no torch, so that ``evaluate.py --help`` and its argument errors answer at
once: a compute function imports what it computes with when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.sampler_rules import SAMPLERS, declared_options
from utils.fields import Option

if TYPE_CHECKING:
    from utils.evaluation.context import Evaluation

Rows = list[tuple[str, str]]


# the options several metrics read, declared once here; a metric's own options are declared in its entry
COMMON = (
    Option("n_test", 0, "held-out images to use (default 0: all)"),
    Option("batch_size", 100, "images per batch", min=1),
    Option("binarize", False, "bernoulli models: evaluate on the stochastically binarised held-out set (fixed "
                              "seed), as published", type=bool),
    Option("seed", 0),
)


@dataclass(frozen=True)
class Metric:
    """A registered metric. ``default``: computed when --metrics is not given; ``needs_factors``: only on data
    with ground-truth factors (``DataSet.has_factors``), and then a default; ``main_only``: computed by
    the main process alone; ``needs_posterior``: only for a model with a posterior and a KL (not an AE).
    ``flags``: its own ``evaluate.py`` options; ``reads``: the shared ones its numbers depend on (``COMMON``, and
    the sampler flags of utils/inference/loading.py)."""

    help: str
    compute: Callable[[Evaluation], None]
    rows: Callable[[dict], Rows] = lambda results: []
    headline: Callable[[dict], Rows] = lambda results: []
    default: bool = False
    needs_factors: bool = False
    main_only: bool = False
    needs_posterior: bool = False  # a bound on log p(x) or a KL: not for a deterministic autoencoder
    flags: tuple[Option, ...] = ()
    reads: tuple[str, ...] = ("n_test", "seed")
    draws: Callable[[argparse.Namespace, Any], list[str]] = lambda options, vae: []  # samplers it draws codes from

    def takes(self, option: str) -> bool:
        """Whether its numbers depend on ``option`` (its own flag, recorded or not, or a shared one it reads)."""
        return option in self.reads or any(o.name == option for o in self.flags)

    @property
    def options(self) -> tuple[str, ...]:
        """The evaluate.py options its numbers depend on, as eval.json's ``computed_with`` records them: its own
        recorded flags, then the shared ones it reads."""
        return tuple(o.name for o in self.flags if o.recorded) + self.reads


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
    keys = ("active_units", "z_dim", "variance", "kl_per_dim", "kl", "kl_to", "layers")
    ev.results["au"] = {key: u[key] for key in keys if key in u}  # layers: a ladder's, bottom first


def _au_rows(results: dict) -> Rows:
    u = results["au"]
    to = "" if u.get("kl_to", "prior") == "prior" else f" to {u['kl_to']}"
    kl = "top layer's KL" if "layers" in u else "KL"  # (a ladder's z is its top layer)
    rows = [("active units", f"{u['active_units']} of {u['z_dim']} (Var_x E[z] > 0.01); {kl}{to} {u['kl']:.2f}")]
    if "layers" in u:
        rows.append(("  per layer", ", ".join(f"z_{i + 1}: {v['active_units']} of {v['z_dim']}"
                                              for i, v in enumerate(u["layers"]))))
    return rows


def _recon(ev: Evaluation) -> None:
    u = ev.usage()
    ev.results["recon"] = {k: u[k] for k in ("mse", "psnr", "ssim", "ms_ssim", "ms_ssim_scales")}


def _recon_rows(results: dict) -> list[tuple[str, str]]:
    r = results["recon"]
    text = f"MSE {r['mse']:.5f}, PSNR {r['psnr']:.2f} dB"
    if r.get("ssim") is not None:  # (None: images smaller than SSIM's window; absent: an older eval.json)
        text += f", SSIM {r['ssim']:.4f}, MS-SSIM {r['ms_ssim']:.4f} ({r['ms_ssim_scales']} scales)"
    return [("reconstruction", text)]


def _fid(ev: Evaluation) -> None:
    from utils.evaluation.fid import build_fid, fid_score

    o, acc = ev.options, ev.accelerator
    metric = build_fid(o.fid_weights, device=acc.device)
    n = min(o.fid_samples, len(ev.test))
    sampler = ev.sampler(o.sampler)
    with ev.bar(n, f"FID ({o.sampler})") as bar:
        score = fid_score(ev.vae, ev.test, metric, n, o.batch_size, acc.device, acc.process_index,
                          acc.num_processes, o.seed, bar, draw=sampler.sample)
    ev.results["fid"] = {"fid": score, "n": n, "features": "inception-v3 pool3 (2048)", "sampler": o.sampler}


def _quality(ev: Evaluation) -> None:
    """Samples from --sampler against held-out images in the data set's own feature space (sample_quality.py)."""
    from utils.evaluation.sample_quality import sampled

    sampler = ev.sampler(ev.options.sampler)
    ev.results["quality"] = {**_scored(ev, sampled(ev.vae, sampler.sample), f"{ev.options.sampler} samples"),
                             "sampler": ev.options.sampler}


def _recon_quality(ev: Evaluation) -> None:
    """Reconstructions of held-out images against those images, in the same feature space (rFID's set-up)."""
    from utils.evaluation.sample_quality import reconstructed

    ev.results["recon_quality"] = _scored(ev, reconstructed(ev.vae), "reconstructions")


def _scored(ev: Evaluation, generate: Any, what: str) -> dict:
    """The quality scores of ``what`` the generator makes, in the features of the run's data set's network."""
    from utils.evaluation.sample_quality import feature_net_for, sample_quality

    o = ev.options
    net = feature_net_for(o.features, ev.vae.config.data.name, tuple(ev.test.shape))
    n = min(o.quality_samples, len(ev.test))
    with ev.bar(n, f"quality of {what} in {net.identity}") as bar:
        return sample_quality(ev.test, net, n, o.batch_size, ev.accelerator.device, generate, o.seed,
                              o.kid_subsets, o.kid_subset_size, bar)


def _quality_rows(results: dict, key: str = "quality") -> Rows:
    q = results[key]
    what = f"{q['n_generated']} samples ({q['sampler']})" if key == "quality" else \
        f"{q['n_generated']} reconstructions"
    return [("sample quality" if key == "quality" else "reconstruction quality",
             f"FD {q['fd']:.4g}, KID {q['kid_mean']:.4g} ± {q['kid_sd']:.2g}, precision {q['precision']:.3f}, "
             f"recall {q['recall']:.3f}, density {q['density']:.3f}, coverage {q['coverage']:.3f}, two-sample "
             f"accuracy {q['c2st_accuracy']:.3f}"),
            ("  in", f"{q['features']}'s features, {what} vs held-out images (not comparable with Inception FID)")]


def _samplers(ev: Evaluation) -> None:
    """Each usable sampler's two offline numbers (utils/evaluation/samplers.py), fitting what is not fitted yet."""
    from utils.evaluation.latents import posterior_stats
    from utils.evaluation.samplers import sampler_scores

    device = ev.accelerator.device
    train = posterior_stats(ev.vae, ev.train(), device=device)[0].cpu()
    test = posterior_stats(ev.vae, ev.test, limit=ev.options.n_test, device=device)[0].cpu()
    names = [n for n in SAMPLERS if SAMPLERS[n].fitted or ev.vae.has_prior]
    ev.results["samplers"] = {n: sampler_scores(ev.sampler(n), train, test, seed=ev.options.seed) for n in names}


def _every_fitted_sampler(options: argparse.Namespace, vae: Any) -> list[str]:
    """The samplers the comparison fits (each one fitted to codes; a conditional model's codes are not one
    density, and no fitted sampler takes it)."""
    return [] if vae.n_classes else [n for n, s in SAMPLERS.items() if s.fitted]


def _sampler_rows(results: dict) -> Rows:
    return [(f"sampler {name}", f"held-out codes {s['held_out']:.2f} nats/code, its draws under the training codes "
                                f"{s['reverse']:.2f}") for name, s in results["samplers"].items()]


def _disentanglement(ev: Evaluation) -> None:
    """The five scores on the factors the held-out split declares (``ImageSplit.factors``), one generator seeded
    with --seed shared by the five, in this order."""
    import torch

    from utils.evaluation.disentanglement import beta_vae_metric, dci, factor_vae_metric, mig, representation, sap

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


def _size(name: str, default: int, help: str) -> Option:
    """A disentanglement sample size: its entry records the sizes it used ("sizes"), not computed_with."""
    return Option(name, default, help, min=1, recorded=False)


SIZES = (_size("dis_batch", 64, "disentanglement: images per point (paper: 64)"),
         _size("dis_train", 10_000, "disentanglement: training points (10,000)"),
         _size("dis_eval", 5_000, "disentanglement: evaluation points (5,000)"),
         _size("dis_variance", 10_000, "FactorVAE: images for the global variance"),
         _size("mig_samples", 10_000, "MIG: images (10,000)"),
         _size("dci_train", 10_000, "DCI and SAP: training images (10,000)"),
         _size("dci_test", 5_000, "DCI and SAP: held-out images (5,000)"))

METRICS: dict[str, Metric] = {
    "elbo": Metric("evidence lower bound, its reconstruction and KL parts (nats per image, bits per dimension)",
                   _elbo, rows=_bound_rows, default=True, needs_posterior=True, reads=BOUND_OPTIONS,
                   headline=lambda r: [("ELBO", f"{r['elbo']['elbo']:.2f} nats")]),
    "nll": Metric("negative log-likelihood by the importance-weighted bound with --k samples (Burda et al. 2016)",
                  _nll, default=True, needs_posterior=True, reads=BOUND_OPTIONS,
                  flags=(Option("k", 1000, "importance samples per image for the NLL (default 1000)", min=1),),
                  headline=lambda r: [(f"NLL (IWAE, k={r['nll']['k']}, {r['nll']['n']} images)",
                                       f"{r['nll']['nll']:.2f} nats ({r['nll']['nll_bpd']:.4f} bits/dim)")]),
    "au": Metric("active units (Var_x E[z_j] > 0.01) and the KL per latent dimension", _au, rows=_au_rows,
                 default=True, needs_posterior=True,
                 headline=lambda r: [("active units", f"{r['au']['active_units']} of {r['au']['z_dim']}")]),
    "recon": Metric("reconstruction error of the posterior means: MSE, PSNR, SSIM and MS-SSIM (its scales fitted "
                    "to the image size)", _recon, default=True, rows=_recon_rows),
    "fid": Metric("FID of --fid_samples prior samples against held-out images (Inception-v3, --fid_weights)", _fid,
                  flags=(Option("fid_samples", 10_000, "samples and held-out images for FID", min=1),
                         Option("fid_weights", None, "local copy of the standard Inception weights "
                                                     "(pt_inception-...pth)", type=str, recorded=False)),
                  reads=("sampler", "seed"), draws=lambda options, vae: [options.sampler],
                  rows=lambda r: [("FID", f"{r['fid']['fid']:.2f} ({r['fid']['n']} samples vs held-out images)")],
                  headline=lambda r: [("FID", f"{r['fid']['fid']:.2f} ({r['fid']['n']} samples)")]),
    "quality": Metric("sample quality in the data set's own feature network (python -m utils.inference.features): "
                      "Fréchet distance, KID, precision, recall, density, coverage and a classifier two-sample "
                      "test of --quality_samples samples from --sampler against held-out images", _quality,
                      flags=(Option("features", None, "quality, recon_quality: the feature network (default "
                                                      "features/<data set>.safetensors)", type=str, recorded=False),
                             Option("quality_samples", 10_000, "quality, recon_quality: images compared", min=1),
                             Option("kid_subsets", 100, "quality, recon_quality: KID's random subsets", min=1),
                             Option("kid_subset_size", None, "quality, recon_quality: images in each KID subset "
                                    "(default 1000, or half the images compared when fewer than 2,000)", min=2)),
                      reads=("sampler", "seed"), draws=lambda options, vae: [options.sampler], main_only=True,
                      rows=_quality_rows,
                      headline=lambda r: [(f"sample quality ({r['quality']['features']})",
                                           f"FD {r['quality']['fd']:.4g}, precision {r['quality']['precision']:.3f}, "
                                           f"recall {r['quality']['recall']:.3f}")]),
    "recon_quality": Metric("the scores of quality for the reconstructions of --quality_samples held-out images "
                            "against those images (rFID's set-up), in the same feature network", _recon_quality,
                            reads=("features", "quality_samples", "kid_subsets", "kid_subset_size", "seed"),
                            main_only=True, rows=lambda r: _quality_rows(r, "recon_quality"),
                            headline=lambda r: [(f"reconstruction quality ({r['recon_quality']['features']})",
                                                 f"FD {r['recon_quality']['fd']:.4g}")]),
    "samplers": Metric(f"how well each ex-post sampler ({', '.join(SAMPLERS)}) fits the codes: the mean "
                       "log-density of held-out codes under it, and of its draws under the training codes' KDE "
                       "(nats per code)", _samplers, rows=_sampler_rows, main_only=True,
                       reads=("n_test", "seed", *(o.name for o in declared_options().values() if o.flag)),
                       draws=_every_fitted_sampler),
    "disentanglement": Metric("beta-VAE and FactorVAE metrics, MIG, DCI and SAP on ground-truth factors",
                              _disentanglement, rows=_disentanglement_rows, needs_factors=True, main_only=True,
                              flags=SIZES,
                              reads=("seed",)),
}


def metric_options() -> list[Option]:
    """Every option the metrics declare, each once: the shared ones, then each metric's own in the registry's
    order (evaluate.py's parser, in this order)."""
    seen: dict[str, str] = {o.name: "the shared options" for o in COMMON}
    options = list(COMMON)
    for name, m in METRICS.items():
        for o in m.flags:
            if o.name in seen:
                raise ValueError(f"--{o.name} of metric {name} is already declared by {seen[o.name]}: declare an "
                                 f"option once, in COMMON when several metrics read it")
            seen[o.name] = f"metric {name}"
            options.append(o)
    return options


def add_metric_arguments(p: argparse.ArgumentParser) -> None:
    for o in metric_options():
        o.add_to(p)


def check_metric_options(args: argparse.Namespace) -> None:
    """Each declared option's check, in declaration order: the first bad one is refused in one line."""
    for o in metric_options():
        o.check(getattr(args, o.name))


def default_metrics(has_factors: bool, deterministic: bool = False) -> list[str]:
    return [name for name, m in METRICS.items() if (m.default or (m.needs_factors and has_factors))
            and not (m.needs_posterior and deterministic)]


def table(results: dict) -> str:
    """The printed table: each computed metric's rows, in the registry's order."""
    rows = [row for name, m in METRICS.items() if name in results for row in m.rows(results)]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def computed_with(results: dict, options: argparse.Namespace) -> dict[str, dict]:
    """For each metric entry in ``results``, the options its numbers were computed with (eval.json keeps them
    beside the numbers: entries of several calls can differ)."""
    unrecorded = {o.name for m in METRICS.values() for o in m.flags if not o.recorded}
    return {name: {o: getattr(options, o) for o in m.options if o not in unrecorded}
            for name, m in METRICS.items() if name in results}


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
