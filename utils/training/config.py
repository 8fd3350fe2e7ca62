"""The ``train`` config section: steps, batch, optimiser, schedule, precision, and the periodic blocks."""

from __future__ import annotations

import os
from dataclasses import dataclass

from utils.errors import UserError
from utils.fields import opt

PRECISIONS = ("no", "fp16", "bf16")  # what a run may train in, set here or by accelerate (launcher)


@dataclass
class TrainConfig:
    steps: int = opt(5000, "optimizer steps in total", min=1)
    batch_size: int = opt(128, "global batch size, split evenly across processes", min=1)
    grad_accum_steps: int = opt(1, "micro-batches per step: each process's share of the batch is split into this "
                                   "many, run in turn, their gradients averaged (the same batch on fewer devices)",
                                min=1)
    lr: float = opt(1e-3, "Adam learning rate (the peak, with a schedule)", min=0.0, min_exclusive=True)
    lr_schedule: str = opt("constant", "learning-rate schedule after warm-up")
    warmup_steps: int = opt(0, "linear learning-rate warm-up from 0 over this many steps (0: off)", min=0)
    lr_min_ratio: float = opt(0.0, "cosine: the final learning rate as a fraction of train.lr", min=0.0, max=1.0)
    lr_decay: float = opt(0.1, "exponential, step: factor per train.lr_decay_steps", min=0.0, max=1.0,
                          min_exclusive=True)
    lr_decay_steps: int = opt(1000, "exponential, step: steps per factor of train.lr_decay", min=1)
    weight_decay: float = opt(0.0, "Adam weight decay", min=0.0)
    trainable: str = opt("all", "what the optimiser trains: all, or decoder (the decoder and the likelihood's "
                                "own parameters; the encoder stays as it started, the common way to adapt a "
                                "pretrained autoencoder's decoder to new data, model.init_from)",
                         choices=("all", "decoder"))
    ema_decay: float = opt(0.0, "exponential moving average of the weights with this decay per step (0: off; "
                                "0.999 is common): the test ELBO, grids and model.safetensors use the average",
                           min=0.0, max=0.999999)
    grad_clip: float = opt(0.0, "clip the global gradient norm to this value (0: off)", min=0.0)
    grad_skip: float = opt(0.0, "skip the update of a step whose global gradient norm (before clipping) exceeds "
                                "this (Child 2021, for deep hierarchies; 0: off); it counts as a skipped step",
                           min=0.0)
    seed: int = opt(0, "seed for initialisation, noise and data order", min=0)
    mixed_precision: str = opt("launcher", "no, fp16, bf16, or launcher: take accelerate's setting",
                               choices=("launcher", *PRECISIONS))
    log_every: int = opt(50, "steps between progress-bar / metrics.jsonl updates", min=1)
    log_with: str = opt("tensorboard", "experiment trackers, comma-separated: any of Accelerate's (tensorboard, "
                                       "wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio), or none")
    sample_every: int = opt(1000, "steps between sample and reconstruction grids (0: only at the end)", min=0)
    eval_every: int = opt(1000, "steps between test-split ELBO evaluations (0: only at the end)", min=0)
    eval_samples: int = opt(0, "test images used by the periodic evaluation (0: all)", min=0)
    save_every: int = opt(1000, "steps between resumable checkpoints (0: only at the end)", min=0)
    keep_checkpoints: int = opt(3, "newest checkpoints kept; older ones are deleted (0: keep all)", min=0)
    max_bad_steps: int = opt(20, "stop after this many non-finite (NaN/Inf) steps in a row; each is skipped",
                             min=1)
    channels_last: bool = opt(True, "conv nets: channels-last memory format (faster convolutions on CPU and GPU)")
    compile: bool = opt(False, "torch.compile the model (slow first steps, then faster on GPUs)")
    threads: int = opt(0, "CPU threads for PyTorch's kernels: a fixed count, or 0: OMP_NUM_THREADS when set, else "
                          "one per core that other processes leave free, rechecked each second (a fixed count keeps "
                          "the arithmetic of every step the same)", min=0)


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX) for oneDNN's kernels. Without them CPU
    autocast still runs in bf16, through converting fallback kernels that are several times slower than fp32."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fp32_only(script: str) -> str | None:
    """For sample.py and evaluate.py, which compute in fp32: a note when accelerate's precision asks for another
    (it has no effect there), and a one-line error for a value that is none of the choices."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in PRECISIONS:
        raise UserError(f"ACCELERATE_MIXED_PRECISION={value} (accelerate's setting) is not one of "
                        f"{', '.join(PRECISIONS)}: set it to one of them, or unset it ({script} computes in fp32)")
    if value != "no":
        return f"{script} computes in fp32: ACCELERATE_MIXED_PRECISION={value} has no effect here"
    return None


def run_precision(setting: str) -> str:
    """The precision a run trains in: ``train.mixed_precision``, or for ``launcher`` accelerate's setting
    (ACCELERATE_MIXED_PRECISION, which ``accelerate launch`` and its config file set), checked against the same
    choices: Accelerate itself takes any value there and reports it as the run's precision (``precision=fp8x``)."""
    if setting != "launcher":
        return setting
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in PRECISIONS:
        raise UserError(f"ACCELERATE_MIXED_PRECISION={value} (accelerate's setting, which train.mixed_precision="
                        f"launcher takes) is not one of {', '.join(PRECISIONS)}: set it to one of them (accelerate "
                        f"config, or accelerate launch --mixed_precision), or set train.mixed_precision")
    return value
