"""Where a training step's time goes, against what the hardware can do.

    python benchmarks/step_profile.py -c configs/bench_mnist.yaml [--steps 30] [key=value ...]

Prints (1) the matrix-product ceilings of this machine in fp32 and bf16 (a
1024×1024 product, best of several), (2) the step's floating-point work,
counted by ``torch.utils.flop_counter`` over one forward and backward, and (3)
the operators of ``--steps`` steps of the plain training loop (forward, loss,
backward, the trainer's fused Adam) under ``torch.profiler``, by self time,
grouped: convolutions, matrix products, dtype casts and copies, the optimiser,
normalisation, the rest elementwise. ``throughput.py --precisions`` uses (1)
and (2) to report achieved GFLOP/s beside steps/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GROUPS = (  # (group, substrings of aten operator names), first match wins
    ("convolution", ("convolution", "conv2d", "conv_transpose", "mkldnn_conv")),
    ("matrix product", ("addmm", "::mm", "bmm", "matmul", "linear")),
    ("dtype cast / copy", ("::to", "_to_copy", "copy_", "contiguous", "clone")),
    ("optimiser", ("adam", "foreach", "_fused")),
    ("normalisation", ("batch_norm", "native_batch_norm", "layer_norm")),
)


def ceilings(n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of an n×n matrix product in fp32 and bf16 on this device, the best of ``repeats``."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            if best > 2.0:  # an emulated bf16 product takes seconds: one is enough
                break
        out[name] = 2 * n**3 / best / 1e9
    return out


def build(config: str, overrides: list[str]):
    """What a bare training loop needs, as the trainer sets it up: (cfg, device, training split, the VAE on the
    device in the trainer's memory format, that format, the trainer's optimizer, the autocast dtype or None)."""
    import torch

    from models.vae import VAE
    from utils.config import load_config
    from utils.data.registry import load_data
    from utils.training.optim import make_optimizer

    cfg = load_config(config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    train, _, _ = load_data(cfg.data)
    vae = VAE(cfg.model, cfg.loss, train.shape, cfg.train.batch_size)
    fmt = torch.channels_last if cfg.train.channels_last and vae.convolutional else torch.contiguous_format
    vae = vae.to(device, memory_format=fmt)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    return cfg, device, train, vae, fmt, make_optimizer(vae.parameters(), cfg.train), dtype


def _model(config: str, overrides: list[str]):
    """(cfg, vae, optimizer, a batch on the device in the trainer's memory format, dtype or None)."""
    import torch

    cfg, device, train, vae, fmt, opt, dtype = build(config, overrides)
    idx = torch.arange(cfg.train.batch_size)
    x = train.get(idx).to(device).float().div_(255).contiguous(memory_format=fmt)
    return cfg, vae, opt, (x, train.labels_at(idx)), dtype


def _step(vae, opt, batch, dtype, step: int) -> None:
    import torch

    x, y = batch
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = vae(x, step, y)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def step_flops(config: str, overrides: list[str]) -> float:
    """Floating-point operations of one training step (forward and backward; the optimiser's few are left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, vae, opt, batch, _ = _model(config, overrides)
    x, y = batch
    with FlopCounterMode(display=False) as counter:
        vae(x, 0, y)["loss"].backward()
    return float(counter.get_total_flops())


def profile(config: str, overrides: list[str], steps: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(group, ms per step) and the ten costliest operators (name, ms per step), by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, vae, opt, batch, dtype = _model(config, overrides)
    for step in range(5):  # warm-up: kernels chosen, memory pooled
        _step(vae, opt, batch, dtype, step)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(steps):
            _step(vae, opt, batch, dtype, step)
    ops = [(e.key, e.self_cpu_time_total / 1000 / steps) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    groups: dict[str, float] = {}
    for name, ms in ops:
        group = next((g for g, keys in GROUPS if any(k in name.lower() for k in keys)), "elementwise and other")
        groups[group] = groups.get(group, 0.0) + ms
    return sorted(groups.items(), key=lambda g: -g[1]), sorted(ops, key=lambda o: -o[1])[:10]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=str(REPO / "configs" / "bench_mnist.yaml"))
    p.add_argument("--steps", type=int, default=30, help="profiled steps (after 5 of warm-up)")
    args, overrides = p.parse_known_args()
    if args.steps < 1:
        sys.exit("error: --steps must be at least 1")
    import torch

    from utils.config import load_config

    cfg = load_config(args.config, overrides)
    top = ceilings()
    flops = step_flops(args.config, overrides)
    groups, ops = profile(args.config, overrides, args.steps)
    total = sum(ms for _, ms in groups)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
          f"threads; config {Path(args.config).name} {' '.join(overrides)}; precision {cfg.train.mixed_precision}\n"
          f"matrix-product ceiling (1024²): fp32 {top['fp32']:.0f} GFLOP/s, bf16 {top['bf16']:.1f} GFLOP/s\n"
          f"one step: {flops / 1e9:.2f} GFLOP; profiled {total:.1f} ms a step "
          f"({flops / 1e9 / (total / 1000):.0f} GFLOP/s achieved under the profiler)\n")
    print("| where | ms a step | share |\n| --- | --- | --- |")
    for g, ms in groups:
        print(f"| {g} | {ms:.1f} | {100 * ms / total:.0f} % |")
    print("\n| operator (self time) | ms a step |\n| --- | --- |")
    for name, ms in ops:
        print(f"| `{name}` | {ms:.2f} |")


if __name__ == "__main__":
    main()
