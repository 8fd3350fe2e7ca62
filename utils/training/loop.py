"""The training loop: ``train(cfg, run_dir)`` trains a validated config into a run directory.

Accelerate owns the devices, precision and distribution. The loop reads as an
outline: forward and loss, backward, clip, a step that is skipped on the device
when anything is not finite, then the periodic blocks (log, samples, test ELBO,
checkpoint, agree to stop), each a named helper below. It counts steps, not
epochs, and never reads sys.argv.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker
from accelerate.utils import set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

try:
    import resource  # peak resident memory on CPU; not on Windows
except ImportError:
    resource = None

from models.vae import VAE
from utils.config import Config, complete_config, config_to_dict, config_yaml
from utils.data.batching import BatchOrder, to_inputs, train_batches
from utils.data.registry import class_count, load_data
from utils.data.splits import ImageSplit
from utils.errors import Interrupted, UserError
from utils.evaluation.bounds import elbo_terms
from utils.files import write_atomic
from utils.grids import save_grid, save_pairs
from utils.threads import AdaptiveThreads, training_threads
from utils.training.checkpoints import checkpoint_dir, checkpoints, load_checkpoint, save_checkpoint, supersede_newer
from utils.training.config import run_precision
from utils.training.optim import StepGuard, clip_and_norm, make_optimizer
from utils.training.run_folder import MetricsLog, create_run_dir, record_command, save_weights
from utils.training.schedules import Schedule, build_schedule
from utils.training.trackers import check_installed, log_images, start_trackers, tracker_names


@dataclass
class Session:
    """What the loop and its periodic blocks share."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    vae: VAE                        # the plain module (sampling, saving)
    model: torch.nn.Module          # the same, prepared by Accelerate (DDP, autocast), for training steps
    trained: list[torch.nn.Parameter]  # what the optimizer trains (not a critic's own network)
    optimizer: torch.optim.Optimizer
    train_set: ImageSplit
    test_set: ImageSplit
    memory_format: torch.memory_format
    schedule: Schedule              # the learning rate of each step, a pure function of the step
    fixed_x: torch.Tensor           # (32, C, H, W) test images for the reconstruction grids
    fixed_y: torch.Tensor | None    # their labels, or None
    log: MetricsLog | None          # metrics.jsonl, on the main process
    start: int                      # the first step to run (the checkpoint's, on resume)
    ema: AveragedModel | None       # the weights' moving average (train.ema_decay), or None
    threads: AdaptiveThreads | None = None  # the CPU thread count kept to the free cores, or None when fixed

    def extras(self) -> dict[str, dict[str, torch.Tensor]]:
        """Checkpointed state beyond Accelerate's: the weights' moving average, the critics' optimizers."""
        out = {"ema.safetensors": self.ema.state_dict()} if self.ema is not None else {}
        return out | {name: c.state_tensors() for name, c in self.vae.critics().items()}

    @property
    def final(self) -> VAE:
        """The model that is evaluated, drawn from and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.vae


def train(cfg: Config, run_dir: Path, resume: Path | None = None, overwrite: bool = False,
          command: str = "") -> None:
    """Train ``cfg`` into ``run_dir``, optionally from a checkpoint; writes the resolved config.yaml once data
    and model have loaded.

    Raises ``Interrupted`` after saving a checkpoint when SIGINT/SIGTERM arrives, and
    ``UserError`` when training diverges (``train.max_bad_steps`` non-finite steps in a row).
    """
    complete_config(cfg)  # a config built in code; one that train_vae.py resolved is complete already
    s = start_session(cfg, run_dir, resume, overwrite, command)
    t, acc = cfg.train, s.accelerator
    guard, meter = StepGuard(s.vae, acc.device), Meter(acc.device)
    done = saved_at = s.start
    batches = train_batches(s.train_set, BatchOrder(len(s.train_set), t.batch_size, t.seed), s.start, t.steps,
                            acc.process_index, acc.num_processes, acc.device, cfg.data.num_workers)
    bar = tqdm(total=t.steps, initial=s.start, disable=not acc.is_main_process, mininterval=2.0)
    # the bar closes before any error; closing the batches stops DataLoader workers at once when the loop fails
    with GracefulStop(announce=acc.is_main_process) as stop, bar, closing(batches):
        for step in range(s.start, t.steps):
            # Forward and loss.
            images, y = next(batches)  # labels: read by a conditional model only
            x = to_inputs(images, cfg.data, s.memory_format)  # (B/processes, C, H, W) in [0, 1]
            guard.before_forward()
            terms = forward_backward(s, x, y, step)  # (in train.grad_accum_steps micro-batches)
            # Clip, and a step that the fused Adam kernel skips when anything is not finite.
            norm = clip_and_norm(acc, s.trained, t.grad_clip)
            bad = guard.check(terms["loss"], norm, acc, t.grad_skip)  # decided on the device: no host sync
            guard.skip_if(s.optimizer, bad, acc.scaler)
            set_lr(s.optimizer, t.lr * s.schedule.factor(step))
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            terms |= s.vae.after_step(acc, bad)  # the networks of their own (FactorVAE's critic, a discriminator)
            if s.ema is not None:
                s.ema.update_parameters(s.vae)
            meter.add(terms, bad)
            if s.threads is not None:
                s.threads.tick()
            done = step + 1
            bar.update(1)
            # Periodic blocks.
            if every(done, t.log_every, t.steps):
                log_train(s, meter, guard, bar, done)
            check_divergence(s, guard, done)
            if every(done, t.sample_every, t.steps) and acc.is_main_process:
                log_images(acc, save_grids(s.final, t.seed, s.fixed_x, s.fixed_y, run_dir / "samples", done), done)
            if every(done, t.eval_every, t.steps):
                log_test(s, bar, done)
            if every(done, t.save_every, t.steps):
                save_checkpoint(acc, run_dir, done, t.keep_checkpoints, s.extras())
                saved_at = done
            if stop_agreed(stop, acc, done):
                break
    finish(s, stop, done, saved_at)


def forward_backward(s: Session, x: torch.Tensor, y: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
    """The loss terms of this process's batch and their gradients. With ``train.grad_accum_steps`` = n, the
    batch is run as n micro-batches in turn, each loss divided by n, so the gradients summed in .grad are
    those of the mean; under DDP only the last backward all-reduces. Returns the terms' means."""
    n = s.cfg.train.grad_accum_steps
    if n == 1:
        terms = s.model(x, step, y)
        s.accelerator.backward(terms["loss"])
        return terms
    total: dict[str, torch.Tensor] = {}
    ys = [None] * n if y is None else y.chunk(n)
    for i, (xi, yi) in enumerate(zip(x.chunk(n), ys)):
        with s.accelerator.no_sync(s.model) if i < n - 1 else nullcontext():
            terms = s.model(xi, step, yi)
            s.accelerator.backward(terms["loss"] / n)
        for k, v in terms.items():
            total[k] = total.get(k, 0.0) + v.detach() / n
    return total


def start_session(cfg: Config, run_dir: Path, resume: Path | None, overwrite: bool, command: str = "") -> Session:
    """Accelerator, data, model and optimizer; the run directory (only once those loaded); the checkpoint."""
    t = cfg.train
    _, adapter, threads_said = training_threads(t.threads)
    mp = run_precision(t.mixed_precision)  # accelerate's setting when launcher, checked
    trackers = tracker_names(t.log_with)
    check_installed(trackers)
    # TensorBoard as an instance, so that its events go to <run>/tb whatever the other trackers' project is called
    log_with = [TensorBoardTracker("tb", str(run_dir)) if n == "tensorboard" else n for n in trackers]
    acc = Accelerator(mixed_precision=mp, log_with=log_with or None, project_dir=str(run_dir))
    if acc.mixed_precision == "fp16" and not acc.native_amp:  # Accelerate would train in fp32 and say fp16
        raise UserError(f"train.mixed_precision=fp16 needs a GPU, and this process runs on the {acc.device.type}: "
                        f"use bf16 (autocast on a CPU too) or no")
    if acc.mixed_precision == "fp16" and t.grad_skip:  # the GradScaler owns fp16's skips: no norm is taken
        raise UserError(f"train.grad_skip={t.grad_skip:g} cannot act under fp16, whose gradient scaler skips steps "
                        f"itself: use bf16 or no, or drop train.grad_skip")
    if t.batch_size % (acc.num_processes * t.grad_accum_steps):
        parts = acc.num_processes * t.grad_accum_steps
        raise UserError(f"train.batch_size={t.batch_size} does not split into {acc.num_processes} processes x "
                        f"{t.grad_accum_steps} micro-batches: use a multiple of {parts}")
    set_seed(t.seed)  # same initial weights on every process and for any process count
    with acc.local_main_process_first():  # one process per machine decodes a cache; the others then read it
        train_set, test_set, summary = load_data(cfg.data, cfg.data.num_workers)
    if cfg.model.conditional:  # the labels agree with model.n_classes, every class has training images
        class_count(train_set, test_set, cfg.model.n_classes)
    vae = VAE(cfg.model, cfg.loss, train_set.shape, cfg.train.batch_size)
    if resume is None and cfg.model.init_from:  # a fresh run starts from the pretrained networks
        vae.decoder.init_from(vae.encoder, cfg.model.init_from, cfg.model, vae.img_shape)
    if t.trainable == "decoder":  # the encoder is frozen: no gradient, no optimiser state
        vae.encoder.requires_grad_(False)
    fmt = torch.channels_last if t.channels_last and vae.convolutional else torch.contiguous_format
    vae = vae.to(memory_format=fmt)
    trained = [p for p in vae.trained_parameters() if p.requires_grad]
    optimizer = make_optimizer(trained, t)
    model, optimizer = acc.prepare(torch.compile(vae) if t.compile else vae, optimizer)
    ema = None
    if t.ema_decay > 0:  # a copy on the device; its first update copies the weights, later ones interpolate
        ema = AveragedModel(vae, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    if acc.is_main_process and resume is None:  # only now, with data and model known good:
        create_run_dir(run_dir, config_yaml(cfg), overwrite, command)  # a failed start leaves nothing behind
    acc.wait_for_everyone()
    device = acc.device
    train_set, test_set = train_set.to(device), test_set.to(device)
    fixed_idx = torch.arange(min(32, len(test_set)), device=device)
    fixed_x, fixed_y = test_set.batch(fixed_idx), test_set.labels_at(fixed_idx)
    set_seed(t.seed, device_specific=True)  # different reparameterisation noise on each process
    start = 0
    if resume is not None:
        start = load_checkpoint(acc, resume, vae, resume_extras(vae, ema))
        if acc.is_main_process:  # the run's config changes only once its checkpoint has loaded
            write_atomic(run_dir / "config.yaml", config_yaml(cfg))
            record_command(run_dir, command, resumed_at=start)
            supersede_newer(run_dir, start)
        for group in optimizer.param_groups:  # the optimizer state brings the old values; the config wins
            group["lr"], group["weight_decay"] = t.lr, t.weight_decay
    log = MetricsLog(run_dir / "metrics.jsonl", start if resume else None) if acc.is_main_process else None
    start_trackers(acc, t.log_with, config_to_dict(cfg), run_dir, fresh=resume is None)
    acc.print(f"{summary}\nrun: {run_dir}  processes={acc.num_processes} device={device} "
              f"{threads_said} precision={acc.mixed_precision} "
              f"params={sum(p.numel() for p in vae.parameters())}"
              + (f"\nresumed from {resume} at step {start}" if resume else ""))
    return Session(cfg, run_dir, acc, vae, model, trained, optimizer, train_set, test_set, fmt, build_schedule(t),
                   fixed_x, fixed_y, log, start, ema, adapter)


def resume_extras(vae: VAE, ema: AveragedModel | None) -> dict:
    """The loaders of the checkpointed state beyond Accelerate's (Session.extras), with the fix when it is
    missing."""
    extras = {}
    if ema is not None:
        extras["ema.safetensors"] = (ema.load_state_dict, "the run kept no moving average of the weights; resume "
                                                          "with train.ema_decay=0, as it was started")
    for name, critic in vae.critics().items():
        extras[name] = (critic.load_state_tensors, critic.missing_state)
    return extras


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def every(done: int, k: int, last: int) -> bool:
    """Whether a block that runs every ``k`` steps (0: only at the end) runs after step ``done``."""
    return (k > 0 and done % k == 0) or done == last


class Meter:
    """Each loss term summed over the good steps since the last log, on the device: read only when logging."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.good, self.steps, self.t0 = torch.zeros((), device=device), 0, time.time()

    def add(self, terms: dict[str, torch.Tensor], bad: torch.Tensor) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(bad > 0, 0.0, v.detach())
        self.good += 1 - bad
        self.steps += 1

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over processes and good steps (nan when every step was skipped), and steps/s; then reset."""
        keys = sorted(self.sums)
        sums = accelerator.reduce(torch.stack([self.sums[k] for k in keys]), "mean")
        stats = dict(zip(keys, (sums / self.good).tolist()))
        stats["steps_per_s"] = self.steps / (time.time() - self.t0)
        self.sums, self.steps, self.t0 = {}, 0, time.time()
        self.good.zero_()
        return stats


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak GPU allocation, or the process's peak resident memory on a CPU (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resource is not None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None


def log_train(s: Session, meter: Meter, guard: StepGuard, bar: tqdm, done: int) -> None:
    """Training terms since the last log to the progress bar, the trackers and metrics.jsonl."""
    stats = meter.read(s.accelerator)
    stats["kl_weight"] = s.vae.kl_weight(done - 1)
    stats["lr"] = s.cfg.train.lr * s.schedule.factor(done - 1)
    stats["bad_steps"] = int(guard.total)
    stats["threads"] = torch.get_num_threads()
    memory = peak_memory_mb(s.accelerator.device)
    if memory is not None:
        stats["peak_mem_mb"] = memory
    # a ladder's KL per layer, kl_1 (bottom) ... kl_L, beside the total
    layers = sorted((k for k in stats if k[:3] == "kl_" and k[3:].isdigit()), key=lambda k: int(k[3:]))
    shown = ("loss", "rec", "kl", *layers, "mmd", "tc", "sigma")
    bar.set_postfix({k: f"{stats[k]:.4g}" for k in shown if k in stats})
    s.accelerator.log({f"train/{k}": v for k, v in stats.items()}, step=done)
    if s.log:
        s.log.write({"step": done, "split": "train", **stats})


def log_test(s: Session, bar: tqdm, done: int) -> None:
    """The held-out ELBO (nats per image, bits per dimension) to the trackers and metrics.jsonl."""
    t = s.cfg.train
    model = s.model if s.ema is None else s.ema.module
    stats = elbo_terms(model, s.test_set, t.batch_size, s.accelerator, t.eval_samples, t.seed,
                       binarize=s.cfg.data.binarize)
    s.accelerator.log({f"test/{k}": v for k, v in stats.items()}, step=done)
    if s.log:
        s.log.write({"step": done, "split": "test", **stats})
        if "elbo" in stats:
            bar.write(f"step {done}: test elbo {stats['elbo']:.2f} nats/image, {stats['bpd']:.3f} bits/dim")
        else:
            bar.write(f"step {done}: test reconstruction -log p(x|z) {stats['nll']:.2f} nats/image")


@torch.no_grad()
def save_grids(vae: VAE, seed: int, test_x: torch.Tensor, test_y: torch.Tensor | None, out_dir: Path,
               step: int) -> dict[str, Path]:
    """64 prior samples drawn with the same seed at every step (a learned prior is asked anew; a conditional
    model draws one class per row), and test images above their posterior-mean reconstructions; returns the
    files."""
    was_training = vae.training
    vae.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    z = vae.prior.sample(64, torch.Generator().manual_seed(seed)).to(test_x.device)
    y = vae.grid_labels(64)
    paths = {"samples": out_dir / f"step_{step:07d}_samples.png",
             "reconstructions": out_dir / f"step_{step:07d}_recon.png"}
    if vae.has_prior:  # (a plain autoencoder has none to draw from)
        save_grid(vae.decode(z, y), paths["samples"], per_row=8)
    else:
        del paths["samples"]
    save_pairs(test_x, vae.reconstruction(test_x, test_y), paths["reconstructions"])
    vae.train(was_training)
    return paths


def check_divergence(s: Session, guard: StepGuard, done: int) -> None:
    """Stop after ``train.max_bad_steps`` skipped steps in a row. A CPU reads the count for free every step;
    a GPU only at logging steps, where it synchronises anyway."""
    t = s.cfg.train
    if s.accelerator.device.type != "cpu" and not every(done, t.log_every, t.steps):
        return
    streak = int(guard.worst)
    if streak < t.max_bad_steps:
        return
    last = checkpoints(s.run_dir)
    kept = f"the last good checkpoint {last[-1]} is kept" if last else "no checkpoint had been saved yet"
    why = "a non-finite loss or gradient" + (f" or a gradient norm above train.grad_skip={t.grad_skip:g}"
                                              if t.grad_skip else "")
    raise UserError(f"training diverged at step {done}: {streak} steps in a row had {why} "
                    f"(each skipped); {kept}: lower train.lr (now {t.lr:g}), set train.grad_clip, or train in "
                    f"fp32 (train.mixed_precision=no)")


def finish(s: Session, stop: GracefulStop, done: int, saved_at: int) -> None:
    """After the loop: the final weights, or, when a signal stopped it, a checkpoint at this step and the
    resume command (as ``Interrupted``)."""
    acc = s.accelerator
    if done < s.cfg.train.steps:
        keep = s.cfg.train.keep_checkpoints
        ckpt = checkpoint_dir(s.run_dir, done) if saved_at == done else save_checkpoint(acc, s.run_dir, done, keep,
                                                                                         s.extras())
        acc.end_training()
        signum = stop.signum or signal.SIGTERM  # a process may stop because another one was signalled
        raise Interrupted(f"{signal.Signals(signum).name} at step {done}: saved {ckpt}; resume with "
                          f"python train_vae.py -r latest -e {s.run_dir}", signum)
    if acc.is_main_process:
        save_weights(s.final, s.run_dir, done)
        acc.print(f"done: {s.run_dir / 'model.safetensors'}")
    acc.end_training()


class GracefulStop:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM into a request: finish the step, checkpoint, exit.

    Why not just die: a scheduler's SIGTERM or a Ctrl-C would lose everything since the
    last checkpoint. The loop polls ``requested``. The same signal often arrives twice
    (the terminal and ``accelerate launch`` both forward Ctrl-C), so repeats within 2 s
    are ignored; a later one aborts at once, which is safe because checkpoints are
    only ever made visible complete.
    """

    def __init__(self, announce: bool = True):
        self.signum, self.announce, self._first, self._old = 0, announce, 0.0, {}

    def __enter__(self) -> GracefulStop:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            if time.monotonic() - self._first > 2.0:
                os._exit(128 + signum)
            return
        self.signum, self._first = signum, time.monotonic()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  f"(send it again to abort without saving)", file=sys.stderr, flush=True)


def stop_agreed(stop: GracefulStop, accelerator: Accelerator, done: int) -> bool:
    """Whether to stop after step ``done``, through Accelerate's trigger. A signal may reach the processes at
    different steps and all must save the same one, so several processes agree every 10 steps (one tiny
    all-reduce); one process stops at once, and checks nothing until it is signalled."""
    if stop.requested:
        accelerator.set_trigger()
    if accelerator.num_processes == 1:
        return stop.requested and accelerator.check_trigger()
    return done % 10 == 0 and accelerator.check_trigger()
