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
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env
from tqdm import tqdm

from utils.data import dsprites
from utils.data.dsprites import DSpritesImages
from utils.data.registry import load_data
from utils.errors import CliParser, UserError, run_cli
from utils.evaluation.bounds import fix_optimal_sigma, latent_usage, likelihood_bounds
from utils.evaluation.disentanglement import beta_vae_metric, dci, factor_vae_metric, mig, sap
from utils.evaluation.fid import build_fid, fid_score
from utils.inference.loading import load_run

METRICS = ("elbo", "nll", "au", "recon", "fid", "disentanglement")


def model_codes(vae, grid: DSpritesImages, device: torch.device, chunk: int = 1024):
    """codes(classes) -> posterior means of the dSprites images with those factor classes, (N, z)."""
    @torch.no_grad()
    def codes(classes: torch.Tensor) -> torch.Tensor:
        idx = dsprites.classes_to_index(classes)
        return torch.cat([vae.encode(grid.batch(part.to(device)))[0].float().cpu() for part in idx.split(chunk)])
    return codes


def table(results: dict) -> str:
    rows = []
    if "nll" in results or "elbo" in results:
        b = results.get("nll") or results["elbo"]
        rows.append(("ELBO", f"{b['elbo']:.2f} nats  ({b['elbo_bpd']:.4f} bits/dim)  rec {b['rec']:.2f}, "
                             f"KL {b['kl']:.2f}" + ("" if b["kl_estimate"] == "closed form" else
                                                    f" ({b['kl_estimate']})")))
        if "nll" in results:
            rows.append((f"NLL (IWAE, k={b['k']})", f"{b['nll']:.2f} nats  ({b['nll_bpd']:.4f} bits/dim)"))
        how = "dequantised, 8-bit scale" if b["dequantised"] else ("binarised" if b["binarised"] else "as is")
        rows.append(("  on", f"{b['n']} held-out images, {how}"
                     + (f", sigma {results['sigma']:.4f}" if results.get("sigma") else "")))
    if "au" in results:
        u = results["au"]
        to = "" if u.get("kl_to", "prior") == "prior" else f" to {u['kl_to']}"
        rows.append(("active units", f"{u['active_units']} of {u['z_dim']} (Var_x E[z] > 0.01); KL{to} {u['kl']:.2f}"))
    if "recon" in results:
        rows.append(("reconstruction", f"MSE {results['recon']['mse']:.5f}, PSNR {results['recon']['psnr']:.2f} dB"))
    if "fid" in results:
        rows.append(("FID", f"{results['fid']['fid']:.2f} ({results['fid']['n']} samples vs held-out images)"))
    if "disentanglement" in results:
        d = results["disentanglement"]
        rows.append(("beta-VAE metric", f"{d['beta_vae']['eval_accuracy']:.3f}"))
        rows.append(("FactorVAE metric", f"{d['factor_vae']['eval_accuracy']:.3f}"))
        rows.append(("MIG", f"{d['mig']['mig']:.3f}"))
        rows.append(("DCI", f"disentanglement {d['dci']['disentanglement']:.3f}, completeness "
                            f"{d['dci']['completeness']:.3f}, informativeness {d['dci']['informativeness_test']:.3f}"))
        rows.append(("SAP", f"{d['sap']['sap']:.3f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def main(argv: list[str]) -> None:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("-e", "--exp_dir", help="run directory (default: the newest run under runs/)")
    p.add_argument("-c", "--config", help="config YAML, with --weights, instead of a run directory")
    p.add_argument("--weights", help="model.safetensors to load with -c")
    p.add_argument("--metrics", help=f"comma-separated, from {','.join(METRICS)} "
                                     "(default elbo,nll,au,recon, and disentanglement on dSprites)")
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
    args, rest = p.parse_known_args(argv)
    if rest:
        raise UserError(f"unknown argument {rest[0]}: see python evaluate.py --help")
    for name in ("k", "batch_size", "fid_samples", "dis_batch", "dis_train", "dis_eval", "dis_variance",
                 "mig_samples", "dci_train", "dci_test"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")

    accelerator = Accelerator(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = accelerator.device
    cfg, vae, run, auto = load_run(args.exp_dir, args.config, args.weights, device, args.data_root)
    default = ["elbo", "nll", "au", "recon"] + (["disentanglement"] if cfg.data.name == "dsprites" else [])
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else default
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"unknown metric '{m}' in --metrics: choose from {','.join(METRICS)}")
    if "disentanglement" in metrics and cfg.data.name != "dsprites":
        raise UserError(f"disentanglement needs ground-truth factors, which only dsprites has "
                        f"(this run is {cfg.data.name}): drop it from --metrics")
    if args.binarize and vae.likelihood.continuous:
        raise UserError(f"--binarize is for bernoulli models; this one is {cfg.model.likelihood}: drop --binarize")
    if auto:
        accelerator.print(f"using the newest run: {run} (pass --exp_dir to choose another)")
    _, test, summary = load_data(cfg.data, cfg.data.num_workers)
    accelerator.print(summary)
    main_bar = accelerator.is_main_process
    results: dict = {"run": str(run), "config": cfg.model.likelihood, "data": cfg.data.name, "metrics": metrics}

    if "elbo" in metrics or "nll" in metrics:
        results["sigma"] = fix_optimal_sigma(vae, test, args.batch_size, accelerator, args.n_test)
        k = args.k if "nll" in metrics else 1
        n = len(test) if args.n_test <= 0 else min(args.n_test, len(test))
        with tqdm(total=n, desc=f"ELBO and IWAE (k={k})", disable=not main_bar, mininterval=2.0) as bar:
            bounds = likelihood_bounds(vae, test, k, accelerator, args.batch_size, limit=args.n_test,
                                       seed=args.seed, binarize=args.binarize, progress=bar)
        results["elbo"] = {key: bounds[key] for key in ("elbo", "rec", "kl", "elbo_bpd", "n", "dequantised",
                                                         "binarised", "kl_estimate")}
        if "nll" in metrics:
            results["nll"] = bounds
    if "au" in metrics or "recon" in metrics:
        usage = latent_usage(vae, test, accelerator, args.batch_size, args.n_test)
        if "au" in metrics:
            results["au"] = {key: usage[key] for key in ("active_units", "z_dim", "variance", "kl_per_dim", "kl",
                                                         "kl_to")}
        if "recon" in metrics:
            results["recon"] = {"mse": usage["mse"], "psnr": usage["psnr"]}
    if "fid" in metrics:
        metric = build_fid(args.fid_weights, device=device)
        n = min(args.fid_samples, len(test))
        with tqdm(total=n, desc="FID", disable=not main_bar, mininterval=2.0) as bar:
            score = fid_score(vae, test, metric, n, args.batch_size, device, accelerator.process_index,
                              accelerator.num_processes, args.seed, bar)
        results["fid"] = {"fid": score, "n": n, "features": "inception-v3 pool3 (2048)"}
    if "disentanglement" in metrics and main_bar:
        grid = DSpritesImages(torch.arange(dsprites.N_IMAGES), getattr(test, "official", None),
                              getattr(test, "official_classes", None))
        codes = model_codes(vae, grid, device)
        g = torch.Generator().manual_seed(args.seed)
        results["disentanglement"] = {
            "beta_vae": beta_vae_metric(codes, g, args.dis_batch, args.dis_train, args.dis_eval),
            "factor_vae": factor_vae_metric(codes, g, args.dis_batch, args.dis_train, args.dis_eval,
                                            args.dis_variance),
            "mig": mig(codes, g, args.mig_samples),
            "dci": dci(codes, g, args.dci_train, args.dci_test, args.seed),
            "sap": sap(codes, g, args.dci_train, args.dci_test),
            "sizes": {"batch": args.dis_batch, "train": args.dis_train, "eval": args.dis_eval,
                      "variance": args.dis_variance, "mig": args.mig_samples, "dci_train": args.dci_train,
                      "dci_test": args.dci_test}}

    if main_bar:
        out = Path(args.out) if args.out else run / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out)
        print(table(results))
        print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
