"""bf16 against fp32 training, family by family: speed, and whether the trained model is as good.

    python benchmarks/precision.py --data_root ../shared/data [--seeds 3] [--jobs 2] [--families vae,iwae]
                                   [--scale 1.0] [--out DIR] [--json out.json]

Each family's config is trained for the same number of steps with
``train.mixed_precision=no`` and ``=bf16`` at every seed, by ``train_vae.py``
as a user runs it. The trained weights are then scored by ``evaluate.py
--metrics elbo`` in fp32 on the whole test set (binarised with the fixed seed for
the binarised-MNIST rows; the IWAE row by the bound it trains, ``--metrics nll
--k 50``, as a model trained for that bound has a loose ELBO whose scatter hides
any difference), so the table isolates what bf16 *training* does to
the model. Steps/s is the median of the run's logged windows after the first.
bf16 "matches" fp32 where the two means of that −bound differ by no more than the
larger of the two seed standard deviations.

With ``--jobs 2`` two runs share the machine, each on one thread
(``OMP_NUM_THREADS=1``), in an order that alternates the precisions, so slow
spells of a shared machine hit both; the speed ratio in the table is from these
runs. The budgets are CPU-sized (``--scale`` multiplies every step count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name: (config, overrides, steps, what it is)
FAMILIES: dict[str, tuple[str, list[str], int, str]] = {
    "vae": ("mnist.yaml", [], 600, "MLP 784-400-16, Bernoulli"),
    "sigma_vae": ("mnist_sigma_vae.yaml", [], 150, "conv, learned shared σ"),
    "optimal_sigma_vae": ("mnist_optimal_sigma_vae.yaml", [], 150, "conv, optimal σ"),
    "beta_vae": ("mnist.yaml", ["loss.beta=4"], 600, "MLP, β = 4"),
    "mmd_vae": ("mnist_mmd_vae.yaml", [], 600, "MLP, KL 0 + MMD 100"),
    "tcvae": ("mnist.yaml", ["loss.regulariser=tcvae", "loss.beta=6"], 600, "MLP, β-TCVAE β = 6"),
    "factorvae": ("mnist.yaml", ["loss.regulariser=factorvae"], 300, "MLP, FactorVAE γ = 10"),
    "iwae": ("binarized_mnist_iwae.yaml", [], 400, "binarised, 784-200-200-50 tanh, k = 50; its k = 50 bound"),
    "vamp": ("binarized_mnist_vamp.yaml", ["loss.kl_warmup_steps=0"], 600,
             "binarised, 784-300-300-40 tanh, VampPrior K = 500"),
    "cvae": ("mnist_cvae.yaml", [], 600, "MLP, conditional on the digit"),
}
PRECISIONS = ("no", "bf16")


def one_run(family: str, precision: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one (family, precision, seed); returns its steps/s, −bound and wall times."""
    config, overrides, steps, _ = FAMILIES[family]
    steps = max(20, round(steps * args.scale))
    run = Path(args.out) / f"{family}-{precision}-{seed}"
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else dict(os.environ)
    binarised = config.startswith("binarized")
    t0 = time.perf_counter()
    train = [sys.executable, str(REPO / "train_vae.py"), "-c", str(REPO / "configs" / config), "-e", str(run),
             "--overwrite", f"data.root={args.data_root}", *overrides, f"train.steps={steps}",
             f"train.seed={seed}", f"train.mixed_precision={precision}", f"train.log_every={max(1, steps // 10)}",
             "train.sample_every=0", "train.eval_every=0", "train.save_every=0"]
    proc = subprocess.run(train, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"{family} {precision} seed {seed}: train_vae.py failed: "
                           f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    t_train = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r["steps_per_s"] for r in rows if r["split"] == "train"][1:]
    score = ["--metrics", "nll", "--k", "50"] if family == "iwae" else ["--metrics", "elbo"]
    evaluate = [sys.executable, str(REPO / "evaluate.py"), "--exp_dir", str(run), *score,
                "--out", str(run / "eval.json"), *(["--binarize"] if binarised else [])]
    proc = subprocess.run(evaluate, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"{family} {precision} seed {seed}: evaluate.py failed: "
                           f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    scores = json.loads((run / "eval.json").read_text())
    loss = scores["nll"]["nll"] if family == "iwae" else -scores["elbo"]["elbo"]
    return {"family": family, "precision": precision, "seed": seed, "steps": steps,
            "steps_per_s": statistics.median(windows), "neg_bound": loss, "train_s": t_train}


def summarise(results: list[dict], families: list[str]) -> list[dict]:
    """One row per family: speeds, −bound mean and seed standard deviation per precision, the verdict."""
    rows = []
    for fam in families:
        got = {p: [r for r in results if r["family"] == fam and r["precision"] == p] for p in PRECISIONS}
        if not all(got.values()):
            continue
        row = {"family": fam, "what": FAMILIES[fam][3], "steps": got["no"][0]["steps"], "seeds": len(got["no"])}
        for p, rs in got.items():
            losses = [r["neg_bound"] for r in rs]
            row[p] = {"steps_per_s": statistics.median(r["steps_per_s"] for r in rs),
                      "mean": statistics.fmean(losses),
                      "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0, "values": losses}
        row["speedup"] = row["bf16"]["steps_per_s"] / row["no"]["steps_per_s"]
        row["delta"] = row["bf16"]["mean"] - row["no"]["mean"]
        row["matches"] = abs(row["delta"]) <= max(row["no"]["sd"], row["bf16"]["sd"])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| family | steps | fp32 steps/s | bf16 steps/s | bf16 / fp32 | fp32 −bound (nats) | bf16 −bound (nats) | "
             "Δ bf16 − fp32 | within seed spread |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['family']} ({r['what']}) | {r['steps']} | {r['no']['steps_per_s']:.1f} | "
                     f"{r['bf16']['steps_per_s']:.1f} | {r['speedup']:.2f}× | {r['no']['mean']:.2f} ± "
                     f"{r['no']['sd']:.2f} | {r['bf16']['mean']:.2f} ± {r['bf16']['sd']:.2f} | {r['delta']:+.2f} | "
                     f"{'yes' if r['matches'] else 'no'} |")
    return "\n".join(lines)


def cpu_bf16_note() -> str:
    import torch

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16 kernels: {'yes' if native else 'no'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {','.join(FAMILIES)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (more than one: one thread each)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every family's step budget")
    p.add_argument("--out", default=str(REPO / "runs" / "precision"), help="where the runs are kept")
    p.add_argument("--json", help="also write every run and the table as JSON here")
    args = p.parse_args()
    families = [f.strip() for f in args.families.split(",")]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or args.seeds < 1 or args.jobs < 1 or args.scale <= 0:
        sys.exit(f"error: unknown family {unknown[0]!r}: choose from {','.join(FAMILIES)}" if unknown
                 else "error: --seeds and --jobs must be at least 1 and --scale positive")
    work = [(f, prec, s) for f in families for s in range(args.seeds) for prec in PRECISIONS]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda w: one_run(*w, args), work))
    rows = summarise(results, families)
    head = (f"{cpu_bf16_note()}; {args.seeds} seeds, {args.jobs} runs at a time; "
            f"{time.perf_counter() - t0:.0f} s in all")
    print(head + "\n\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "runs": results, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
