"""Honest numbers for a trained VAE: test ELBO, importance-weighted NLL, active units, reconstruction, FID,
disentanglement.

    python evaluate.py --exp_dir runs/X                       # elbo,nll,au,recon (+ disentanglement on dSprites)
    python evaluate.py --exp_dir runs/X --metrics nll --k 5000
    python evaluate.py -c configs/mnist.yaml --weights runs/X/model.safetensors --binarize
    accelerate launch evaluate.py --exp_dir runs/X --metrics fid

Prints a table and writes <run>/eval.json (or --out). Every number is on the
held-out split, in nats per image with bits per dimension beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env

from utils.data.registry import DATASETS, load_data
from utils.errors import CliParser, UserError, guarded_main
from utils.evaluation.metrics import METRICS, Evaluation, default_metrics, table
from utils.evaluation.samplers import check_usable
from utils.files import write_json
from utils.inference.loading import (
    add_sampler_arguments,
    load_trained,
    output_folder,
    sampler_options,
    speaks_cli_terms,
)


@speaks_cli_terms
def main(argv: list[str]) -> None:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("-e", "--exp_dir", help="run directory (default: the newest run under runs/)")
    p.add_argument("-c", "--config", help="config YAML, with --weights, instead of a run directory")
    p.add_argument("--weights", help="model.safetensors to load with -c")
    p.add_argument("--metrics", help=f"comma-separated, from {','.join(METRICS)} (default "
                                     f"{','.join(default_metrics(False))}, and disentanglement on dSprites)")
    p.add_argument("--out", help="JSON output (default <run>/eval.json)")
    p.add_argument("--k", type=int, default=1000, help="importance samples per image for the NLL (default 1000)")
    p.add_argument("--n_test", type=int, default=0, help="held-out images to use (default 0: all)")
    p.add_argument("--batch_size", type=int, default=100, help="images per batch")
    p.add_argument("--binarize", action="store_true", help="bernoulli models: evaluate on the stochastically "
                                                           "binarised held-out set (fixed seed), as published")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_root", help="where the held-out data is on this machine (default: the run's data.root)")
    p.add_argument("--fid_samples", type=int, default=10_000, help="samples and held-out images for FID")
    p.add_argument("--fid_weights", help=f"local copy of the standard Inception weights ({'pt_inception-...pth'})")
    p.add_argument("--dis_batch", type=int, default=64, help="disentanglement: images per point (paper: 64)")
    p.add_argument("--dis_train", type=int, default=10_000, help="disentanglement: training points (10,000)")
    p.add_argument("--dis_eval", type=int, default=5_000, help="disentanglement: evaluation points (5,000)")
    p.add_argument("--dis_variance", type=int, default=10_000, help="FactorVAE: images for the global variance")
    p.add_argument("--mig_samples", type=int, default=10_000, help="MIG: images (10,000)")
    p.add_argument("--dci_train", type=int, default=10_000, help="DCI and SAP: training images (10,000)")
    p.add_argument("--dci_test", type=int, default=5_000, help="DCI and SAP: held-out images (5,000)")
    add_sampler_arguments(p)
    args, rest = p.parse_known_args(argv)
    if rest:
        raise UserError(f"unknown argument {rest[0]}: see python evaluate.py --help")
    for name in ("k", "batch_size", "fid_samples", "dis_batch", "dis_train", "dis_eval", "dis_variance",
                 "mig_samples", "dci_train", "dci_test"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")

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
                            f"(loss.objective=ae): drop it from --metrics (recon, fid and samplers apply)")
        if METRICS[m].needs_factors and not has_factors:
            having = ", ".join(name for name, ds in DATASETS.items() if ds.has_factors)
            raise UserError(f"{m} needs ground-truth factors, which only {having} has (this run is "
                            f"{cfg.data.name}): drop it from --metrics")
    args.sampler_options = sampler_options(args)  # checked before anything is read
    if "fid" in metrics:
        check_usable(vae, args.sampler)
    if args.binarize and vae.likelihood.continuous:
        raise UserError(f"--binarize is for bernoulli models; this one is {cfg.model.likelihood}: drop --binarize")
    if auto:
        accelerator.print(f"using the newest run: {run} (pass --exp_dir to choose another)")
    _, test, summary = load_data(cfg.data, cfg.data.num_workers)
    accelerator.print(summary)
    results: dict = {"run": str(run), "config": cfg.model.likelihood, "data": cfg.data.name, "metrics": metrics}
    ev = Evaluation(vae, test, accelerator, args, metrics, results)
    for name, metric in METRICS.items():  # in the registry's order, whatever the order asked
        if name in metrics and (accelerator.is_main_process or not metric.main_only):
            metric.compute(ev)
    if accelerator.is_main_process:
        out = Path(args.out) if args.out else output_folder(run, "eval.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, results)
        print(table(results))
        print(f"wrote {out}")


if __name__ == "__main__":
    guarded_main(main)
