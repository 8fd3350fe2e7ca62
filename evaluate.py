"""Honest numbers for a trained VAE: test ELBO, importance-weighted NLL, active units, reconstruction, FID,
disentanglement.

    python evaluate.py --exp_dir runs/X                       # elbo,nll,au,recon (+ disentanglement on dSprites)
    python evaluate.py --exp_dir runs/X --metrics nll --k 5000
    python evaluate.py -c configs/mnist.yaml --weights runs/X/model.safetensors --binarize
    accelerate launch evaluate.py --exp_dir runs/X --metrics fid

Prints a table and writes <run>/eval.json (or --out), adding to the metrics an earlier call
wrote there (a metric computed again replaces its entry). Every number is on the held-out
split, in nats per image with bits per dimension beside it.
"""

from __future__ import annotations

# isort: off
import utils.sleeping_waits  # noqa: F401  (first: the OpenMP wait policy is read when torch loads)
# isort: on
import argparse
import json
import sys
from pathlib import Path

from utils.errors import CliParser, UserError, guarded_main
from utils.evaluation.metrics import (
    METRICS,
    add_metric_arguments,
    check_metric_options,
    computed_with,
    default_metrics,
    merge_results,
    table,
)
from utils.inference.loading import add_sampler_arguments, check_sampler_values, speaks_cli_terms
from utils.threads import add_threads_argument, set_threads
from utils.training.config import fp32_only


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The options, checked; a bad one is refused here, before torch and the model load (``--help`` too)."""
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("-e", "--exp_dir", help="run directory (default: the newest run under runs/)")
    p.add_argument("-c", "--config", help="config YAML, with --weights, instead of a run directory")
    p.add_argument("--weights", help="model.safetensors to load with -c")
    p.add_argument("--metrics", help=f"comma-separated, from {','.join(METRICS)} (default "
                                     f"{','.join(default_metrics(False))}, and disentanglement on dSprites)")
    p.add_argument("--out", help="JSON output (default <run>/eval.json)")
    p.add_argument("--data_root", help="where the held-out data is on this machine (default: the run's data.root)")
    add_metric_arguments(p)  # each metric's options, declared beside it (utils/evaluation/metrics.py)
    add_sampler_arguments(p)
    add_threads_argument(p)
    args, rest = p.parse_known_args(argv)
    if rest:
        raise UserError(f"unknown argument {rest[0]}: see python evaluate.py --help")
    check_metric_options(args)
    check_sampler_values(args)
    return args


@speaks_cli_terms
def main(argv: list[str]) -> None:
    args = parse_arguments(argv)
    set_threads(args.threads)
    note = fp32_only("evaluate.py")
    if note:
        print(f"warning: {note}", file=sys.stderr)
    # what computes: loaded only now, so that --help and a bad option answer without it
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    from models.sampler_rules import SAMPLERS
    from utils.data.registry import DATASETS, load_data
    from utils.evaluation.context import Evaluation
    from utils.evaluation.samplers import check_usable, model_fingerprint
    from utils.inference.loading import load_trained, output_folder, sampler_options

    accelerator = Accelerator(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cfg, vae, run, auto = load_trained(args.exp_dir, args.config, args.weights, accelerator.device, args.data_root)
    has_factors = DATASETS[cfg.data.name].has_factors
    metrics = ([m.strip() for m in args.metrics.split(",")] if args.metrics
               else default_metrics(has_factors, vae.deterministic))
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"unknown metric '{m}' in --metrics: choose from {','.join(METRICS)}")
        if METRICS[m].needs_posterior and vae.deterministic:
            raise UserError(f"{m} needs a posterior and a KL, and this model is a deterministic autoencoder "
                            f"(loss.objective=ae): drop it from --metrics ("
                            f"{', '.join(n for n, mm in METRICS.items() if not mm.needs_posterior)} apply)")
        if METRICS[m].needs_factors and not has_factors:
            having = ", ".join(name for name, ds in DATASETS.items() if ds.has_factors)
            raise UserError(f"{m} needs ground-truth factors, which only {having} has (this run is "
                            f"{cfg.data.name}): drop it from --metrics")
    # the sampler flags: --sampler chooses the codes of the metrics that take it; the fit options apply to the
    # samplers the metrics asked for fit
    readers = [m for m in metrics if METRICS[m].takes("sampler")]
    if args.sampler is not None and not readers:
        takers = " or ".join(m for m, metric in METRICS.items() if metric.takes("sampler"))
        raise UserError(f"--sampler chooses where the codes of --metrics {takers} come from, and {takers} is not "
                        f"asked for: drop it (--metrics samplers compares every sampler)")
    args.sampler = args.sampler or "prior"
    uses = list(dict.fromkeys(n for m in metrics for n in METRICS[m].draws(args, vae)))
    fits = " and ".join(sorted(n for n in uses if n not in SAMPLERS or SAMPLERS[n].fitted))
    does = (f"--metrics {','.join(metrics)} fits " + (f"--sampler {fits} only" if fits else "no sampler"))
    args.sampler_options = sampler_options(args, uses, does)  # checked before anything is read
    if readers:
        check_usable(vae, args.sampler)
    if args.binarize and vae.likelihood.continuous:
        raise UserError(f"--binarize is for bernoulli models; this one is {cfg.model.likelihood}: drop --binarize")
    out = Path(args.out) if args.out else output_folder(run, "eval.json")
    refuse_unwritable(out, bool(args.out))  # before anything is computed: the numbers must have somewhere to go
    if auto:
        accelerator.print(f"using the newest run: {run} (pass --exp_dir to choose another)")
    _, test, summary = load_data(cfg.data, cfg.data.num_workers)
    accelerator.print(summary)
    weights = Path(args.weights) if args.weights else run / "model.safetensors"
    results: dict = {"run": str(run), "config": cfg.model.likelihood, "data": cfg.data.name, "metrics": metrics,
                     "weights": {"file": str(weights), "sha256": model_fingerprint(vae)}}
    k = args.k if any(METRICS[m].takes("k") for m in metrics) else 1  # the ELBO alone: one sample
    ev = Evaluation(vae, test, accelerator, args, results, k)
    for name, metric in METRICS.items():  # in the registry's order, whatever the order asked
        if name in metrics and (accelerator.is_main_process or not metric.main_only):
            metric.compute(ev)
    if accelerator.is_main_process:
        results["computed_with"] = computed_with(results, args)
        print(table(results))  # first: a failed write below still leaves the numbers on the screen
        earlier = earlier_results(out)
        merged, kept = merge_results(earlier, results)
        stale = [n for n in METRICS if n in earlier and n not in merged]
        if stale:
            print(f"warning: the earlier {out} held {', '.join(stale)} of other weights (another SHA-256): "
                  f"replaced, not kept", file=sys.stderr)
        from utils.files import is_disk_error, write_failure, write_json

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, merged)
        except OSError as e:
            if not is_disk_error(e):
                raise
            raise UserError(write_failure(e, out, "or write elsewhere with --out FILE (the numbers are printed "
                                                  "above)")) from None
        print(f"wrote {out}" + (f" (with the earlier {', '.join(kept)})" if kept else ""))


def refuse_unwritable(out: Path, given: bool) -> None:
    """One line, before any work, when eval.json cannot be written where it goes (a read-only run)."""
    from utils.files import cannot_write, disk_advice

    e = cannot_write(out.parent)
    if e is not None:
        fix = "write it elsewhere with --out FILE" if not given else "give --out a file in a folder you can write"
        raise UserError(f"cannot write {out} ({e.strerror}): {disk_advice(e, out.parent)}, or {fix}")


def earlier_results(out: Path) -> dict:
    """What an earlier call wrote to ``out`` (eval.json), to add to; {} when there is none, or it is not
    eval.json's JSON (said: it is replaced)."""
    if not out.is_file():
        return {}
    try:
        earlier = json.loads(out.read_text())
        if isinstance(earlier, dict) and isinstance(earlier.get("weights", {}), dict):
            return earlier
        why = "not a mapping of metrics"
    except (ValueError, UnicodeDecodeError) as e:
        why = f"{e.__class__.__name__}: {str(e)[:80]}"
    print(f"warning: the earlier {out} is unreadable ({why}): it is replaced", file=sys.stderr)
    return {}


if __name__ == "__main__":
    guarded_main(main)
