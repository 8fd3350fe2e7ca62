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
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from utils.errors import CliParser, UserError, guarded_main
from utils.inference.loading import (
    add_sampler_arguments,
    load_trained,
    output_folder,
    sampler_options,
    speaks_cli_terms,
)
from utils.inference.modes import MODES, Flag, at_least, flag, mode_flags
from utils.threads import add_threads_argument, set_threads
from utils.training.config import fp32_only

if TYPE_CHECKING:
    from models.sampler_rules import SamplerOptions
    from utils.inference.trained import TrainedVAE


def _label_fits(value: int | None, model: TrainedVAE) -> str | None:
    if value is None or 0 <= value < max(model.n_classes, 1):
        return None
    return f"--label {value}: " + (f"the model has {model.n_classes} classes; pass 0..{model.n_classes - 1}"
                                   if model.n_classes else
                                   "the model is not conditional (model.conditional=false); drop --label")


# sample.py's own flags, any mode's to read; the flags of one mode come from its entry in MODES
SHARED: tuple[Flag, ...] = (
    flag("-e", "--exp_dir", help="run directory (default: the newest run under runs/)"),
    flag("-c", "--config", help="config YAML, with --weights, instead of a run directory"),
    flag("--weights", help="model.safetensors to load with -c"),
    flag("--save_dir", help="output folder (default <run>/<mode>/)"),
    flag("--seed", type=int, default=0),
    flag("--data_root", help="where the test images are on this machine (default: the run's data.root)"),
    flag("--n_samples", type=int, default=64, valid=at_least(1), help="images for sample and reconstruct"),
    flag("--label", type=int, fits=_label_fits, help="a conditional model: draw this class (default: sample, one "
                                                     "row per class; other modes, the test images' own classes)"),
    flag("--batch_size", type=int, default=256, valid=at_least(1)),
)


@speaks_cli_terms
def main(argv: list[str]) -> None:
    """Parse and check the arguments (torch is not loaded yet: --help and a bad flag answer at once), then work."""
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    choose = flag("--mode", default="sample", help=f"one of {', '.join(MODES)} (default sample)")  # (as MODES is now)
    flags = [choose, *SHARED, *mode_flags()]
    for f in flags:
        f.add_to(p)
    add_sampler_arguments(p)
    add_threads_argument(p)
    args, rest = p.parse_known_args(argv)
    if rest:
        raise UserError(f"unknown argument {rest[0]}: see python sample.py --help")
    note = fp32_only("sample.py")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    if args.mode not in MODES:
        raise UserError(f"unknown --mode '{args.mode}': choose one of {', '.join(MODES)}")
    for f in flags:
        problem = f.problem(args)
        if problem:
            raise UserError(problem)

    # the sampler flags: each one given must change what the mode draws, or it is refused
    mode = MODES[args.mode]
    drawn = mode.draws(args)
    does = mode.draws_none(args.mode)
    if args.sampler is not None and not drawn:
        raise UserError(f"--sampler has no effect here: {does}; drop it")
    args.sampler = args.sampler or "prior"
    options = sampler_options(args, [args.sampler] if drawn else [],
                              does if not drawn else f"--mode {args.mode} draws from --sampler {args.sampler}")
    set_threads(args.threads)
    run_mode(args, flags, options if drawn else None)


def run_mode(args: argparse.Namespace, flags: list[Flag], options: SamplerOptions | None) -> None:
    """Load the model, check the flags that depend on it, and write the mode's files; ``options`` are the fit
    options of the sampler the mode draws from (None: it draws no codes). Torch and the rest load here."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from models.sampler_rules import SAMPLERS
    from utils.data.registry import load_data
    from utils.evaluation.samplers import fitted_sampler
    from utils.files import cannot_write, disk_advice, is_disk_error, write_failure

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    args.device = state.device
    cfg, model, run, auto = load_trained(args.exp_dir, args.config, args.weights, args.device,
                                       args.data_root)
    for f in flags:
        problem = f.misfit(args, model)
        if problem:
            raise UserError(problem)
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
                             args.sampler, train, options, args.refit, args.device) if options else None
    args.draw = lambda n, gen: sampler.sample(n, gen).to(args.device)
    args.suffix = f"_{args.sampler}" if SAMPLERS[args.sampler].fitted else ""  # samples_gmm.png beside the prior's
    if auto:
        print(f"using the newest run: {run} (pass --exp_dir to choose another)")
    g = torch.Generator().manual_seed(args.seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = MODES[args.mode].run(model, cfg, args, g, out)
    except OSError as e:
        if not is_disk_error(e):
            raise
        raise UserError(write_failure(e, Path(e.filename) if e.filename else out, "then run again")) from None
    print("\n".join(f"wrote {p}" for p in paths))


def sampler_home(kept_in: Path, out: Path, name: str, refit: bool) -> Path:
    """Where a fitted sampler is looked for and kept: the model's samplers folder ``kept_in``, unless it cannot be
    written and has no kept fit to reuse (a read-only run); then ``out/samplers``, where the next call with the
    same --save_dir finds the fit."""
    from models.sampler_rules import SAMPLERS
    from utils.evaluation.samplers import FOLDER
    from utils.files import cannot_write

    kept = (Path(kept_in) / f"{name}.safetensors").is_file() and not refit
    if kept or not getattr(SAMPLERS.get(name), "fitted", False):  # (the prior is never fitted nor kept)
        return kept_in
    return kept_in if cannot_write(kept_in) is None else Path(out) / FOLDER


if __name__ == "__main__":
    guarded_main(main)
