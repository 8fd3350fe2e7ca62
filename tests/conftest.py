"""Shared test helpers: the real data in ../shared/data, the scripts run in-process, and a runner for the
real scripts as separate processes (for what only a process shows: signals, exit status, launchers)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("VAE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()

# One intra-op thread, here and in every process the tests start (run_script): the same on any machine, so that
# a run started in a subprocess and finished in this process is bit-identical to an unbroken run; and as fast as
# two for these small models, while far more robust when the cores are shared (two-process launches, other jobs):
# OpenMP threads that wait for a descheduled sibling can make a step 40x slower.
THREADS = 1
torch.set_num_threads(THREADS)

# small, fast settings shared by the end-to-end runs: real MNIST (never downloaded), a few steps
FAST = ["data.root=" + str(DATA), "data.download=false", "train.batch_size=32", "train.log_every=1",
        "train.eval_samples=256", "train.sample_every=0", "train.eval_every=0", "train.save_every=0"]


def require_data() -> Path:
    raw = DATA / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert raw.is_file(), f"real MNIST expected at {raw} (set VAE_TEST_DATA to the folder holding MNIST/raw)"
    return DATA


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The tests that train or evaluate use real MNIST; they fail, not skip, when it is missing (the maths
    tests do not ask for it, and run without it)."""
    return require_data()


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons, as Accelerate's own test utilities do between tests: each
    in-process run then starts as a fresh process would (its own mixed precision, its own device)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate() -> None:
    """Every test starts without Accelerate state left over by the one before."""
    reset_accelerate()


@dataclass
class Result:
    """What a finished command left: its exit status and what it printed (as a CompletedProcess has)."""

    returncode: int
    stdout: str
    stderr: str


def release(exc: BaseException | None) -> None:
    """Drop what the frames of a failed run still hold, as the end of its process would: a DataLoader whose
    iteration raised (a vanished or corrupt image) then shuts its workers down at once. Left to the cyclic
    garbage collector, its workers are not told to stop, and each is killed only after DataLoader's 5 s wait:
    a 10 s stall in whichever later test the collection happens to fall."""
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


def cli(main: Callable[[list[str]], None], argv: list[str]) -> Result:
    """Run a script's ``main`` in this process, through ``guarded_main`` as its ``__main__`` does: the same exit
    status (``error: ...`` and 2 for a ``UserError``), stdout and stderr, without a new interpreter's start-up.
    Any other exception propagates with its traceback, failing the test."""
    from utils.errors import guarded_main

    reset_accelerate()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            guarded_main(main, list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            release(e)
    reset_accelerate()
    return Result(code, out.getvalue(), err.getvalue())


def train_cli(argv: list[str]) -> Result:
    """``python train_vae.py ARGV``, in this process."""
    import train_vae

    return cli(train_vae.main, argv)


def train(exp_dir: Path, config: str = "configs/mnist.yaml", extra: list[str] | None = None) -> Result:
    """A new run of ``config`` with the FAST settings (and ``extra``) into ``exp_dir``, in this process."""
    require_data()
    res = train_cli(["-c", str(REPO / config), "-e", str(exp_dir), *FAST, *(extra or [])])
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def run_script(args: list[str], cwd: Path | None = None, launcher: list[str] | None = None,
               env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a top-level script of the repo as a user would, in a new process, and return the finished process."""
    cmd = (launcher or [sys.executable]) + args
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS), **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def accel_2() -> list[str]:
    """A two-process CPU launch on its own free port, so no other job's rendezvous (default 29500) can collide."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU = {"ACCELERATE_USE_CPU": "1"}  # the environment of a CPU launch


# Runs shared by several tests, trained once per session. A test that changes a run works on a copy
# (shutil.copytree); the others only read it.

@pytest.fixture(scope="session")
def mnist_300(tmp_path_factory) -> Path:
    """300 steps of a small MLP VAE (z=8) on MNIST at batch 64: its losses fall, and it is worth evaluating."""
    run = tmp_path_factory.mktemp("mnist_300") / "run"
    train(run, extra=["train.steps=300", "model.z_dim=8", "model.hidden=128", "train.batch_size=64",
                      "train.log_every=50"])
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """Two steps of the default MNIST config, with a checkpoint at step 2."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    train(run, extra=["train.steps=2", "train.save_every=2"])
    return run
