"""Resumable checkpoints that survive being killed at any moment and never run code from a file.

Why each step is here:

- A checkpoint is written into ``checkpoints/step_N.tmp/`` (Accelerate's ``save_state``:
  model safetensors, optimizer pickle, RNG pickles; plus this process's generator states
  as safetensors), then a manifest (``trainer_state.json``: the step, and every file's
  size and SHA-256) is added and the directory is renamed to ``step_N``. A rename is
  atomic, so a run killed mid-write (SIGKILL included) leaves only a ``.tmp`` that
  nothing reads, and the previous checkpoint untouched.
- On resume the manifest is checked before any file is parsed: a truncated or damaged
  file is caught by its size or checksum, and ``-r latest`` falls back to the newest
  good checkpoint with a warning naming the bad one.
- Accelerate reads its pickles with ``torch.load(weights_only=True)``, which refuses a
  pickle naming any callable other than tensor rebuilders (a crafted one that would run
  code is rejected unrun); that refusal becomes a one-line error here.
- Accelerate only *logs* a failure to restore the RNG state, which would silently break
  exact resume, so the generators are also saved and restored here, as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from utils.errors import UserError
from utils.files import current_umask, disk_advice, save_tensors, tensor_mismatches
from utils.training.run_folder import newest_run_folder

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"step_(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run that were completed (renamed into place), oldest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def checkpoint_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())  # on disk before the rename makes the checkpoint visible
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _digest(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}


def write_manifest(folder: Path, step: int) -> None:
    """Record the step and each file's size and checksum (also used by tests to forge a consistent checkpoint)."""
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "files": _manifest(folder)}, indent=1))


def problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when every file matches its manifest."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is missing or unreadable (incomplete checkpoint)"
    for name, meta in state.get("files", {}).items():  # checkpoints without a manifest are taken as they are
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} is truncated or changed ({f.stat().st_size} bytes, expected {meta['bytes']})"
        if _digest(f) != meta["sha256"]:
            return f"{name} is damaged (its SHA-256 differs from the manifest)"
    return None


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def resolve_resume(resume: str, exp_dir: str | None, config_path: str | None,
                   verbose: bool = True) -> tuple[Path, Path]:
    """(run_dir, checkpoint) for ``-r latest`` (newest good one) or ``-r PATH`` (that one, or an error)."""
    if resume != "latest":
        path = Path(resume)
        if NAME.match(path.name) and path.is_dir():
            why = problem(path)
            if why:
                raise UserError(f"checkpoint {path} cannot be resumed: {why}; use -r latest to take the newest "
                                f"good one")
            return path.parent.parent, path
        if not (path / "checkpoints").is_dir():
            raise UserError(f"-r {resume}: not a checkpoint (runs/X/checkpoints/step_N) or a run with checkpoints; "
                            f"use -r latest or an existing path")
        exp_dir = str(path)
    run_dir = Path(exp_dir) if exp_dir else newest_run_folder(config_path)
    good = checkpoints(run_dir)
    newest_good = checkpoint_step(good[-1]) if good else -1
    for tmp in sorted((run_dir / "checkpoints").glob("step_*.tmp")):
        m = NAME.match(tmp.name[:-4])
        if verbose and m and int(m.group(1)) > newest_good:
            _warn(f"skipping incomplete checkpoint {tmp} (the run stopped while writing it)")
    for ckpt in reversed(good):
        why = problem(ckpt)
        if why is None:
            return run_dir, ckpt
        if verbose:
            _warn(f"skipping checkpoint {ckpt}: {why}")
    raise UserError(f"no usable checkpoint in {run_dir / 'checkpoints'}: start a new run without -r")


def _rng_file(rank: int) -> str:
    return f"rng_{rank}.safetensors"


def _generator_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int,
                    extras: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the full training state for ``step`` atomically; keep only the newest ``keep`` (0: all).

    ``extras`` (file name -> tensors) is state beyond Accelerate's (the weights' moving average, a critic's
    optimizer), written by the main process as safetensors: Accelerate's own hook for such state pickles it
    and unpickles it with ``weights_only=False``, which could run code."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while writing
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        save_tensors(_generator_states(accelerator.device), tmp / _rng_file(accelerator.process_index))
        for name, tensors in (extras or {}).items():
            if accelerator.is_main_process:
                save_tensors(tensors, tmp / name)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            mode = 0o666 & ~current_umask()
            for f in tmp.iterdir():  # safetensors writes 0600: readable like every other file of the run
                os.chmod(f, mode)
            write_manifest(tmp, step)
            _replace_dir(tmp, final)
    except Exception as e:  # disk full, quota, permissions: the writers raise OSError, RuntimeError, SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else e.__class__.__name__
        raise UserError(f"could not write checkpoint {final} ({reason}): {disk_advice(e, run_dir)}, then "
                        f"{after_failed_write(run_dir)}") from None
    if accelerator.is_main_process and keep > 0:
        for old in checkpoints(run_dir)[:-keep]:
            doomed = old.with_name(old.name + ".old")
            os.replace(old, doomed)  # invisible to -r before its files go
            shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def after_failed_write(run_dir: Path) -> str:
    """How to go on after a write into a run failed: resume from its last complete checkpoint, or, when it has
    none, start it again."""
    previous = checkpoints(run_dir)
    if previous:
        return f"resume with -r latest -e {run_dir}; the last complete checkpoint {previous[-1]} is intact"
    return f"start the run again with --overwrite -e {run_dir} (no checkpoint was complete yet)"


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted after (never half-visible)."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def supersede_newer(run_dir: Path, step: int) -> None:
    """Set aside checkpoints newer than the one resumed from: they belong to the abandoned continuation, and
    ``-r latest`` must not mix it with this one. Renamed to ``step_N.superseded``, not deleted."""
    for ckpt in checkpoints(run_dir):
        if checkpoint_step(ckpt) > step:
            aside = ckpt.with_name(ckpt.name + ".superseded")
            _replace_dir(ckpt, aside)
            _warn(f"resuming from step {step}: the later checkpoint {ckpt.name} is set aside as {aside}")


def _shape_problems(ckpt: Path, model: torch.nn.Module) -> list[str]:
    try:
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {ckpt}: model.safetensors cannot be read ({e}): resume from another "
                        f"checkpoint") from None
    return tensor_mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()}, found)


def load_checkpoint(accelerator, ckpt: Path, model: torch.nn.Module,
                    extras: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] | None = None) -> int:
    """Restore model, optimizer, scaler and generators from ``ckpt``, and each of ``extras`` (file name ->
    (its loader, what to do when the checkpoint lacks it)); return its step."""
    mismatch = _shape_problems(ckpt, model)
    if mismatch:
        shown = "; ".join(mismatch[:4]) + (f"; and {len(mismatch) - 4} more" if len(mismatch) > 4 else "")
        raise UserError(f"checkpoint {ckpt} does not fit the model of this config: {shown}; resume without "
                        f"overriding model.* or data.* keys")
    try:
        accelerator.load_state(str(ckpt))
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met a global it does not allow
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "not plain tensors")
        raise UserError(f"refused to load {ckpt}: a pickle in it holds more than tensors ({detail}), so it could "
                        f"run code; resume only from checkpoints this toolkit wrote") from None
    except (RuntimeError, ValueError, KeyError, EOFError, OSError, SafetensorError) as e:
        raise UserError(f"checkpoint {ckpt} cannot be loaded ({str(e).strip().splitlines()[0]}): resume from "
                        f"another checkpoint with -r PATH") from None
    for name, (load, fix) in (extras or {}).items():
        if not (ckpt / name).is_file():
            raise UserError(f"checkpoint {ckpt} has no {name}: {fix}")
        load({k: v.to(accelerator.device) for k, v in load_file(str(ckpt / name)).items()})
    rng = ckpt / _rng_file(accelerator.process_index)
    if rng.is_file():
        states = load_file(str(rng))
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and accelerator.device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"], accelerator.device)
    else:
        _warn(f"{ckpt} has no {rng.name}: random generators are not restored, so this resume is not exact")
    return checkpoint_step(ckpt)
