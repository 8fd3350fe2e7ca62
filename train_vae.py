"""Train a VAE from a YAML config, on one CPU or many GPUs, with Accelerate.

    python train_vae.py -c configs/mnist.yaml                       # one device
    accelerate launch train_vae.py -c configs/mnist.yaml            # as `accelerate config` says
    python train_vae.py -c configs/mnist.yaml loss.beta=4 --train.lr 3e-4
    python train_vae.py -c configs/mnist.yaml -r latest             # resume the newest run of this config

The CLI only resolves and validates the config, writes it into the run
directory, then hands over to ``train``, which never reads sys.argv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from safetensors.torch import save_file
from torchvision.utils import save_image
from tqdm import tqdm

try:
    import resource  # peak resident memory on CPU; not on Windows
except ImportError:
    resource = None

from models.vae import VAE
from utils.config import Config, load_config, save_config
from utils.data import BatchOrder, load_data, train_batches
from utils.errors import UserError, run_cli
from utils.evaluation import elbo_terms
from utils.run import MetricsLog, checkpoint_step, default_run_dir, mark_checkpoint, resolve_resume, save_pairs


@torch.no_grad()
def save_grids(vae: VAE, z: torch.Tensor, test_x: torch.Tensor, out_dir: Path, step: int) -> None:
    """Prior samples from fixed noise, and test images above their posterior-mean reconstructions."""
    was_training = vae.training
    vae.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_image(vae.decode(z), out_dir / f"step_{step:07d}_samples.png", nrow=8, padding=2, pad_value=1.0)
    save_pairs(test_x, vae.decode(vae.encode(test_x)[0]), out_dir / f"step_{step:07d}_recon.png")
    vae.train(was_training)


def every(done: int, k: int, last: int) -> bool:
    return (k > 0 and done % k == 0) or done == last


def train(cfg: Config, run_dir: Path, resume: Path | None = None) -> None:
    """Train ``cfg`` into ``run_dir``, optionally from a checkpoint; writes the resolved config.yaml first."""
    t = cfg.train
    mp = None if t.mixed_precision == "launcher" else t.mixed_precision
    accelerator = Accelerator(mixed_precision=mp, log_with="tensorboard", project_dir=str(run_dir))
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if t.batch_size % world:
        raise UserError(f"train.batch_size={t.batch_size} is not divisible by the {world} processes: "
                        f"use a multiple of {world}")
    set_seed(t.seed)  # same initial weights on every process and for any process count
    train_set, test_set, summary = load_data(cfg.data, cfg.data.num_workers)
    vae = VAE(cfg, train_set.shape)
    fmt = torch.channels_last if t.channels_last and cfg.model.net == "conv" else torch.contiguous_format
    vae = vae.to(memory_format=fmt)
    optimizer = torch.optim.Adam(vae.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(torch.compile(vae) if t.compile else vae, optimizer)
    if accelerator.is_main_process:  # only now, with data and model known good: a failed start leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    train_set, test_set = train_set.to(device), test_set.to(device)
    order = BatchOrder(len(train_set), t.batch_size, t.seed)
    fixed_z = torch.randn(64, cfg.model.z_dim, generator=torch.Generator().manual_seed(t.seed)).to(device)
    fixed_x = test_set.batch(torch.arange(min(32, len(test_set)), device=device))
    set_seed(t.seed, device_specific=True)  # different reparameterisation noise on each process
    start = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        start = checkpoint_step(resume)
    log = MetricsLog(run_dir / "metrics.jsonl", start if resume else None) if accelerator.is_main_process else None
    accelerator.init_trackers("tb")
    accelerator.print(f"{summary}\nrun: {run_dir}  processes={world} device={device} "
                      f"precision={accelerator.mixed_precision} params={sum(p.numel() for p in vae.parameters())}"
                      + (f"\nresumed from {resume} at step {start}" if resume else ""))

    running: dict[str, torch.Tensor] = {}
    n_running, t0 = 0, time.time()
    bar = tqdm(total=t.steps, initial=start, disable=not accelerator.is_main_process, mininterval=2.0)
    batches = train_batches(train_set, order, start, t.steps, rank, world, device, cfg.data.num_workers)
    for step in range(start, t.steps):
        x = next(batches).float().div_(255.0).contiguous(memory_format=fmt)  # (B/world, C, H, W) in [0, 1]
        if cfg.data.binarize:
            x = torch.bernoulli(x)
        if cfg.data.hflip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        terms = model(x, step)
        accelerator.backward(terms["loss"])
        if t.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for k, v in terms.items():  # summed on the device: no host sync except on logging steps
            running[k] = running.get(k, 0.0) + v.detach()
        n_running += 1
        done = step + 1
        bar.update(1)

        if every(done, t.log_every, t.steps):
            keys = sorted(running)
            vals = (accelerator.reduce(torch.stack([running[k] for k in keys]), "mean") / n_running).tolist()
            stats = dict(zip(keys, vals))
            stats["kl_weight"] = vae.kl_weight(step)
            stats["steps_per_s"] = n_running / (time.time() - t0)
            if device.type == "cuda":
                stats["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            elif resource is not None:
                stats["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            running, n_running, t0 = {}, 0, time.time()
            bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss", "rec", "kl", "mmd", "sigma") if k in stats})
            accelerator.log({f"train/{k}": v for k, v in stats.items()}, step=done)
            if log:
                log.write({"step": done, "split": "train", **stats})
        if every(done, t.sample_every, t.steps) and accelerator.is_main_process:
            save_grids(vae, fixed_z, fixed_x, run_dir / "samples", done)
        if every(done, t.eval_every, t.steps):
            stats = elbo_terms(model, test_set, t.batch_size, accelerator, t.eval_samples, t.seed)
            accelerator.log({f"test/{k}": v for k, v in stats.items()}, step=done)
            if log:
                log.write({"step": done, "split": "test", **stats})
                bar.write(f"step {done}: test elbo {stats['elbo']:.2f} nats/image, {stats['bpd']:.3f} bits/dim")
        if every(done, t.save_every, t.steps):
            final = run_dir / "checkpoints" / f"step_{done:07d}"
            tmp = final.with_name(final.name + ".tmp")
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                mark_checkpoint(tmp, final, done)
            accelerator.wait_for_everyone()
    bar.close()

    if accelerator.is_main_process:
        weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
        save_file(weights, str(run_dir / "model.safetensors"), metadata={"step": str(t.steps)})
        accelerator.print(f"done: {run_dir / 'model.safetensors'}")
    accelerator.end_training()


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Any other argument overrides a config key: loss.beta=4 or --loss.beta 4. "
                                       "--debug shows tracebacks.")
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument("-e", "--exp_dir", help="run directory (default runs/<config name>-<time>)")
    p.add_argument("-r", "--resume", help="'latest' or a checkpoint / run directory to resume")
    args, rest = p.parse_known_args(argv)
    if args.resume:
        run_dir, ckpt = resolve_resume(args.resume, args.exp_dir, args.config)
        cfg = load_config(run_dir / "config.yaml", rest)  # the run's own config; overrides may extend steps
    else:
        if args.config is None:
            raise UserError("no config given: pass one with -c, e.g. -c configs/mnist.yaml")
        cfg = load_config(args.config, rest)
        ckpt = None
        run_dir = Path(args.exp_dir) if args.exp_dir else default_run_dir(args.config)
        if (run_dir / "config.yaml").exists():
            raise UserError(f"{run_dir} already holds a run: resume it with -r latest -e {run_dir}, "
                            f"or choose another -e")
    # every process must agree on the run directory (its default name holds the time)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator would read it
    if state.num_processes > 1:
        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    state.wait_for_everyone()  # all have checked the directory before the main process writes into it
    train(cfg, run_dir, ckpt)


if __name__ == "__main__":
    run_cli(main)
