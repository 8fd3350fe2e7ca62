"""The run directory: where it is, its checkpoints, its metrics log and its image grids.

    runs/<name>-<time>/
      config.yaml            resolved config (all a sampler needs, with model.safetensors)
      model.safetensors      final weights, written at the end
      metrics.jsonl          one JSON object per logged step: step, split, loss, rec, kl, ...
      samples/               step_0001000_samples.png, step_0001000_recon.png
      checkpoints/step_0001000/   full Accelerate state (model, optimizer, scaler, RNG), rng_R.safetensors,
                             trainer_state.json (step, each file's size and SHA-256); see utils/checkpoint.py
      tb/                    TensorBoard events
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from utils.errors import UserError

RUNS = Path("runs")


def default_run_dir(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "vae"
    return RUNS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def newest_run(config_path: str | None = None, require: str = "checkpoints") -> Path:
    """The most recently modified run under runs/ (of this config's name when one is given)."""
    prefix = f"{Path(config_path).stem}-" if config_path else ""
    runs = [p for p in RUNS.glob(f"{prefix}*") if (p / require).exists()] if RUNS.is_dir() else []
    if not runs:
        what = f"runs/{prefix}*" if prefix else "runs/"
        raise UserError(f"no run with {require} found under {what}: pass the run with -e/--exp_dir")
    return max(runs, key=lambda p: p.stat().st_mtime)


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


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, entries after the checkpoint's step are dropped (they are redone)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            keep = [json.dumps(r) for r in _records(path.read_text()) if r["step"] <= resume_step]
            write_atomic(path, "".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = _records((Path(run_dir) / "metrics.jsonl").read_text())
    return [r for r in rows if split is None or r["split"] == split]


def _records(text: str) -> list[dict]:
    """The complete JSON lines of a metrics log: a line cut short by a full disk or a kill is left out."""
    rows = []
    for ln in text.splitlines():
        try:
            rows.append(json.loads(ln))
        except ValueError:
            continue
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` only once the new text is completely written: a crash leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_pairs(originals: torch.Tensor, recons: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """Grid with each row of originals directly above its row of reconstructions."""
    rows = []
    for a, b in zip(originals.split(per_row), recons.split(per_row)):
        rows += [a, b]
    save_image(torch.cat(rows), path, nrow=per_row, padding=2, pad_value=1.0)
