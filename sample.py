"""Look inside a trained VAE: sample, interpolate, traverse, reconstruct, visualize_latent.

    python sample.py --mode traverse                      # the newest run under runs/
    python sample.py --exp_dir runs/X --mode sample --n_samples 100
    python sample.py -c configs/mnist.yaml --weights runs/X/model.safetensors --mode reconstruct

Outputs go to <run>/<mode>/ (or --save_dir). The same --seed gives the same bytes.
A conditional VAE (model.conditional) draws the class --label, or, in sample mode
without one, a grid with one row per class in which each column shares its code z.
Runs on the GPU when there is one, under `accelerate launch` as well as plain python.
"""

from __future__ import annotations

# isort: off
import utils.sleeping_waits  # noqa: F401  (first: the OpenMP wait policy is read when torch loads)
# isort: on
import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from models.samplers import SAMPLERS
from utils.config import Config
from utils.data.registry import load_data
from utils.data.splits import ImageSplit
from utils.errors import CliParser, UserError, guarded_main
from utils.evaluation.latents import dims_by_kl, interpolate, pca_2d, posterior_stats, traversal_codes
from utils.evaluation.samplers import FOLDER as SAMPLER_FOLDER
from utils.evaluation.samplers import fitted_sampler
from utils.files import cannot_write, disk_advice, is_disk_error, write_failure, written_whole
from utils.grids import grid, labelled_rows, save_grid, save_pairs, save_whole, to_pil
from utils.inference.loading import (
    add_sampler_arguments,
    load_trained,
    output_folder,
    sampler_options,
    speaks_cli_terms,
)
from utils.threads import add_threads_argument, set_threads
from utils.training.config import fp32_only


@torch.no_grad()
def decode(model, z: torch.Tensor, batch_size: int, y: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [0, 1] for codes (N, z) and, for a conditional model, their labels (N,), decoded in batches."""
    ys = [None] * len(z) if y is None else y.to(z.device).split(batch_size)
    return torch.cat([model.decode(chunk, c) for chunk, c in zip(z.split(batch_size), ys)]).float().cpu()


def labels_for(model, args, n: int, g: torch.Generator, given: torch.Tensor | None = None) -> torch.Tensor | None:
    """Labels of n codes for a conditional model (None otherwise): --label, else ``given`` (the test images'
    own), else classes drawn uniformly."""
    if not model.n_classes:
        return None
    if args.label is not None:
        return torch.full((n,), args.label, dtype=torch.long)
    return given.cpu() if given is not None else torch.randint(model.n_classes, (n,), generator=g)


def test_set(cfg: Config) -> ImageSplit:
    _, test, _ = load_data(cfg.data)
    return test


def pick(n: int, total: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(total, generator=g)[:n]


def mode_sample(model, cfg, args, g, out: Path) -> list[Path]:
    """Samples as one grid (--n_samples; --individual: one PNG each), codes from --sampler (the prior, or one
    fitted to the training codes: samples_<sampler>.png); a conditional model: one row per class."""
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
    x = decode(model, args.draw(args.n_samples, g), args.batch_size, labels)
    save_grid(x, path, per_row=math.ceil(math.sqrt(len(x))))
    paths = [path]
    if args.individual:
        for i, img in enumerate(x):
            paths.append(out / f"sample_{i:04d}.png")
            save_grid(img[None], paths[-1], per_row=1)
    return paths


def mode_interpolate(model, cfg, args, g, out: Path) -> list[Path]:
    """Rows from one code to another (--n_pairs, --n_interpolate, --interp linear or slerp), between prior draws
    and between test images."""
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


def mode_traverse(model, cfg, args, g, out: Path) -> list[Path]:
    """Each latent dimension swept over ±--traverse_range around a test image's code (or a prior draw), rows
    ordered by KL; a PNG and an animated GIF."""
    test = test_set(cfg)
    means, kl = posterior_stats(model, test, args.batch_size, args.kl_samples, args.device)
    score, what = (means.var(0), "var") if model.deterministic else (kl, "KL")  # an AE: no KL, its codes' variance
    dims = dims_by_kl(score, args.n_dims) if args.traverse_dim == "all" else [int(args.traverse_dim)]
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
    path = out / "traverse.png"
    save_whole(labelled_rows(x, args.n_traverse, [f"z{d}  {what} {score[d]:.2f}" for d in dims]), path)
    # animation: frame j shows every traversed dimension at values[j], there and back
    frames = []
    for j in list(range(args.n_traverse)) + list(range(args.n_traverse - 2, 0, -1)):
        column = x.view(len(dims), args.n_traverse, *x.shape[1:])[:, j]
        frames.append(to_pil(grid(column, per_row=min(len(dims), 8))))
    gif = out / "traverse.gif"
    save_whole(frames[0], gif, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return [path, gif]


def mode_reconstruct(model, cfg, args, g, out: Path) -> list[Path]:
    """Test images above their posterior-mean reconstructions."""
    test = test_set(cfg)
    idx = pick(args.n_samples, len(test), g)
    x, y = test.batch(idx).to(args.device), labels_for(model, args, len(idx), g, test.labels_at(idx))
    recon = decode(model, model.encode(x, y)[0], args.batch_size, y)
    path = out / "reconstructions.png"
    save_pairs(x.cpu(), recon, path, per_row=min(8, len(x)))
    return [path]


def mode_visualize_latent(model, cfg, args, g, out: Path) -> list[Path]:
    """The test set's posterior means coloured by class (PCA beyond 2 dimensions) and the KL per dimension (not
    for an autoencoder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# the modes, by their --mode name: each writes its files into the output folder and returns their paths
MODES: dict[str, Callable[..., list[Path]]] = {
    "sample": mode_sample,
    "interpolate": mode_interpolate,
    "traverse": mode_traverse,
    "reconstruct": mode_reconstruct,
    "visualize_latent": mode_visualize_latent,
}


def modes_markdown() -> str:
    """The docs' table of modes, generated from the registry."""
    rows = ["| `--mode` | what it writes |", "| --- | --- |"]
    rows += [f"| `{name}` | {' '.join(fn.__doc__.split())} |" for name, fn in MODES.items()]
    return "\n".join(rows)


@speaks_cli_terms
def main(argv: list[str]) -> None:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--mode", default="sample", help=f"one of {', '.join(MODES)} (default sample)")
    p.add_argument("-e", "--exp_dir", help="run directory (default: the newest run under runs/)")
    p.add_argument("-c", "--config", help="config YAML, with --weights, instead of a run directory")
    p.add_argument("--weights", help="model.safetensors to load with -c")
    p.add_argument("--save_dir", help="output folder (default <run>/<mode>/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_root", help="where the test images are on this machine (default: the run's data.root)")
    p.add_argument("--n_samples", type=int, default=64, help="images for sample and reconstruct")
    p.add_argument("--individual", action="store_true", help="sample: also one PNG per image")
    p.add_argument("--label", type=int, help="a conditional model: draw this class (default: sample, one row per "
                                             "class; other modes, the test images' own classes)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--n_pairs", type=int, default=6, help="interpolate: rows of each kind")
    p.add_argument("--n_interpolate", type=int, default=10, help="interpolate: codes per row, endpoints included")
    p.add_argument("--interp", default="linear", choices=("linear", "slerp"))
    p.add_argument("--n_traverse", type=int, default=11, help="traverse: values per dimension")
    p.add_argument("--traverse_range", type=float, default=3.0, help="traverse: values from -range to +range")
    p.add_argument("--traverse_dim", default="all", help="traverse: a dimension index, or all (default)")
    p.add_argument("--n_dims", type=int, default=0,
                   help="traverse all: only the N most informative dimensions (default 0: every one)")
    p.add_argument("--from", dest="from_", default="posterior", choices=("posterior", "prior"),
                   help="traverse: base code from a test image's posterior mean or a prior draw")
    p.add_argument("--kl_samples", type=int, default=10000, help="test images used to rank dimensions by KL")
    add_sampler_arguments(p)
    add_threads_argument(p)
    args, rest = p.parse_known_args(argv)
    if rest:
        raise UserError(f"unknown argument {rest[0]}: see python sample.py --help")
    set_threads(args.threads)
    note = fp32_only("sample.py")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if args.mode not in MODES:
        raise UserError(f"unknown --mode '{args.mode}': choose one of {', '.join(MODES)}")
    if args.n_dims < 0:
        raise UserError(f"--n_dims must be 0 (every dimension) or more, got {args.n_dims}")
    for name in ("n_samples", "batch_size", "n_pairs", "n_traverse", "kl_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.n_interpolate < 2:
        raise UserError(f"--n_interpolate must be at least 2 (both endpoints), got {args.n_interpolate}")
    if args.traverse_range <= 0:
        raise UserError(f"--traverse_range must be positive, got {args.traverse_range}")

    # the sampler flags: each one given must change what the mode draws, or it is refused
    drawn = args.mode in ("sample", "interpolate") or (args.mode == "traverse" and args.from_ == "prior")
    does = f"--mode {args.mode}" + (" --from posterior" if args.mode == "traverse" else "") + " draws no codes"
    if args.sampler is not None and not drawn:
        raise UserError(f"--sampler has no effect here: {does}; drop it")
    args.sampler = args.sampler or "prior"
    options = sampler_options(args, [args.sampler] if drawn else [],
                              does if not drawn else f"--mode {args.mode} draws from --sampler {args.sampler}")

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    args.device = state.device
    cfg, model, run, auto = load_trained(args.exp_dir, args.config, args.weights, args.device,
                                       args.data_root)
    if args.traverse_dim != "all":
        if not args.traverse_dim.isdigit() or int(args.traverse_dim) >= model.z_dim:
            raise UserError(f"--traverse_dim {args.traverse_dim}: the model has z_dim={model.z_dim}; "
                            f"pass 0..{model.z_dim - 1} or all")
    if args.label is not None and not 0 <= args.label < max(model.n_classes, 1):
        raise UserError(f"--label {args.label}: " + (f"the model has {model.n_classes} classes; pass "
                        f"0..{model.n_classes - 1}" if model.n_classes else "the model is not conditional "
                        "(model.conditional=false); drop --label"))
    if not state.is_main_process:
        return  # one process does the (small) work; the others have nothing to add
    out = Path(args.save_dir) if args.save_dir else output_folder(run, args.mode)
    unwritable = cannot_write(out)  # said before any work: the images must have somewhere to go
    if unwritable is not None:
        fix = "or write elsewhere with --save_dir DIR" if not args.save_dir else "or give --save_dir a folder you " \
                                                                                 "can write"
        raise UserError(f"cannot write into {out} ({unwritable.strerror}): {disk_advice(unwritable, out)}, {fix}")
    train = lambda: load_data(model.config.data)[0].to(args.device)  # noqa: E731 (read only for a fit)
    sampler = fitted_sampler(model, sampler_home(model.sampler_folder, out, args.sampler, args.refit),
                             args.sampler, train, options, args.refit, args.device) if drawn else None
    args.draw = lambda n, gen: sampler.sample(n, gen).to(args.device)
    args.suffix = "" if args.sampler == "prior" else f"_{args.sampler}"
    if auto:
        print(f"using the newest run: {run} (pass --exp_dir to choose another)")
    g = torch.Generator().manual_seed(args.seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = MODES[args.mode](model, cfg, args, g, out)
    except OSError as e:
        if not is_disk_error(e):
            raise
        raise UserError(write_failure(e, Path(e.filename) if e.filename else out, "then run again")) from None
    print("\n".join(f"wrote {p}" for p in paths))


def sampler_home(kept_in: Path, out: Path, name: str, refit: bool) -> Path:
    """Where a fitted sampler is looked for and kept: the model's samplers folder ``kept_in``, unless it cannot be
    written and has no kept fit to reuse (a read-only run); then ``out/samplers``, where the next call with the
    same --save_dir finds the fit."""
    kept = (Path(kept_in) / f"{name}.safetensors").is_file() and not refit
    if kept or not getattr(SAMPLERS.get(name), "fitted", False):  # (the prior is never fitted nor kept)
        return kept_in
    return kept_in if cannot_write(kept_in) is None else Path(out) / SAMPLER_FOLDER


if __name__ == "__main__":
    guarded_main(main)
