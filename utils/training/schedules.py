"""Learning-rate schedules, chosen by ``train.lr_schedule``, with an optional linear warm-up.

The learning rate of step s is ``train.lr · factor(s)``, a pure function of the
step: the trainer sets it before every optimizer step, so a resumed run follows
the unbroken run's schedule exactly with no scheduler state to save. (Extending
a run with a larger ``train.steps`` stretches a cosine schedule from then on.)

    constant      1
    cosine        from 1 down to ``train.lr_min_ratio`` over the steps after warm-up (Loshchilov & Hutter 2017)
    exponential   ``train.lr_decay`` ** (steps after warm-up / ``train.lr_decay_steps``), smoothly
    step          ``train.lr_decay`` ** ⌊steps after warm-up / ``train.lr_decay_steps``⌋
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from utils.training.config import TrainConfig


class Schedule:
    """factor(step) = warm-up(step) · decay(step); the warm-up rises linearly to 1 over ``train.warmup_steps``."""

    def __init__(self, t: TrainConfig):
        self.t = t

    @classmethod
    def from_config(cls, t: TrainConfig) -> Schedule:
        return cls(t)

    def after_warmup(self, step: int) -> int:
        return max(0, step - self.t.warmup_steps)

    def decay(self, step: int) -> float:
        return 1.0

    def factor(self, step: int) -> float:
        """The multiplier of ``train.lr`` at 0-based ``step``."""
        warm = min(1.0, (step + 1) / self.t.warmup_steps) if self.t.warmup_steps > 0 else 1.0
        return warm * self.decay(step)


class Constant(Schedule):
    """The same learning rate throughout (after any warm-up)."""


class Cosine(Schedule):
    def decay(self, step: int) -> float:
        span = max(1, self.t.steps - self.t.warmup_steps)
        progress = min(1.0, self.after_warmup(step) / span)
        low = self.t.lr_min_ratio
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Exponential(Schedule):
    def decay(self, step: int) -> float:
        return self.t.lr_decay ** (self.after_warmup(step) / self.t.lr_decay_steps)


class Step(Schedule):
    def decay(self, step: int) -> float:
        return self.t.lr_decay ** (self.after_warmup(step) // self.t.lr_decay_steps)


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "cosine": Cosine,
    "exponential": Exponential,
    "step": Step,
}


def build_schedule(t: TrainConfig) -> Schedule:
    return SCHEDULES[t.lr_schedule].from_config(t)
