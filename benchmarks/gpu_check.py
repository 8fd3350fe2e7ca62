"""Every family trained briefly in fp32, bf16 and fp16 on this machine's accelerator, with the checks that a GPU
can change: the CUDA kernels, autocast, the GradScaler, the guard's skip on the device, the CUDA RNG in a resume.

    python benchmarks/gpu_check.py --data DATA_ROOT [--steps 300] [--jobs 6] [--out DIR]
                                   [--families vae,celeba] [--precisions fp32,bf16,fp16]

DATA_ROOT holds MNIST/raw and celeba-10k/img_align_celeba (dSprites is rendered). For each family and precision,
as a user runs the scripts: ``train_vae.py`` for ``--steps`` steps with checkpoints at the half and the end,
then a resume from the half-way checkpoint to the end, then ``sample.py`` (every mode for ``--inspect``'s
precision, bf16 by default; ``sample`` for the others) and ``evaluate.py`` (``--inspect``) on the resumed run. Checked:

- every logged loss is finite, and the last logged window's loss is below the first's;
- the resume started at the saved step and logged every later window up to the last step;
- sample.py and evaluate.py finish, and evaluate.py's numbers are finite.

Reported, not asserted: the largest weight difference between the resumed and the unbroken run (0 where a
resume is bit-exact, as on a CPU; cuDNN's and atomics' nondeterminism can make it nonzero on a GPU), steps/s and
peak memory. In this process, per precision: a NaN batch leaves weights, Adam's state and batch-norm statistics
untouched, and training then continues. Prints a table (and writes it to DIR/check.json); exit status 1 when a
check failed. Runs on the CPU too (slowly, ``--precisions fp32,bf16``: fp16 is refused there), which is how the
script itself is tested.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.inference.modes import MODES  # noqa: E402  (sample.py's modes: the registry, torch-free to import)

# family -> (config, data root below DATA_ROOT or None for rendered data, extra overrides)
FAMILIES: dict[str, tuple[str, str | None, list[str]]] = {
    "vae": ("mnist.yaml", "", []),
    "beta_vae": ("mnist_beta_vae.yaml", "", []),
    "mmd_vae": ("mnist_mmd_vae.yaml", "", []),
    "sigma_vae": ("mnist_sigma_vae.yaml", "", []),
    "cvae": ("mnist_cvae.yaml", "", []),
    "iwae": ("binarized_mnist_iwae.yaml", "", []),
    "vamp": ("binarized_mnist_vamp.yaml", "", ["train.ema_decay=0.99"]),  # the EMA path as well
    "tcvae": ("dsprites_tcvae.yaml", None, []),
    "factor_vae": ("dsprites_factor_vae.yaml", None, []),
    "dip_vae": ("dsprites_dip_vae.yaml", None, []),
    "celeba": ("celeba.yaml", "celeba-10k", ["data.cache=true"]),  # conv nets, optimal σ, the JPEG cache
}
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def run(cmd: list[str], log: Path, env: dict) -> subprocess.CompletedProcess:
    """One script as a user runs it; its output is appended to ``log``; a failure's last line is kept."""
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(f"$ python {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n[exit {proc.returncode}]\n")
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return f"exit {proc.returncode}: {lines[-1][:200] if lines else ''}"


def weight_gap(a: Path, b: Path) -> float:
    """The largest absolute difference between two weight files' tensors (inf when they do not match)."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        return math.inf
    return max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel()), default=0.0)


def check_family(family: str, precision: str, args: argparse.Namespace, env: dict) -> dict:
    """Train, resume, sample and evaluate one family at one precision; the row of the table."""
    config, sub, extra = FAMILIES[family]
    run_dir = Path(args.out) / f"{family}-{precision}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = Path(args.out) / f"{family}-{precision}.log"
    log.unlink(missing_ok=True)
    half, steps = args.steps // 2, args.steps
    window = max(1, steps // 10)
    data = [] if sub is None else [f"data.root={Path(args.data) / sub}"]
    common = [*data, *extra, f"train.mixed_precision={PRECISION[precision]}", f"train.steps={steps}",
              f"train.save_every={half}", f"train.log_every={window}", f"train.sample_every={steps}",
              f"train.eval_every={steps}", "train.eval_samples=500", "train.keep_checkpoints=2"]
    row: dict = {"family": family, "precision": precision, "failures": []}
    t0 = time.perf_counter()
    proc = run(["train_vae.py", "-c", str(REPO / "configs" / config), "-e", str(run_dir), *common], log, env)
    row["train_s"] = time.perf_counter() - t0
    if proc.returncode:
        row["failures"].append(f"train: {last_line(proc)}")
        return row
    from utils.training.run_folder import read_metrics

    train_rows = read_metrics(run_dir, "train")
    unbroken = run_dir / "unbroken.safetensors"
    shutil.copy(run_dir / "model.safetensors", unbroken)
    losses = [r["loss"] for r in train_rows]
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    row["bad_steps"] = train_rows[-1].get("bad_steps", 0)
    row["steps_per_s"] = statistics.median(r["steps_per_s"] for r in train_rows[1:] or train_rows)
    row["peak_mem_mb"] = train_rows[-1].get("peak_mem_mb")
    row["device"] = next((ln.split("device=")[1].split()[0] for ln in proc.stdout.splitlines() if "device=" in ln),
                         "?")
    if not all(math.isfinite(v) for v in losses):
        row["failures"].append(f"non-finite loss in {losses}")
    if not losses[-1] < losses[0]:
        row["failures"].append(f"loss did not fall: {losses[0]:.4g} -> {losses[-1]:.4g}")

    ckpt = run_dir / "checkpoints" / f"step_{half:07d}"
    proc = run(["train_vae.py", "-r", str(ckpt), "-e", str(run_dir)], log, env)
    if proc.returncode:
        row["failures"].append(f"resume: {last_line(proc)}")
        return row
    after = [r["step"] for r in read_metrics(run_dir, "train") if r["step"] > half]
    expected = list(range(half + window, steps + 1, window))
    if f"at step {half}" not in proc.stdout or after[-1:] != [steps] or [s for s in expected if s not in after]:
        row["failures"].append(f"resume from step {half} logged steps {after}, expected {expected}")
    row["resume_gap"] = weight_gap(unbroken, run_dir / "model.safetensors")

    modes = list(MODES) if precision == args.inspect else ["sample"]
    if sub != "":  # a mode that reads classes needs MNIST's labels (dSprites and CelebA have none)
        modes = [m for m in modes if not MODES[m].needs_labels]
    for mode in modes:
        proc = run(["sample.py", "-e", str(run_dir), "--mode", mode, "--n_samples", "64"], log, env)
        if proc.returncode:
            row["failures"].append(f"sample.py --mode {mode}: {last_line(proc)}")
    if precision == args.inspect:
        metrics = "elbo,nll,au,recon" + (",disentanglement" if sub is None else "")
        cmd = ["evaluate.py", "-e", str(run_dir), "--metrics", metrics, "--k", "50", "--n_test", "500",
               "--dis_train", "300", "--dis_eval", "150", "--dis_variance", "2000", "--mig_samples", "1000",
               "--dci_train", "500", "--dci_test", "250"]
        proc = run(cmd, log, env)
        if proc.returncode:
            row["failures"].append(f"evaluate.py: {last_line(proc)}")
        else:
            numbers = json.loads((run_dir / "eval.json").read_text())
            row["test_elbo"] = numbers.get("elbo", {}).get("elbo")
            bad = [k for k, v in flat(numbers) if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                row["failures"].append(f"evaluate.py: non-finite {bad}")
    return row


def flat(d: dict, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested dict."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def nan_batch_is_skipped(precision: str) -> list[str]:
    """The guard on the accelerator: a NaN batch changes no weight, Adam state or batch-norm statistic, and the
    clean batches after it train. The trainer's order of calls (utils/training/loop.py); a list of failures."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from models.vae import VAE
    from utils.config import load_config
    from utils.training.optim import StepGuard, clip_and_norm, make_optimizer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = load_config(str(REPO / "configs" / "mnist.yaml"), ["model.net=conv", "model.base_width=8"])
    torch.manual_seed(0)
    vae = VAE(cfg.model, cfg.loss, (1, 28, 28), cfg.train.batch_size)
    acc = Accelerator(mixed_precision=PRECISION[precision])
    model, opt = acc.prepare(vae, make_optimizer(vae.parameters(), cfg.train))
    guard = StepGuard(vae, acc.device)
    x = torch.rand(32, 1, 28, 28, device=acc.device)

    def step(batch: torch.Tensor) -> None:
        guard.before_forward()
        loss = model(batch, 0)["loss"]
        acc.backward(loss)
        bad = guard.check(loss, clip_and_norm(acc, list(vae.parameters()), 0.0), acc)
        guard.skip_if(opt, bad, acc.scaler)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def trains(n: int = 20) -> bool:
        """Whether clean steps change the weights within n steps (under fp16 the GradScaler skips steps that
        overflow while it lowers its scale)."""
        w = vae.decoder.fc.weight.detach().clone()
        for _ in range(n):
            step(x)
            if not torch.equal(w, vae.decoder.fc.weight):
                return True
        return False

    failures = [] if trains() else ["clean steps did not train before the NaN batch"]
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    adam = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    step(poisoned)
    changed = [k for k, v in vae.state_dict().items() if not torch.equal(before[k], v) and "num_batches" not in k]
    if changed:
        failures.append(f"a NaN batch changed {changed[:4]}")
    if not all(torch.equal(adam[k], v) for k, v in opt.state_dict()["state"][0].items()):
        failures.append("a NaN batch changed Adam's state")
    if acc.scaler is None and int(guard.total) != 1:
        failures.append(f"the guard counted {int(guard.total)} skipped steps, not 1")
    if not trains():
        failures.append("clean steps after the NaN batch did not train")
    if not all(torch.isfinite(v).all() for v in vae.state_dict().values() if v.is_floating_point()):
        failures.append("non-finite weights after the NaN batch")
    return failures


def table(rows: list[dict], guard: dict[str, list[str]]) -> str:
    head = ["| family | precision | steps/s | peak MB | loss first → last | bad steps | resume: max abs Δw vs "
            "unbroken | test ELBO | result |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    out = []
    for r in rows:
        loss = f"{r['loss_first']:.4g} → {r['loss_last']:.4g}" if "loss_last" in r else ""
        gap = r.get("resume_gap")
        gap_s = "" if gap is None else ("0 (bit-exact)" if gap == 0 else f"{gap:.2e}")
        elbo = r.get("test_elbo")
        out.append(f"| {r['family']} | {r['precision']} | {r.get('steps_per_s', 0):.1f} | "
                   f"{r.get('peak_mem_mb') or 0:.0f} | {loss} | {r.get('bad_steps', '')} | {gap_s} | "
                   f"{'' if elbo is None else f'{elbo:.2f}'} | {'; '.join(r['failures']) or 'ok'} |")
    out.append("")
    out += [f"NaN batch under {p}: {'; '.join(f) or 'skipped (weights, Adam state, BN statistics untouched)'}"
            for p, f in guard.items()]
    return "\n".join(head + out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the folder holding MNIST/raw and celeba-10k")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (resumed from half-way)")
    p.add_argument("--jobs", type=int, default=4, help="runs at a time (they share the accelerator)")
    p.add_argument("--out", help="runs, logs and check.json (default: a temporary folder, removed)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--inspect", default="bf16", help="the precision whose runs also get every sample.py mode and "
                   "evaluate.py")
    args = p.parse_args()
    families, precisions = args.families.split(","), args.precisions.split(",")
    unknown = [f for f in families if f not in FAMILIES] + [q for q in precisions if q not in PRECISION]
    if unknown or args.steps < 20:
        sys.exit(f"error: unknown {unknown} (families: {', '.join(FAMILIES)}; precisions: fp32, bf16, fp16), or "
                 f"--steps under 20")
    tmp = None if args.out else tempfile.TemporaryDirectory()
    args.out = args.out or tmp.name
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # the runs share the CPU's cores, unless the caller chose a count (the tests keep each process on one)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // args.jobs))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    jobs = [(f, q) for f in families for q in precisions]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: check_family(*job, args, env), jobs))
    guard = {q: nan_batch_is_skipped(q) for q in precisions}
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    text = (f"device: {device}  torch {torch.__version__}  {args.steps} steps per run (resumed from "
            f"{args.steps // 2})  {len(jobs)} runs, {args.jobs} at a time, in {time.perf_counter() - t0:.0f} s\n\n"
            + table(rows, guard))
    print(text)
    Path(args.out, "check.json").write_text(json.dumps({"header": text.splitlines()[0], "rows": rows,
                                                        "nan_batch": guard}, indent=2))
    if tmp:
        tmp.cleanup()
    sys.exit(1 if any(r["failures"] for r in rows) or any(guard.values()) else 0)


if __name__ == "__main__":
    main()
