"""sample.py's modes, by their ``--mode`` name: each one entry of ``MODES`` that carries everything about it.

A mode is a function ``(model, cfg, args, generator, out) -> written paths`` whose docstring is its line in the
docs, the flags only it reads (argparse's names and keywords, and the check of each value), and whether it draws
codes (so that a sampler flag that would change nothing is refused). sample.py builds its parser and its checks
from here. The declarations import nothing heavy: ``sample.py --help`` and a bad flag are answered before torch
loads, so each mode imports torch and its helpers where it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.errors import UserError

if TYPE_CHECKING:
    import torch

    from utils.config import Config
    from utils.data.splits import ImageSplit
    from utils.inference.trained import TrainedVAE


@dataclass(frozen=True)
class Flag:
    """One flag: ``names`` and ``options`` as ``argparse.add_argument`` takes them; ``valid`` a test of the parsed
    value with the words of its refusal (``--n_pairs must be at least 1, got 0``), checked before anything loads;
    ``fits(value, model)`` the refusal of a value the loaded model cannot take (None: it can)."""

    names: tuple[str, ...]
    options: dict[str, Any]
    valid: tuple[Callable[[Any], bool], str] | None = None
    fits: Callable[[Any, TrainedVAE], str | None] | None = None

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments that holds the value."""
        return self.options.get("dest") or self.names[-1].lstrip("-")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.names, **self.options)

    def problem(self, args: argparse.Namespace) -> str | None:
        """The one-line refusal of this flag's value in ``args``, or None when it is valid."""
        value = getattr(args, self.dest)
        if self.valid is None or self.valid[0](value):
            return None
        return f"{self.names[-1]} {self.valid[1]}, got {value}"

    def misfit(self, args: argparse.Namespace, model: TrainedVAE) -> str | None:
        """The one-line refusal of this flag's value for ``model``, or None when the model can take it."""
        return None if self.fits is None else self.fits(getattr(args, self.dest), model)


def flag(*names: str, valid: tuple[Callable[[Any], bool], str] | None = None,
         fits: Callable[[Any, TrainedVAE], str | None] | None = None, **options: Any) -> Flag:
    """A ``Flag``, written as ``add_argument`` is called."""
    return Flag(names, options, valid, fits)


def at_least(low: int, why: str = "") -> tuple[Callable[[Any], bool], str]:
    """The ``valid`` of a count: at least ``low`` (``why``, said in the refusal, when that is not obvious)."""
    return (lambda v: v >= low), f"must be at least {low}{f' ({why})' if why else ''}"


@dataclass(frozen=True)
class Mode:
    """A ``--mode``: ``run`` writes its files into the output folder and returns their paths; ``flags`` are the
    flags it reads (one flag object may serve several modes); ``draws(args)`` says whether it draws codes from the
    sampler, and ``without`` the flags under which it draws none (said when a sampler flag is refused);
    ``needs_labels``: it reads the test set's classes."""

    run: Callable[..., list[Path]]
    flags: tuple[Flag, ...] = ()
    draws: Callable[[argparse.Namespace], bool] = lambda args: False
    without: str = ""
    needs_labels: bool = False

    @property
    def help(self) -> str:
        """One line: the function's docstring."""
        return " ".join((self.run.__doc__ or "").split())

    def draws_none(self, name: str) -> str:
        """What the refusal of a sampler flag says this mode does."""
        return f"--mode {name}{f' {self.without}' if self.without else ''} draws no codes"


def mode_flags() -> list[Flag]:
    """Every mode's flags, each once, in the registry's order: the flags sample.py adds to its own."""
    seen: dict[str, Flag] = {}
    for name, mode in MODES.items():
        for f in mode.flags:
            if seen.setdefault(f.dest, f) is not f:
                raise ValueError(f"--mode {name} declares {f.names[-1]} again: share the one Flag object instead")
    return list(seen.values())


def modes_markdown() -> str:
    """The docs' table of modes, generated from the registry."""
    rows = ["| `--mode` | what it writes |", "| --- | --- |"]
    rows += [f"| `{name}` | {mode.help} |" for name, mode in MODES.items()]
    return "\n".join(rows)


# ---- what the modes share: decoding, labels, the test set --------------------------------------------------------

def decode(model: TrainedVAE, z: torch.Tensor, batch_size: int, y: torch.Tensor | None = None,
           temperature: float = 0.0, g: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] for codes (N, z) and, for a conditional model, their labels (N,), decoded in batches; a
    Ladder VAE's lower layers drawn at ``temperature`` from ``g`` (0: at their means)."""
    import torch

    ys = [None] * len(z) if y is None else y.to(z.device).split(batch_size)
    with torch.no_grad():
        return torch.cat([model.decode(chunk, c, temperature, g)
                          for chunk, c in zip(z.split(batch_size), ys)]).float().cpu()


def labels_for(model: TrainedVAE, args: argparse.Namespace, n: int, g: torch.Generator,
               given: torch.Tensor | None = None) -> torch.Tensor | None:
    """Labels of n codes for a conditional model (None otherwise): --label, else ``given`` (the test images'
    own), else classes drawn uniformly."""
    import torch

    if not model.n_classes:
        return None
    if args.label is not None:
        return torch.full((n,), args.label, dtype=torch.long)
    return given.cpu() if given is not None else torch.randint(model.n_classes, (n,), generator=g)


def test_set(cfg: Config) -> ImageSplit:
    from utils.data.registry import load_data

    _, test, _ = load_data(cfg.data)
    return test


def pick(n: int, total: int, g: torch.Generator) -> torch.Tensor:
    import torch

    return torch.randperm(total, generator=g)[:n]


# ---- the modes ---------------------------------------------------------------------------------------------------

def mode_sample(model: TrainedVAE, cfg: Config, args: argparse.Namespace, g: torch.Generator,
                out: Path) -> list[Path]:
    """Samples as one grid (--n_samples; --individual: one PNG each), codes from --sampler (the prior, or one
    fitted to the training codes: samples_<sampler>.png); a conditional model: one row per class; a Ladder VAE's
    lower layers at their conditional prior means, or drawn at --temperature."""
    import math

    import torch

    from utils.grids import labelled_rows, save_grid, save_whole

    path = out / "samples.png"
    if model.n_classes and args.label is None:  # one row per class, the same code z down each column
        per = max(1, args.n_samples // model.n_classes)
        z = model.prior.sample(per, g).to(args.device).repeat(model.n_classes, 1)
        y = torch.arange(model.n_classes).repeat_interleave(per)
        x = decode(model, z, args.batch_size, y)
        save_whole(labelled_rows(x, per, [f"class {c}" for c in range(model.n_classes)]), path)
        return [path]
    path = out / f"samples{args.suffix}.png"
    labels = None if args.label is None else torch.full((args.n_samples,), args.label)
    x = decode(model, args.draw(args.n_samples, g), args.batch_size, labels, args.temperature, g)
    save_grid(x, path, per_row=math.ceil(math.sqrt(len(x))))
    paths = [path]
    if args.individual:
        for i, img in enumerate(x):
            paths.append(out / f"sample_{i:04d}.png")
            save_grid(img[None], paths[-1], per_row=1)
    return paths


def mode_interpolate(model: TrainedVAE, cfg: Config, args: argparse.Namespace, g: torch.Generator,
                     out: Path) -> list[Path]:
    """Rows from one code to another (--n_pairs, --n_interpolate, --interp linear or slerp), between prior draws
    and between test images."""
    from utils.evaluation.latents import interpolate
    from utils.grids import save_grid

    p = args.n_pairs
    prior = args.draw(2 * p, g).view(2, p, model.z_dim)
    test = test_set(cfg)
    idx = pick(2 * p, len(test), g)
    y = labels_for(model, args, 2 * p, g, test.labels_at(idx))
    mu, _ = model.encode(test.batch(idx).to(args.device), y)
    # a conditional model decodes each row with one label: --label, else drawn (prior) or the first image's (test)
    rows = {args.sampler: ((prior[0], prior[1]), labels_for(model, args, p, g)), "test": ((mu[:p], mu[p:]), y)}
    paths = []
    for name, ((z0, z1), row_y) in rows.items():
        codes = interpolate(z0, z1, args.n_interpolate, args.interp)  # (P, steps, z)
        y_codes = None if row_y is None else row_y[:p].repeat_interleave(args.n_interpolate)
        x = decode(model, codes.flatten(0, 1), args.batch_size, y_codes)
        paths.append(out / f"interpolate_{name}_{args.interp}.png")
        save_grid(x, paths[-1], per_row=args.n_interpolate)
    return paths


def mode_traverse(model: TrainedVAE, cfg: Config, args: argparse.Namespace, g: torch.Generator,
                  out: Path) -> list[Path]:
    """Each latent dimension swept over ±--traverse_range around a test image's code (or a prior draw), rows
    ordered by KL; a PNG and an animated GIF; a Ladder VAE's lower layer with --layer."""
    import torch

    from utils.evaluation.latents import posterior_stats, traversal_codes

    test = test_set(cfg)
    if 0 < args.layer < model.latent_layers:
        x, names = lower_traversal(model, test, args, g)
        return traversal_files(x, names, args, out)
    means, kl = posterior_stats(model, test, args.batch_size, args.kl_samples, args.device)
    score, what = (means.var(0), "var") if model.deterministic else (kl, "KL")  # an AE: no KL, its codes' variance
    dims = traversed_dims(args, score, "the top layer" if model.hierarchical else "z")
    if args.from_ == "prior":
        base = args.draw(1, g)[0]
        y = labels_for(model, args, 1, g)
    else:
        idx = pick(1, len(test), g)
        y = labels_for(model, args, 1, g, test.labels_at(idx))
        mu, _ = model.encode(test.batch(idx).to(args.device), y)
        base = mu[0]
    values = torch.linspace(-args.traverse_range, args.traverse_range, args.n_traverse, device=args.device)
    codes = traversal_codes(base, dims, values)  # (rows, cols, z)
    x = decode(model, codes.flatten(0, 1), args.batch_size, None if y is None else y.repeat(codes.shape[0] *
                                                                                            codes.shape[1]))
    return traversal_files(x, [f"z{d}  {what} {score[d]:.2f}" for d in dims], args, out)


def lower_traversal(model: TrainedVAE, test: ImageSplit, args: argparse.Namespace,
                    g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """A Ladder VAE's layer --layer (below the top) traversed: each dimension of z_l set to μ_p + v·σ_p for v in
    ±--traverse_range, (μ_p, σ_p) its conditional prior given the layer above, from a test image's posterior means
    (or a prior draw's conditional prior means); the layers below at their conditional prior means. Rows ordered
    by the layer's KL per dimension. (The images (rows·cols, C, H, W), the rows' labels.)"""
    import torch

    from utils.evaluation.latents import layer_kl, traversal_codes

    layer = args.layer - 1
    kl = layer_kl(model, test, layer, args.batch_size, args.kl_samples, args.device)
    dims = traversed_dims(args, kl, f"layer {args.layer}")
    with torch.no_grad():
        if args.from_ == "prior":
            mu_p, logvar_p = model.decoder.prior_means(args.draw(1, g), layer)
            base = mu_p[0]
        else:
            mu, _, below = model.encode_layers(test.batch(pick(1, len(test), g)).to(args.device))
            (q_mu, _), (mu_p, logvar_p), _ = model.decoder.layer_posteriors(mu.float(), below)[layer]
            base = q_mu[0]
        values = torch.linspace(-args.traverse_range, args.traverse_range, args.n_traverse, device=args.device)
        codes = traversal_codes(base, dims, values)  # (rows, cols, z_l)
        for r, d in enumerate(dims):
            codes[r, :, d] = mu_p[0, d] + values * torch.exp(0.5 * logvar_p[0, d])
        x = torch.cat([model.decode_layer(c, layer) for c in codes.flatten(0, 1).split(args.batch_size)])
    return x.float().cpu(), [f"z{args.layer}.{d}  KL {kl[d]:.2f}" for d in dims]


def traversal_files(x: torch.Tensor, names: list[str], args: argparse.Namespace, out: Path) -> list[Path]:
    """traverse.png (a row per name, --n_traverse images each) and traverse.gif from the images x."""
    from utils.grids import grid, labelled_rows, save_whole, to_pil

    path = out / "traverse.png"
    save_whole(labelled_rows(x, args.n_traverse, names), path)
    # animation: frame j shows every traversed dimension at values[j], there and back
    frames = []
    for j in list(range(args.n_traverse)) + list(range(args.n_traverse - 2, 0, -1)):
        column = x.view(len(names), args.n_traverse, *x.shape[1:])[:, j]
        frames.append(to_pil(grid(column, per_row=min(len(names), 8))))
    gif = out / "traverse.gif"
    save_whole(frames[0], gif, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return [path, gif]


def mode_reconstruct(model: TrainedVAE, cfg: Config, args: argparse.Namespace, g: torch.Generator,
                     out: Path) -> list[Path]:
    """Test images above their posterior-mean reconstructions."""
    import torch

    from utils.grids import save_pairs

    test = test_set(cfg)
    idx = pick(args.n_samples, len(test), g)
    x, y = test.batch(idx).to(args.device), labels_for(model, args, len(idx), g, test.labels_at(idx))
    ys = [None] * len(x) if y is None else y.split(args.batch_size)
    with torch.no_grad():  # (a ladder's through every layer)
        recon = torch.cat([model.reconstruction(a, b) for a, b in zip(x.split(args.batch_size), ys)]).float().cpu()
    path = out / "reconstructions.png"
    save_pairs(x.cpu(), recon, path, per_row=min(8, len(x)))
    return [path]


def mode_visualize_latent(model: TrainedVAE, cfg: Config, args: argparse.Namespace, g: torch.Generator,
                          out: Path) -> list[Path]:
    """The test set's posterior means coloured by class (PCA beyond 2 dimensions) and the KL per dimension (not
    for an autoencoder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.evaluation.latents import pca_2d, posterior_stats
    from utils.files import written_whole

    test = test_set(cfg)
    if test.labels is None:
        raise UserError(f"visualize_latent colours points by class, and {cfg.data.name} has no labels: "
                        f"use --mode traverse or sample instead")
    means, kl = posterior_stats(model, test, args.batch_size, args.kl_samples, args.device)
    labels = test.labels[: len(means)].cpu()
    if model.z_dim == 2:
        pts, title, axes = means.cpu(), "latent space: posterior means of test images", ("z0", "z1")
    else:
        pts, ratio = pca_2d(means.cpu())
        title = f"PCA projection of {model.z_dim}-D posterior means ({100 * ratio.sum():.0f}% of variance)"
        axes = (f"PC1 ({100 * ratio[0]:.0f}%)", f"PC2 ({100 * ratio[1]:.0f}%)")
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    for c in labels.unique().tolist():
        sel = labels == c
        ax.scatter(pts[sel, 0].numpy(), pts[sel, 1].numpy(), s=3, alpha=0.6, label=str(c), color=plt.cm.tab10(c % 10))
    ax.set(title=title, xlabel=axes[0], ylabel=axes[1])
    ax.legend(title="class", markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    scatter = out / "latent_scatter.png"
    with written_whole(scatter) as tmp:
        fig.savefig(tmp)
    plt.close(fig)

    if model.deterministic:  # an autoencoder has no KL per dimension to plot
        return [scatter]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    active = kl > 0.01
    ax.bar(range(model.z_dim), kl.cpu().numpy(), color=["tab:blue" if a else "tab:gray" for a in active.tolist()])
    ax.set(title=f"KL per latent dimension ({int(active.sum())} of {model.z_dim} above 0.01 nats)",
           xlabel="latent dimension", ylabel="mean KL (nats)")
    fig.tight_layout()
    bars = out / "kl_per_dim.png"
    with written_whole(bars) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return [scatter, bars]


# ---- the registry ------------------------------------------------------------------------------------------------

def _traverse_dim_fits(value: str, model: TrainedVAE) -> str | None:
    """A dimension of some layer (a Ladder VAE's layer, --layer, is checked when the traversal starts)."""
    size = max(model.config.model.latent_dims or [model.z_dim])
    if value == "all" or (value.isdigit() and int(value) < size):
        return None
    has = f"layers of {model.config.model.latent_dims} dimensions" if model.hierarchical else f"z_dim={model.z_dim}"
    return f"--traverse_dim {value}: the model has {has}; pass 0..{size - 1} or all"


def traversed_dims(args: argparse.Namespace, score: torch.Tensor, layer: str) -> list[int]:
    """The dimensions to traverse, by ``score`` (one per dimension of ``layer``, the words for its refusal)."""
    if args.traverse_dim == "all":
        from utils.evaluation.latents import dims_by_kl
        return dims_by_kl(score, args.n_dims)
    if int(args.traverse_dim) >= len(score):
        raise UserError(f"--traverse_dim {args.traverse_dim}: {layer} has {len(score)} dimensions; pass "
                        f"0..{len(score) - 1} or all")
    return [int(args.traverse_dim)]


KL_SAMPLES = flag("--kl_samples", type=int, default=10000, valid=at_least(1),
                  help="test images used to rank dimensions by KL")

def _layer_fits(value: int, model: TrainedVAE) -> str | None:
    if value <= model.latent_layers:
        return None
    return (f"--layer {value}: the model has {model.latent_layers} stochastic layer(s); pass 1..{model.latent_layers}"
            f" (1 the bottom, {model.latent_layers} the top z) or leave it out")


def _temperature_fits(value: float, model: TrainedVAE) -> str | None:
    if value and not model.hierarchical:
        return (f"--temperature {value:g} scales the draws of a Ladder VAE's lower layers, and this model has one "
                f"stochastic layer: drop it")
    return None


MODES: dict[str, Mode] = {
    "sample": Mode(mode_sample, draws=lambda args: True, flags=(
        flag("--individual", action="store_true", help="sample: also one PNG per image"),
        flag("--temperature", type=float, default=0.0, valid=(lambda v: v >= 0, "must be 0 or more"),
             fits=_temperature_fits, help="sample: a Ladder VAE's lower layers drawn from their conditional priors "
                                          "with the std times this (default 0: at their means)"),
    )),
    "interpolate": Mode(mode_interpolate, draws=lambda args: True, flags=(
        flag("--n_pairs", type=int, default=6, valid=at_least(1), help="interpolate: rows of each kind"),
        flag("--n_interpolate", type=int, default=10, valid=at_least(2, "both endpoints"),
             help="interpolate: codes per row, endpoints included"),
        flag("--interp", default="linear", choices=("linear", "slerp")),
    )),
    "traverse": Mode(mode_traverse, draws=lambda args: args.from_ == "prior", without="--from posterior", flags=(
        flag("--n_traverse", type=int, default=11, valid=at_least(1), help="traverse: values per dimension"),
        flag("--traverse_range", type=float, default=3.0, valid=(lambda v: v > 0, "must be positive"),
             help="traverse: values from -range to +range"),
        flag("--traverse_dim", default="all", fits=_traverse_dim_fits,
             help="traverse: a dimension index, or all (default)"),
        flag("--n_dims", type=int, default=0, valid=(lambda v: v >= 0, "must be 0 (every dimension) or more"),
             help="traverse all: only the N most informative dimensions (default 0: every one)"),
        flag("--from", dest="from_", default="posterior", choices=("posterior", "prior"),
             help="traverse: base code from a test image's posterior mean or a prior draw"),
        flag("--layer", type=int, default=0, valid=(lambda v: v >= 0, "must be 0 (the top) or more"),
             fits=_layer_fits, help="traverse: a Ladder VAE's stochastic layer, 1 the bottom (default: the top z)"),
        KL_SAMPLES,
    )),
    "reconstruct": Mode(mode_reconstruct),
    "visualize_latent": Mode(mode_visualize_latent, flags=(KL_SAMPLES,), needs_labels=True),
}
