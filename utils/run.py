"""The run directory: where it is, its checkpoints, its metrics log and its image grids.

    runs/<name>-<time>/
      config.yaml            resolved config (all a sampler needs, with model.safetensors)
      model.safetensors      final weights, written at the end
      metrics.jsonl          one JSON object per logged step: step, split, loss, rec, kl, ...
      samples/               step_0001000_samples.png, step_0001000_recon.png
      checkpoints/step_0001000/   full Accelerate state (model, optimizer, scaler, RNG) + trainer_state.json
      tb/                    TensorBoard events
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from utils.errors import UserError

RUNS = Path("runs")
STATE_FILE = "trainer_state.json"


def default_run_dir(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "vae"
    return RUNS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a complete one has its trainer_state.json)."""
    found = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def newest_run(config_path: str | None = None, require: str = "checkpoints") -> Path:
    """The most recently modified run under runs/ (of this config's name when one is given)."""
    prefix = f"{Path(config_path).stem}-" if config_path else ""
    runs = [p for p in RUNS.glob(f"{prefix}*") if (p / require).exists()] if RUNS.is_dir() else []
    if not runs:
        what = f"runs/{prefix}*" if prefix else "runs/"
        raise UserError(f"no run with {require} found under {what}: pass the run with -e/--exp_dir")
    return max(runs, key=lambda p: p.stat().st_mtime)


def resolve_resume(resume: str, exp_dir: str | None, config_path: str | None) -> tuple[Path, Path]:
    """(run_dir, checkpoint) for ``-r latest`` or ``-r PATH`` (a checkpoint or a run directory)."""
    if resume == "latest":
        run_dir = Path(exp_dir) if exp_dir else newest_run(config_path)
        ckpts = checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"no complete checkpoint in {run_dir}/checkpoints: start a new run without -r")
        return run_dir, ckpts[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path.parent.parent, path
    if (path / "checkpoints").is_dir() and checkpoints(path):
        return path, checkpoints(path)[-1]
    raise UserError(f"-r {resume}: not a checkpoint (runs/X/checkpoints/step_N) or a run with checkpoints; "
                    f"use -r latest or an existing path")


def mark_checkpoint(tmp: Path, final: Path, step: int) -> None:
    """Make a checkpoint visible only once complete: write its step, then rename into place."""
    (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
    os.replace(tmp, final)


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, entries after the checkpoint's step are dropped (they are redone)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(ln) for ln in lines if ln]
    return [r for r in rows if split is None or r["split"] == split]


def save_pairs(originals: torch.Tensor, recons: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """Grid with each row of originals directly above its row of reconstructions."""
    rows = []
    for a, b in zip(originals.split(per_row), recons.split(per_row)):
        rows += [a, b]
    save_image(torch.cat(rows), path, nrow=per_row, padding=2, pad_value=1.0)
