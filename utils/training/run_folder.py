"""The run folder: where it is, creating and replacing it, its metrics log, and atomic writes into it.

    runs/<name>-<time>/
      config.yaml            resolved config, written by the trainer once data and model have loaded
      command.txt            the command line that started the run, then one line per resume
      model.safetensors      final weights, written at the end (with config.yaml, all a sampler needs)
      metrics.jsonl          one JSON object per logged step: step, split, loss, rec, kl, ...
      samples/               step_0001000_samples.png, step_0001000_recon.png
      checkpoints/step_0001000/   full Accelerate state (model, optimizer, scaler, RNG), rng_R.safetensors,
                             trainer_state.json (step, each file's size and SHA-256); see utils/training/checkpoints.py
      tb/                    TensorBoard events (train.log_with)
      train.lock             while a process trains in the run: its id (an OS lock, released when it ends)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

try:
    import fcntl  # the run folder's lock; not on Windows, where runs are not locked
except ImportError:
    fcntl = None

from utils.errors import UserError
from utils.files import cannot_write, disk_advice, save_tensors, write_atomic

if TYPE_CHECKING:
    import torch

RUNS = Path("runs")
LOCK = "train.lock"
_held: dict[Path, int] = {}  # run folder -> the open lock file's descriptor, while this process trains there


def default_run_dir(config_path: str | None) -> Path:
    name = Path(config_path).stem if config_path else "vae"
    return RUNS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def newest_run_folder(config_path: str | None = None, require: str = "checkpoints") -> Path:
    """The most recently modified run under runs/ (of this config's name when one is given)."""
    prefix = f"{Path(config_path).stem}-" if config_path else ""
    runs = [p for p in RUNS.glob(f"{prefix}*") if (p / require).exists()] if RUNS.is_dir() else []
    if not runs:
        what = f"runs/{prefix}*" if prefix else "runs/"
        raise UserError(f"no run with {require} found under {what}: pass the run with -e/--exp_dir")
    return max(runs, key=lambda p: p.stat().st_mtime)


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


def create_run_dir(run_dir: Path, config_text: str, overwrite: bool, command: str = "") -> None:
    """Create the run directory with its config.yaml and command.txt (replacing the run there with
    ``overwrite``).

    Called only once data and model have loaded, so a start that fails leaves nothing behind.
    """
    try:
        if overwrite and run_dir.exists():
            lock_run(run_dir)  # not a run that another process is training
            print(f"--overwrite: replacing the run in {run_dir}")
            shutil.rmtree(run_dir)
            unlock_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run(run_dir)
        if (run_dir / "config.yaml").exists():  # another process started a run here since this one checked
            unlock_run(run_dir)
            raise UserError(f"{run_dir} already holds a run, started while this one loaded: resume it with "
                            f"-r latest -e {run_dir}, or choose another -e")
        write_atomic(run_dir / "config.yaml", config_text)
        record_command(run_dir, command)
    except OSError as e:
        raise UserError(f"cannot write the run directory {run_dir} ({e.strerror}): {disk_advice(e, run_dir)}, "
                        f"or choose another place with -e") from None


def record_command(run_dir: Path, command: str, resumed_at: int | None = None) -> None:
    """The command line that started the run, as typed (command.txt, first line), and each resume's after it:
    the model card quotes the first."""
    if not command:
        return
    line = command if resumed_at is None else f"# resumed at step {resumed_at}: {command}"
    with (run_dir / "command.txt").open("a", encoding="utf-8", errors="surrogateescape") as f:
        f.write(line + "\n")


def started_with(run_dir: Path) -> str | None:
    """The command that started the run (command.txt's first line), or None for a run without one."""
    path = Path(run_dir) / "command.txt"
    lines = path.read_text(errors="surrogateescape").splitlines() if path.is_file() else []
    return lines[0] if lines else None


def check_name(run_dir: Path) -> None:
    """Refuse, before anything is written, a run folder whose name is not valid UTF-8: the trackers and the
    model card need it as text, and a run that failed at its first tracker would leave a folder that blocks
    its own rerun."""
    try:
        str(run_dir).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(run_dir).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UserError(f"the run folder name {shown} is not valid UTF-8: choose another -e (or rename the folder "
                        f"with mv and resume it there)") from None


def check_writable(run_dir: Path) -> None:
    """Refuse, before data and model load, a run folder (or, for a new one, the folder it goes in) that cannot
    be written: training would otherwise fail at its first write."""
    e = cannot_write(run_dir)
    if e is not None:
        raise UserError(f"cannot write into {run_dir} ({e.strerror}): {disk_advice(e, run_dir)}, or train into "
                        f"another folder with -e")


def lock_run(run_dir: Path) -> None:
    """Hold the run folder's lock (an exclusive ``flock`` on ``train.lock``) until ``unlock_run``: a second
    process that would train in the same run is refused, naming the first. The operating system releases it
    when the holder ends, however it ends, so a crash leaves no stale lock. Held once per process."""
    run_dir = Path(run_dir)
    if run_dir in _held or fcntl is None:
        return
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = _read_holder(path)
            raise UserError(f"{run_dir} is in use: {holder} is training in it; wait for it to end (or stop it), "
                            f"or train into another folder with -e") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the holder before removed it as it let go: lock the new one
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[run_dir] = fd


def unlock_run(run_dir: Path) -> None:
    """Let go of the run folder's lock (and remove its file, which a later lock re-creates)."""
    fd = _held.pop(Path(run_dir), None)
    if fd is not None:
        Path(run_dir, LOCK).unlink(missing_ok=True)
        os.close(fd)


def _read_holder(path: Path) -> str:
    try:
        pid, host = path.read_text().split()[:2]
    except (OSError, ValueError):
        return "another process"
    return f"process {pid}" + ("" if host == socket.gethostname() else f" on {host}")


def save_weights(model: torch.nn.Module, run_dir: Path, step: int) -> None:
    """model.safetensors, made visible only complete. safetensors reports a full disk as a SafetensorError,
    not an OSError, so it is turned into the one-line error here; the final checkpoint is already complete."""
    final = run_dir / "model.safetensors"
    try:
        save_tensors(model.state_dict(), final, metadata={"step": str(step)})
    except (OSError, SafetensorError) as e:
        raise UserError(f"could not write {final} ({str(e).strip().splitlines()[-1]}): {disk_advice(e, run_dir)}, "
                        f"then rerun with -r latest -e {run_dir} (its checkpoint at step {step} is complete; it "
                        f"only writes the weights)") from None


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
