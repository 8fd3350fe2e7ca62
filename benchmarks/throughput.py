"""Steady-state training throughput: the toolkit's trainer against a plain PyTorch loop of the same model.

    python benchmarks/throughput.py -c configs/bench_mnist.yaml [--steps 200] [--json out.json] [key=value ...]

(a) ``train_vae.py`` as a user runs it; its metrics.jsonl logs steps/s per window
    of ``--window`` steps. (b) the floor: the same VAE module, objective, batch,
    optimizer, memory format and precision in a bare loop over data already on
    the device. Both run as fresh processes; the first ``--warmup`` steps are
    excluded and the median window is reported, with peak memory (GPU: allocated;
    CPU: the process's maximum resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LABEL = {"no": "fp32"}  # train.mixed_precision values as the table names them
sys.path.insert(0, str(REPO))


def plain_loop(config: str, overrides: list[str], steps: int, window: int) -> dict:
    """The floor: forward, loss, backward, Adam step; nothing else. Runs in its own process."""
    import resource

    import torch
    from step_profile import build

    from utils.data.splits import TensorImages

    cfg, device, train, vae, fmt, opt, dtype = build(config, overrides)  # the trainer's set-up: fused Adam
    # data already decoded, on the device: a set held in memory as it is, any other (files, rendered dSprites)
    # as a pool of 20 batches decoded once, so the loop measures the model alone
    first = torch.arange(min(len(train), 20 * cfg.train.batch_size))
    pool = train.images if isinstance(train, TensorImages) else train.get(first)
    images = pool.to(device).float().div_(255).contiguous(memory_format=fmt)
    model = torch.compile(vae) if cfg.train.compile else vae
    b, n = cfg.train.batch_size, len(images)
    perm = torch.randperm(n, device=device)
    times = []
    t0 = time.perf_counter()
    for step in range(steps):
        start = (step * b) % (n - b)
        idx = perm[start:start + b]
        x, y = images[idx], train.labels_at(idx)  # labels: read by a conditional model only
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x, step, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % window == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(window / (now - t0))
            t0 = now
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"windows": times, "peak_mb": peak, "device": str(device)}


def decoder_speed(run: str, n: int, batch: int) -> dict:
    """ImageSplit/s of the decoder alone (prior draws -> images), the core of sample.py --mode sample."""
    import torch

    from utils.inference.loading import load_trained
    from utils.inference.modes import decode

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, vae, _, _ = load_trained(run, None, None, device)
    z = vae.prior.sample(n, device=device)
    decode(vae, z[:batch], batch)  # warm-up
    t0 = time.perf_counter()
    decode(vae, z, batch)  # returns on the CPU: includes the copy back
    return {"images_per_s": n / (time.perf_counter() - t0)}


def sampling(run: str, n: int, batch: int) -> dict:
    """sample.py --mode sample end to end (start-up, model load, decoding, the grid PNG), and the decoder alone."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "sample.py"), "--exp_dir", run, "--mode", "sample",
                               "--n_samples", str(n), "--batch_size", str(batch), "--save_dir", tmp],
                              capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"sample.py failed: {proc.stderr.strip().splitlines()[-1]}")
    proc = subprocess.run([sys.executable, __file__, "--_decoder", run, "--sample_n", str(n), "--sample_batch",
                           str(batch)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"decoder timing failed: {proc.stderr.strip().splitlines()[-1]}")
    return {"n": n, "wall_s": wall, "end_to_end_images_per_s": n / wall,
            "decoder_images_per_s": json.loads(proc.stdout.strip().splitlines()[-1])["images_per_s"]}


def trainer(config: str, overrides: list[str], steps: int, window: int, sample_n: int = 0,
            sample_batch: int = 1000) -> dict:
    """train_vae.py in a fresh process; windows from its metrics.jsonl; then sampling from the trained run."""

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train_vae.py"), "-c", config, "-e", f"{tmp}/run", *overrides,
               f"train.steps={steps}", f"train.log_every={window}", "train.sample_every=0", "train.eval_every=0",
               "train.save_every=0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            sys.exit(f"trainer failed: {proc.stderr.strip().splitlines()[-1]}")
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        sampled = sampling(f"{tmp}/run", sample_n, sample_batch) if sample_n else None
    train_rows = [r for r in rows if r["split"] == "train"]
    windows = [r["steps_per_s"] for r in train_rows]
    peak = train_rows[-1]["peak_mem_mb"]  # the trainer's own: GPU allocation or CPU resident set
    device = re.search(r"device=(\S+)", proc.stdout)
    return {"windows": windows, "peak_mb": peak, "device": device.group(1) if device else "?", "sampling": sampled}


def loader_speed(config: str, overrides: list[str], steps: int, window: int, warmup: int) -> dict:
    """Images/s of the input pipeline alone: the batches the trainer would consume, moved to the device."""
    import torch

    from utils.config import load_config
    from utils.data.batching import BatchOrder, train_batches
    from utils.data.registry import load_data

    cfg = load_config(config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, _, summary = load_data(cfg.data, cfg.data.num_workers)
    train = train.to(device)
    order = BatchOrder(len(train), cfg.train.batch_size, cfg.train.seed)
    batches = train_batches(train, order, 0, steps, 0, 1, device, cfg.data.num_workers)
    speeds, t0 = [], time.perf_counter()
    for step in range(steps):
        x = next(batches)[0].float().div_(255)
        if (step + 1) % window == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            speeds.append(window * len(x) / (now - t0))
            t0 = now
    return {"images_per_s": statistics.median(speeds[warmup // window:]), "summary": summary}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=str(REPO / "configs" / "bench_mnist.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--warmup", type=int, default=40, help="steps excluded from the figures")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop (median reported)")
    p.add_argument("--json", help="also write the table as JSON here")
    p.add_argument("--sample_n", type=int, default=10_000, help="images for the sampling figures (0: skip)")
    p.add_argument("--sample_batch", type=int, default=1000, help="sample.py --batch_size for them")
    p.add_argument("--loader", action="store_true", help="time only the input pipeline (images/s)")
    p.add_argument("--precisions", help="comma-separated train.mixed_precision values to compare in one run "
                                        "(e.g. no,bf16), with achieved GFLOP/s against this machine's ceilings")
    p.add_argument("--_plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_decoder", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    if args.window < 1 or args.repeats < 1 or args.steps <= args.warmup + args.window:
        sys.exit("error: --steps must exceed --warmup by at least one --window")
    if args._decoder:
        print(json.dumps(decoder_speed(args._decoder, args.sample_n, args.sample_batch)))
        return
    if args._plain:
        print(json.dumps(plain_loop(args.config, overrides, args.steps, args.window)))
        return
    if args.loader:
        r = loader_speed(args.config, overrides, args.steps, args.window, args.warmup)
        print(f"{r['summary']}\ninput pipeline alone: {r['images_per_s']:.0f} images/s "
              f"(median of {args.window}-step windows after {args.warmup} steps)")
        return

    import torch

    from utils.config import load_config

    cfg = load_config(args.config, overrides)
    skip = args.warmup // args.window
    precisions = [q.strip() for q in args.precisions.split(",")] if args.precisions else [None]
    runs: dict[tuple[str, str | None], list[dict]] = {(n, q): [] for q in precisions for n in ("trainer", "plain loop")}
    for rep in range(args.repeats):  # alternate the loops (and precisions), so slow spells of a shared machine hit all
        for name, q in runs:
            extra = [*overrides, *([f"train.mixed_precision={q}"] if q else [])]
            if name == "trainer":
                sample_n = args.sample_n if rep == 0 and q == precisions[0] else 0
                r = trainer(args.config, extra, args.steps, args.window, sample_n, args.sample_batch)
            else:
                proc = subprocess.run([sys.executable, __file__, "--_plain", "-c", args.config, "--steps",
                                       str(args.steps), "--window", str(args.window), "--warmup", str(args.warmup),
                                       *extra], capture_output=True, text=True, cwd=REPO)
                if proc.returncode:
                    sys.exit(f"plain loop failed: {proc.stderr.strip().splitlines()[-1]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["steps_per_s"] = statistics.median(r["windows"][skip:])
            runs[name, q].append(r)
    results = {}
    for (name, q), reps in runs.items():
        speeds = [r["steps_per_s"] for r in reps]
        results[name if q is None else f"{name} {LABEL.get(q, q)}"] = {
            "steps_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
            "images_per_s": statistics.median(speeds) * cfg.train.batch_size,
            "peak_mb": max(r["peak_mb"] for r in reps),
            "device": reps[0]["device"], "sampling": reps[0].get("sampling"), "runs": speeds}
    first = "trainer" if precisions == [None] else f"trainer {LABEL.get(precisions[0], precisions[0])}"
    ratio = results[first]["steps_per_s"] / results[first.replace("trainer", "plain loop")]["steps_per_s"]
    device = results[first]["device"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{cpu_model()}, {os.cpu_count()} cores"
    shown = cfg.train.mixed_precision if precisions == [None] else ", ".join(precisions)
    head = (f"device: {device} ({name})  torch {torch.__version__}  config: {Path(args.config).name} "
            f"{' '.join(overrides)}  batch {cfg.train.batch_size}  precision {shown}  "
            f"steps {args.steps} (first {args.warmup} excluded, median of {args.window}-step windows; "
            f"median of {args.repeats} alternating runs, min-max in brackets)")
    lines = [head, "", "| loop | steps/s | images/s | peak memory (MB) |", "| --- | --- | --- | --- |"]
    for k, r in results.items():
        lines.append(f"| {k} | {r['steps_per_s']:.2f} [{r['min']:.2f}-{r['max']:.2f}] | {r['images_per_s']:.0f} | "
                     f"{r['peak_mb']:.0f} |")
    lines.append(f"| trainer / plain | {ratio:.3f} | | |")
    extra_json = {}
    if precisions != [None]:
        from step_profile import ceilings, step_flops
        top, flops = ceilings(), step_flops(args.config, overrides)
        lines.append("")
        for q in precisions:
            sps = results[f"trainer {LABEL.get(q, q)}"]["steps_per_s"]
            ceiling = top["bf16" if q == "bf16" else "fp32"]
            lines.append(f"trainer {LABEL.get(q, q)}: {sps / results[first]['steps_per_s']:.2f}x the {first} steps/s; "
                         f"{flops / 1e9 * sps:.0f} GFLOP/s achieved ({flops / 1e9:.2f} GFLOP a step), "
                         f"{100 * flops / 1e9 * sps / ceiling:.0f} % of the {ceiling:.1f} GFLOP/s "
                         f"{'bf16' if q == 'bf16' else 'fp32'} matrix-product ceiling measured in this run")
        extra_json = {"ceilings_gflops": top, "step_gflop": flops / 1e9}
    sampled = results[first]["sampling"]
    if sampled:
        lines += ["", f"sampling, {sampled['n']} prior samples: decoder {sampled['decoder_images_per_s']:.0f} "
                      f"images/s; sample.py --mode sample end to end {sampled['wall_s']:.1f} s "
                      f"({sampled['end_to_end_images_per_s']:.0f} images/s, with start-up and the grid PNG)"]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "ratio": ratio, **results, **extra_json}, indent=2))


if __name__ == "__main__":
    main()
