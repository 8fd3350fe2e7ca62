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
import errno
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env, set_seed
from safetensors import SafetensorError
from safetensors.torch import save_file
from torchvision.utils import save_image
from tqdm import tqdm

try:
    import resource  # peak resident memory on CPU; not on Windows
except ImportError:
    resource = None

from models.vae import VAE
from utils.checkpoint import (
    checkpoint_dir,
    checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    supersede_newer,
)
from utils.config import Config, TrainConfig, config_yaml, load_config
from utils.data import BatchOrder, load_data, train_batches
from utils.errors import CliParser, Interrupted, UserError, run_cli
from utils.evaluation import elbo_terms
from utils.optim import StepGuard, grad_norm, make_optimizer
from utils.run import GracefulStop, MetricsLog, default_run_dir, save_pairs, write_atomic


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


def _prepare_run_dir(cfg: Config, run_dir: Path, overwrite: bool) -> None:
    """Create the run directory and its config.yaml (main process, once data and model are known good)."""
    try:
        if overwrite and run_dir.exists():
            print(f"--overwrite: replacing the run in {run_dir}")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", config_yaml(cfg))
    except OSError as e:
        raise UserError(f"cannot write the run directory {run_dir} ({e.strerror}): choose a writable place "
                        f"with -e") from None


def train(cfg: Config, run_dir: Path, resume: Path | None = None, overwrite: bool = False) -> None:
    """Train ``cfg`` into ``run_dir``, optionally from a checkpoint; writes the resolved config.yaml first.

    Raises ``Interrupted`` after saving a checkpoint when SIGINT/SIGTERM arrives, and
    ``UserError`` when training diverges (``train.max_bad_steps`` non-finite steps in a row).
    """
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
    optimizer = make_optimizer(vae.parameters(), t)
    model, optimizer = accelerator.prepare(torch.compile(vae) if t.compile else vae, optimizer)
    if accelerator.is_main_process and resume is None:  # only now, with data and model known good:
        _prepare_run_dir(cfg, run_dir, overwrite)        # a failed start leaves nothing behind
    accelerator.wait_for_everyone()
    train_set, test_set = train_set.to(device), test_set.to(device)
    order = BatchOrder(len(train_set), t.batch_size, t.seed)
    fixed_z = torch.randn(64, cfg.model.z_dim, generator=torch.Generator().manual_seed(t.seed)).to(device)
    fixed_x = test_set.batch(torch.arange(min(32, len(test_set)), device=device))
    set_seed(t.seed, device_specific=True)  # different reparameterisation noise on each process
    start = 0
    if resume is not None:
        start = load_checkpoint(accelerator, resume, vae)
        if accelerator.is_main_process:  # the run's config changes only once its checkpoint has loaded
            write_atomic(run_dir / "config.yaml", config_yaml(cfg))
            supersede_newer(run_dir, start)
        for group in optimizer.param_groups:  # the optimizer state brings the old values; the config wins
            group["lr"], group["weight_decay"] = t.lr, t.weight_decay
    log = MetricsLog(run_dir / "metrics.jsonl", start if resume else None) if accelerator.is_main_process else None
    accelerator.init_trackers("tb")
    accelerator.print(f"{summary}\nrun: {run_dir}  processes={world} device={device} "
                      f"precision={accelerator.mixed_precision} params={sum(p.numel() for p in vae.parameters())}"
                      + (f"\nresumed from {resume} at step {start}" if resume else ""))

    guard = StepGuard(vae, device)
    running: dict[str, torch.Tensor] = {}
    n_good, n_steps, t0 = torch.zeros((), device=device), 0, time.time()
    saved_at, done = start, start
    bar = tqdm(total=t.steps, initial=start, disable=not accelerator.is_main_process, mininterval=2.0)
    batches = train_batches(train_set, order, start, t.steps, rank, world, device, cfg.data.num_workers)
    with GracefulStop(announce=accelerator.is_main_process) as stop, bar:  # the bar closes before any error
        for step in range(start, t.steps):
            x = next(batches).float().div_(255.0).contiguous(memory_format=fmt)  # (B/world, C, H, W) in [0, 1]
            if cfg.data.binarize:
                x = torch.bernoulli(x)
            if cfg.data.hflip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
            guard.before_forward()
            terms = model(x, step)
            accelerator.backward(terms["loss"])
            norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else None
            if accelerator.scaler is not None:
                norm = None  # fp16: overflowing gradients are normal while the GradScaler calibrates; it skips them
            elif norm is None:
                norm = grad_norm(model.parameters())
            bad = guard.check(terms["loss"], norm, accelerator)
            guard.skip_if(optimizer, bad, accelerator.scaler)  # decided on the device: no host sync
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():  # summed on the device over good steps only
                running[k] = running.get(k, 0.0) + torch.where(bad > 0, 0.0, v.detach())
            n_good += 1 - bad
            n_steps += 1
            done = step + 1
            bar.update(1)

            if every(done, t.log_every, t.steps):
                keys = sorted(running)
                sums = accelerator.reduce(torch.stack([running[k] for k in keys]), "mean")
                vals = (sums / n_good).tolist()  # nan when every step since the last log was skipped
                stats = dict(zip(keys, vals))
                stats["kl_weight"] = vae.kl_weight(step)
                stats["steps_per_s"] = n_steps / (time.time() - t0)
                stats["bad_steps"] = int(guard.total)
                if device.type == "cuda":
                    stats["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                elif resource is not None:
                    stats["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                running, n_steps, t0 = {}, 0, time.time()
                n_good.zero_()
                bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss", "rec", "kl", "mmd", "sigma") if k in stats})
                accelerator.log({f"train/{k}": v for k, v in stats.items()}, step=done)
                if log:
                    log.write({"step": done, "split": "train", **stats})
            # a CPU reads the streak for free; a GPU only at logging steps, where it synchronises anyway
            if (device.type == "cpu" or every(done, t.log_every, t.steps)) and guard.worst >= t.max_bad_steps:
                raise diverged(int(guard.worst), done, t, run_dir)
            if every(done, t.sample_every, t.steps) and accelerator.is_main_process:
                save_grids(vae, fixed_z, fixed_x, run_dir / "samples", done)
            if every(done, t.eval_every, t.steps):
                stats = elbo_terms(model, test_set, t.batch_size, accelerator, t.eval_samples, t.seed)
                accelerator.log({f"test/{k}": v for k, v in stats.items()}, step=done)
                if log:
                    log.write({"step": done, "split": "test", **stats})
                    bar.write(f"step {done}: test elbo {stats['elbo']:.2f} nats/image, {stats['bpd']:.3f} bits/dim")
            if every(done, t.save_every, t.steps):
                save_checkpoint(accelerator, run_dir, done, t.keep_checkpoints)
                saved_at = done
            if stop_agreed(stop, accelerator, done):
                break

    if done < t.steps:  # stopped by a signal
        ckpt = save_checkpoint(accelerator, run_dir, done, t.keep_checkpoints) if saved_at != done else \
            checkpoint_dir(run_dir, done)
        accelerator.end_training()
        signum = stop.signum or signal.SIGTERM  # a process may stop because another one was signalled
        raise Interrupted(f"{signal.Signals(signum).name} at step {done}: saved {ckpt}; resume with "
                          f"python train_vae.py -r latest -e {run_dir}", signum)
    if accelerator.is_main_process:
        save_weights(vae, run_dir, t.steps)
        accelerator.print(f"done: {run_dir / 'model.safetensors'}")
    accelerator.end_training()


def save_weights(vae: VAE, run_dir: Path, step: int) -> None:
    """model.safetensors, made visible only complete. safetensors reports a full disk as a SafetensorError,
    not an OSError, so it is turned into the one-line error here; the final checkpoint is already complete."""
    final, tmp = run_dir / "model.safetensors", run_dir / "model.safetensors.tmp"
    weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    try:
        save_file(weights, str(tmp), metadata={"step": str(step)})
        os.replace(tmp, final)
    except (OSError, SafetensorError) as e:
        if tmp.is_file():
            tmp.unlink()
        raise UserError(f"could not write {final} ({str(e).strip().splitlines()[-1]}): free disk space or fix "
                        f"permissions, then rerun with -r latest -e {run_dir} (its checkpoint at step {step} is "
                        f"complete; it only writes the weights)") from None


def diverged(streak: int, step: int, t: TrainConfig, run_dir: Path) -> UserError:
    last = checkpoints(run_dir)
    kept = f"the last good checkpoint {last[-1]} is kept" if last else "no checkpoint had been saved yet"
    return UserError(f"training diverged at step {step}: {streak} steps in a row had a non-finite loss or gradient "
                     f"(each skipped); {kept}: lower train.lr (now {t.lr:g}), set train.grad_clip, or train in "
                     f"fp32 (train.mixed_precision=no)")


def stop_agreed(stop: GracefulStop, accelerator: Accelerator, done: int) -> bool:
    """Whether to stop now. One process decides alone; several agree every 10 steps (one tiny all-reduce),
    since a signal may reach them at different steps and all must save the same step."""
    if accelerator.num_processes == 1:
        return stop.requested
    if done % 10:
        return False
    flag = torch.tensor(float(stop.requested), device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum") > 0)


# errors that mean "the disk or its permissions", not a bug: reported in one line with what to do
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def main(argv: list[str]) -> None:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Any other argument overrides a config key: loss.beta=4 or --loss.beta 4. "
                                       "--debug shows tracebacks.")
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument("-e", "--exp_dir", help="run directory (default runs/<config name>-<time>)")
    p.add_argument("-r", "--resume", help="'latest' or a checkpoint / run directory to resume")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --exp_dir (deleted once the new run's data and model load)")
    args, rest = p.parse_known_args(argv)
    # every process builds the same view; only the main one prints warnings
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator would read it
    if args.resume:
        if args.overwrite:
            raise UserError("--overwrite starts a run afresh and -r continues one: pass only one of them")
        run_dir, ckpt = resolve_resume(args.resume, args.exp_dir, args.config, verbose=state.is_main_process)
        cfg = load_config(run_dir / "config.yaml", rest)  # the run's own config; overrides may extend steps
    else:
        if args.config is None:
            raise UserError("no config given: pass one with -c, e.g. -c configs/mnist.yaml")
        cfg = load_config(args.config, rest)
        ckpt = None
        run_dir = Path(args.exp_dir) if args.exp_dir else default_run_dir(args.config)
        check_new_run_dir(run_dir, args.overwrite)
    if state.num_processes > 1:  # every process must agree on the run directory (its default name holds the time)
        run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    state.wait_for_everyone()  # all have checked the directory before the main process writes into it
    try:
        train(cfg, run_dir, ckpt, args.overwrite)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        raise UserError(f"cannot write {e.filename or run_dir} ({e.strerror}): free disk space or fix permissions, "
                        f"then resume with -r latest -e {run_dir} (complete checkpoints are intact)") from None


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Never mix two runs in one directory: refuse a used one unless --overwrite names a run to replace."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory: choose another -e")
    if not any(run_dir.iterdir()):
        return
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not empty and is not a run (no config.yaml): choose another -e")
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run: resume it with -r latest -e {run_dir}, replace it with "
                        f"--overwrite, or choose another -e")


if __name__ == "__main__":
    run_cli(main)
